//! A router that never returns when the request carries `x-tollgate-hostile: 1`, and otherwise
//! routes to the first channel serving the model: the host's deadline must interrupt the loop and
//! the next request must be served.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router};

/// The hostile router.
pub struct EndlessLoop;

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
        channels
            .into_iter()
            .find_map(|channel| {
                let model = channel
                    .models
                    .iter()
                    .find(|m| m.public_name == facts.model)?;
                Some(vec![Attempt {
                    channel: channel.name.clone(),
                    upstream_model: model.upstream_name.clone(),
                }])
            })
            .ok_or_else(|| RouteError::NoRoute(format!("no channel serves `{}`", facts.model)))
    }
}

export_router!(EndlessLoop);
