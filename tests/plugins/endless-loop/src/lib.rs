//! A router whose `plan` never returns: the host's deadline must interrupt it.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router};

struct EndlessLoop;

impl Router for EndlessLoop {
    fn plan(facts: RequestFacts, _channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let mut spins: u64 = 0;
        loop {
            spins = std::hint::black_box(spins.wrapping_add(facts.estimated_input_tokens));
        }
    }
}

export_router!(EndlessLoop);
