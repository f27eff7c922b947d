//! Write Tollgate plugins in Rust.
//!
//! A plugin has exactly one role — router, translator or billing — and is a WebAssembly component built
//! for `wasm32-wasip2`. Implement the role's trait on a unit struct and export it with the role's macro:
//!
//! ```
//! use tollgate_plugin_sdk::router::*;
//!
//! struct CheapestFirst;
//!
//! impl Router for CheapestFirst {
//!     fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
//!         // The channels that serve `facts.model`, fewest errors first.
//!         plan_by(&facts, channels, |candidate| candidate.channel.error_rate_permille)
//!     }
//! }
//!
//! tollgate_plugin_sdk::export_router!(CheapestFirst);
//! ```
//!
//! A plugin has no ambient I/O: it gets the log, a clock and its own configuration from [`host`], nothing
//! else. Every call may run in a fresh instance, so keep no state between calls.
#![deny(missing_docs)]

pub mod billing;
pub mod host;
pub mod inbound;
pub mod openai;
pub mod router;
pub mod translator;

/// The generated WIT bindings. Plugin authors use the role modules instead; the `export_*!` macros
/// reach in here.
#[doc(hidden)]
pub mod wit;

/// Types every role shares: normalized usage, upstream failures, the operation called.
pub mod types {
    pub use crate::wit::router::tollgate::plugin::types::{
        FailureClass, Header, InvalidRequest, Operation, UpstreamFailure, Usage,
    };
}
