//! A router that never returns when the request carries `x-tollgate-hostile: 1`, and otherwise
//! routes like `failover`: the host's deadline must interrupt the loop and
//! the next request must be served.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router, plan_by};

/// The hostile router.
struct EndlessLoop;

impl Router for EndlessLoop {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        if facts
            .tags
            .iter()
            .any(|(name, value)| name == "hostile" && value == "1")
        {
            let mut spins: u64 = 0;
            loop {
                spins = std::hint::black_box(spins.wrapping_add(facts.estimated_input_tokens));
            }
        }
        plan_by(&facts, channels, |_| ())
    }
}

export_router!(EndlessLoop);
