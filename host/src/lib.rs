//! Tollgate, an LLM API gateway programmable with WebAssembly plugins.
//!
//! The modules read as a request flows: [`listen`] → [`auth`] → [`route`] → [`bill`] →
//! [`translate`] → [`upstream`] → [`stream`] → [`record`], ordered by [`flow`]. [`plugin`] runs the
//! wasm plugins, [`store`] keeps durable state, [`error`] maps every error to HTTP once. The
//! binary (`main.rs`) is the CLI around them; [`trial`] runs one plugin outside the gateway for it.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod bill;
pub mod config;
pub mod console;
pub mod error;
pub mod flow;
pub mod gateway;
pub mod health;
pub mod inbound;
pub mod limit;
pub mod listen;
pub mod metrics;
pub mod plugin;
pub mod record;
pub mod request;
pub mod route;
pub mod secrets;
pub mod sse;
pub mod store;
pub mod stream;
pub mod tokens;
pub mod translate;
pub mod trial;
pub mod upstream;
