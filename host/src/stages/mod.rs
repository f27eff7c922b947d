//! The stages a request passes through, in order. A stage uses the request's [`context`] and the
//! layers below (channels, plugins, the store), and is handed the parts of the gateway's state it
//! needs; it never reaches up to the flow that calls the stages in turn, nor to HTTP.

pub mod auth;
pub mod bill;
pub mod context;
pub mod inbound;
pub mod limit;
pub mod record;
pub mod route;
pub mod stream;
pub mod translate;
pub mod upstream;
