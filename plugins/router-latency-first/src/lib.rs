//! Router `latency-first`: the channel with the lowest recent time to first byte first. A channel
//! with no history yet goes first, so it gets measured. Open circuits last; ties by priority.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The router.
struct LatencyFirst;

impl Router for LatencyFirst {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        plan(&facts, channels)
    }
}

export_router!(LatencyFirst);

fn plan(facts: &RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
    plan_by(facts, channels, |candidate: &Candidate| {
        candidate.channel.ttfb_ewma_ms.unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::Circuit;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn timed(name: &str, ttfb_ms: Option<u32>) -> Channel {
        let mut channel = channel(name, "m");
        channel.ttfb_ewma_ms = ttfb_ms;
        channel
    }

    #[test]
    fn fastest_first_unmeasured_before_and_open_after() {
        let mut open_fast = timed("open-fast", Some(1));
        open_fast.circuit = Circuit::Open;
        let channels = vec![
            timed("slow", Some(900)),
            open_fast,
            timed("fast", Some(80)),
            timed("new", None),
        ];
        let plan = plan(&facts("m"), channels).unwrap();
        let order: Vec<&str> = plan
            .iter()
            .map(|attempt| attempt.channel.as_str())
            .collect();
        assert_eq!(order, ["new", "fast", "slow", "open-fast"]);
    }
}
