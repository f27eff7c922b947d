//! The stages a request passes through, in order. A stage uses the request's [`context`] and the
//! layers below (channels, plugins, the store), and is handed the parts of the gateway's state it
//! needs; it never reaches up to the flow that calls the stages in turn, nor to HTTP.

pub mod auth;
pub(crate) mod bill;
pub(crate) mod context;
pub(crate) mod inbound;
pub(crate) mod limit;
pub(crate) mod record;
pub(crate) mod route;
pub(crate) mod stream;
pub(crate) mod translate;
pub(crate) mod upstream;
