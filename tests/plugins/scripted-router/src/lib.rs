//! A router steered by its configuration, for the plugin lifecycle and sandbox tests: it prefers a
//! named channel, or misbehaves in the way asked (README.md).

use serde::Deserialize;
use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::host::{config, parse_config, warn};
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Script {
    /// The channel to try first.
    prefer: Option<String>,
    /// How to misbehave on every call.
    misbehave: Option<Misbehaviour>,
    /// A line to log through the host on every call.
    log: Option<String>,
    /// Refuse every request with this message (a typed rejection, not a failure).
    refuse: Option<String>,
    /// Refuse a call that finds an earlier call's mark in this instance's memory: the host must
    /// give every call a fresh instance.
    expect_fresh: bool,
    /// Refuse every request, naming the channels it was given and how many models each carried
    /// (`saw a(1), b(1)`): what the host hands a router.
    describe_input: bool,
}

/// Calls made by this instance; every call should see 0 here.
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Misbehaviour {
    Trap,
    Memory,
    HugeOutput,
    Loop,
}

/// The router.
struct Scripted;

impl Router for Scripted {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Script>(config).map(|_| ())
    }

    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let script = config::<Script>().map_err(RouteError::Refused)?;
        if let Some(line) = &script.log {
            warn(line);
        }
        let earlier = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if script.expect_fresh && earlier > 0 {
            return Err(RouteError::Refused(format!(
                "state leaked: this instance served {earlier} earlier calls"
            )));
        }
        if let Some(message) = script.refuse {
            return Err(RouteError::Refused(message));
        }
        if script.describe_input {
            let seen: Vec<String> = channels
                .iter()
                .map(|channel| format!("{}({})", channel.name, channel.models.len()))
                .collect();
            return Err(RouteError::Refused(format!("saw {}", seen.join(", "))));
        }
        match script.misbehave {
            Some(Misbehaviour::Trap) => panic!("scripted trap"),
            Some(Misbehaviour::Memory) => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some(Misbehaviour::HugeOutput) => {
                let model = "m".repeat(1 << 20);
                let channel = channels.first().map(|c| c.name.clone()).unwrap_or_default();
                return Ok((0..16)
                    .map(|_| Attempt {
                        channel: channel.clone(),
                        upstream_model: model.clone(),
                    })
                    .collect());
            }
            Some(Misbehaviour::Loop) => loop {
                std::hint::black_box(&facts);
            },
            None => {}
        }
        let prefer = script.prefer;
        plan_by(&facts, channels, |candidate: &Candidate| {
            (
                prefer.as_deref() != Some(candidate.channel.name.as_str()),
                candidate.channel.priority,
            )
        })
    }
}

export_router!(Scripted);
