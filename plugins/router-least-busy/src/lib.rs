//! Router `least-busy`: the channel with the fewest calls in flight first. Open circuits last;
//! ties by priority.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The router.
struct LeastBusy;

impl Router for LeastBusy {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        plan(&facts, channels)
    }
}

export_router!(LeastBusy);

fn plan(facts: &RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
    plan_by(facts, channels, |candidate: &Candidate| {
        candidate.channel.in_flight
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn busy(name: &str, in_flight: u32, priority: u32) -> Channel {
        let mut channel = channel(name, "m");
        channel.in_flight = in_flight;
        channel.priority = priority;
        channel
    }

    #[test]
    fn fewest_in_flight_first_then_priority() {
        let channels = vec![
            busy("busy", 40, 1),
            busy("idle-low", 2, 5),
            busy("idle-high", 2, 1),
        ];
        let plan = plan(&facts("m"), channels).unwrap();
        let order: Vec<&str> = plan
            .iter()
            .map(|attempt| attempt.channel.as_str())
            .collect();
        assert_eq!(order, ["idle-high", "idle-low", "busy"]);
    }

    #[test]
    fn an_unserved_model_has_no_route() {
        assert!(matches!(
            plan(&facts("other"), vec![busy("a", 0, 1)]),
            Err(RouteError::NoRoute(_))
        ));
    }
}
