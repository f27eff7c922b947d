//! A router that panics when the request carries `x-tollgate-hostile: 1`, and otherwise routes like
//! `failover`: the host must answer the hostile request with a 500 naming
//! the plugin and keep serving the next one.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router, plan_by};

/// The hostile router.
struct Trap;

impl Router for Trap {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        if facts
            .tags
            .iter()
            .any(|(name, value)| name == "hostile" && value == "1")
        {
            panic!("this test plugin traps on request");
        }
        plan_by(&facts, channels, |_| ())
    }
}

export_router!(Trap);
