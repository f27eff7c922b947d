//! HTTP: the listeners and their connections (admission, request ids, body caps), the public
//! routes that hand requests to [`crate::flow`], and the admin API.

pub mod admin;
pub mod admission;
pub mod listen;
