//! Tollgate, an LLM API gateway programmable with WebAssembly plugins.
//!
//! The modules read as a request flows: [`http`] takes each request and hands it to [`flow`],
//! which orders the [`stages`]: auth → limit → inbound → route → bill → translate → upstream →
//! stream → record. [`plugin`] runs the wasm plugins, [`store`] keeps durable state, [`error`]
//! maps every error to HTTP once. The binary (`main.rs`, `cli/`) is the command line around them;
//! [`trial`] runs one plugin outside the gateway for it.

pub mod channel;
pub mod config;
pub mod console;
pub(crate) mod error;
pub mod flow;
pub mod gateway;
pub(crate) mod health;
pub mod http;
pub(crate) mod metrics;
pub mod plugin;
pub mod request;
pub mod secrets;
pub mod sse;
pub mod stages;
pub mod store;
pub mod tokens;
pub mod trial;
