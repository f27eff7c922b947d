//! The stages a request passes through, in order. A stage uses the types of the layers below it
//! (`plugin`, `store`, `gateway`'s state) and of the request's context; [`crate::flow`] calls
//! them in turn.

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
