//! A router that panics when the request carries `x-tollgate-hostile: 1`, and otherwise routes to
//! the first channel serving the model: the host must answer the hostile request with a 500 naming
//! the plugin and keep serving the next one.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router};

/// The hostile router.
pub struct Trap;

impl Router for Trap {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        if facts
            .tags
            .iter()
            .any(|(name, value)| name == "hostile" && value == "1")
        {
            panic!("this test plugin traps on request");
        }
        first_serving(&facts, channels)
    }
}

fn first_serving(facts: &RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
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

export_router!(Trap);
