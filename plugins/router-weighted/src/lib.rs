//! Router `weighted`: spreads requests over healthy channels in proportion to their weights. The
//! first choice is drawn by weight, the failover chain behind it by weight among the rest (open
//! circuits last). The draw is seeded by the request id: the same request always gets the same
//! plan, and no state is kept between calls.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, candidates, no_route,
};

/// The router.
struct Weighted;

impl Router for Weighted {
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        plan(&facts, channels)
    }
}

export_router!(Weighted);

/// FNV-1a, then xorshift steps: a small deterministic generator seeded by the request id.
struct Draws(u64);

impl Draws {
    fn new(seed: &str) -> Self {
        let hash = seed.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(hash | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

fn plan(facts: &RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
    let all = candidates(facts, channels);
    if all.is_empty() {
        return Err(no_route(facts));
    }
    let (mut open, mut healthy): (Vec<Candidate>, Vec<Candidate>) =
        all.into_iter().partition(Candidate::is_open);
    let mut draws = Draws::new(&facts.request_id);
    let mut plan = Vec::with_capacity(healthy.len() + open.len());
    while !healthy.is_empty() {
        let total: u64 = healthy
            .iter()
            .map(|c| u64::from(c.channel.weight.max(1)))
            .sum();
        let mut point = draws.below(total);
        let index = healthy
            .iter()
            .position(|candidate| {
                let weight = u64::from(candidate.channel.weight.max(1));
                if point < weight {
                    return true;
                }
                point -= weight;
                false
            })
            .unwrap_or(0);
        plan.push(healthy.remove(index).attempt());
    }
    open.sort_by_key(|candidate| candidate.channel.priority);
    plan.extend(open.iter().map(Candidate::attempt));
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::Circuit;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn weighted(name: &str, weight: u32) -> Channel {
        let mut channel = channel(name, "m");
        channel.weight = weight;
        channel
    }

    #[test]
    fn first_choices_follow_the_weights() {
        let mut firsts = std::collections::HashMap::new();
        for request in 0..4_000 {
            let mut request_facts = facts("m");
            request_facts.request_id = format!("request-{request}");
            let channels = vec![weighted("heavy", 3), weighted("light", 1)];
            let plan = plan(&request_facts, channels).unwrap();
            assert_eq!(plan.len(), 2);
            *firsts.entry(plan[0].channel.clone()).or_insert(0) += 1;
        }
        let heavy = firsts["heavy"];
        assert!(
            (2_700..=3_300).contains(&heavy),
            "heavy first {heavy} of 4000"
        );
    }

    #[test]
    fn open_circuits_go_last_and_the_same_request_gets_the_same_plan() {
        let mut open = weighted("open", 100);
        open.circuit = Circuit::Open;
        let channels = vec![open, weighted("a", 1), weighted("b", 1)];
        let first = plan(&facts("m"), channels.clone()).unwrap();
        assert_eq!(first.last().map(|a| a.channel.as_str()), Some("open"));
        let names = |attempts: &[Attempt]| -> Vec<String> {
            attempts
                .iter()
                .map(|attempt| attempt.channel.clone())
                .collect()
        };
        assert_eq!(names(&plan(&facts("m"), channels).unwrap()), names(&first));
    }
}
