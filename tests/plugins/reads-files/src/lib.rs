//! A router that reads a file: its component imports `wasi:filesystem`, so the gateway must refuse
//! it at upload, naming the import.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router, plan_by};

/// The router.
struct ReadsFiles;

impl Router for ReadsFiles {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let secrets = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if !secrets.is_empty() {
            return Err(RouteError::Refused(secrets));
        }
        plan_by(&facts, channels, |_| ())
    }
}

export_router!(ReadsFiles);
