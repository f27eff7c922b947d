//! A channel as the gateway runs it: its configuration, key pool with each key's state, HTTP
//! clients (one per serving worker), timeouts, health and silence watch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ChannelConfig;
use crate::health::{ChannelHealth, HealthConfig, SilenceWatch};
use crate::secrets::SecretScrubber;

/// Why a channel cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// An HTTP client could not be built.
    #[error("cannot build the HTTP client of channel `{channel}`")]
    HttpClient {
        /// The channel.
        channel: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A channel's `ca_file` cannot be read, or holds no certificate.
    #[error("channel `{channel}`: `ca_file` {path:?} cannot be used: {reason}")]
    CaFile {
        /// The channel.
        channel: String,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A channel's `base_url` is not a URL.
    #[error("channel `{channel}`: `base_url` {base_url:?} is not a URL: {reason}")]
    BaseUrl {
        /// The channel.
        channel: String,
        /// What it says.
        base_url: String,
        /// Why it does not parse.
        reason: String,
    },
}

/// An upstream channel as the gateway runs it.
pub struct Channel {
    /// Its configuration.
    pub config: ChannelConfig,
    /// The protocol options as JSON text, handed to the translator.
    pub options_json: String,
    /// The key pool, resolved from the environment at start-up.
    pub keys: Vec<UpstreamKey>,
    /// `config.base_url`, parsed once: parsing a URL (its host above all) on every request cost
    /// 2 % of the gateway's CPU.
    pub base_url: reqwest::Url,
    /// One HTTP client per serving worker, each with this channel's connect timeout: a pooled
    /// connection is driven by the runtime that opened it, so a worker using another's connection
    /// would wait on that thread (streams at concurrency 32 lost a third of their throughput so).
    clients: Vec<reqwest::Client>,
    /// Live health and circuit breaker of the whole channel.
    pub health: Arc<ChannelHealth>,
    /// Live health and circuit breaker per public model it serves.
    pub model_health: HashMap<String, Arc<ChannelHealth>>,
    /// Whether it still answers, for the calls waiting on it.
    pub silence: SilenceWatch,
    /// Takes its keys out of what its upstream writes in errors.
    pub secrets: Arc<SecretScrubber>,
}

thread_local! {
    /// The serving worker this thread is; 0 on any other thread.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Declares this thread serving worker `index` (counted from 1, as the threads are named), so
/// the requests it serves use that worker's upstream connections (client `index` modulo the
/// worker count; threads that serve no requests use client 0). A thread is a worker for good: a
/// worker's runtime is single-threaded, so none of its tasks ever moves to another thread.
pub fn enter_worker(index: usize) {
    WORKER.set(index);
}

impl Channel {
    /// The HTTP client of the worker serving on this thread.
    pub fn http(&self) -> &reqwest::Client {
        &self.clients[WORKER.get() % self.clients.len()]
    }
}

/// One upstream key of a channel's pool. The secret is never logged or returned; the key is known
/// by the name of the environment variable it came from.
///
/// What the upstream said about the key is kept for the whole key when it was about the key (a
/// 401: the key is invalid) and per upstream model when it was about one model (a 429: that
/// model's rate limit; a 403: no access to that model), so a limit on one model never takes the
/// key from the others. A refused key is probed again after a backoff (30 s, doubling to 10 min),
/// never dropped for good.
pub struct UpstreamKey {
    /// The environment variable's name: safe to show in traces and admin answers.
    pub id: String,
    secret: String,
    state: Mutex<KeyState>,
}

/// The first wait before a refused key is tried again.
const FIRST_PROBE_BACKOFF: Duration = Duration::from_secs(30);
/// The longest wait between probes of a refused key.
const LONGEST_PROBE_BACKOFF: Duration = Duration::from_secs(600);

#[derive(Default)]
struct KeyState {
    /// About the key itself.
    key: Restriction,
    /// About one upstream model, by its name.
    models: HashMap<String, Restriction>,
}

/// What keeps a key (or a key for one model) out of the pool for now.
#[derive(Default, Clone)]
struct Restriction {
    refused: Option<Refusal>,
    resting_until: Option<Instant>,
}

#[derive(Clone)]
struct Refusal {
    reason: String,
    next_probe: Instant,
    backoff: Duration,
}

impl Restriction {
    fn is_clear(&self) -> bool {
        self.refused.is_none() && self.resting_until.is_none()
    }

    /// When this restriction lets a call through: now if none, else the end of the rest or the
    /// next probe, whichever is later.
    fn back_at(&self, now: Instant) -> Instant {
        let rest = self.resting_until.unwrap_or(now);
        let probe = self
            .refused
            .as_ref()
            .map_or(now, |refusal| refusal.next_probe);
        rest.max(probe).max(now)
    }

    /// A probe is due: the next one waits for the current backoff again, so concurrent requests
    /// do not all probe.
    fn claim_probe(&mut self, now: Instant) {
        if let Some(refusal) = &mut self.refused
            && refusal.next_probe <= now
        {
            refusal.next_probe = now + refusal.backoff;
        }
    }

    fn report(&self, now: Instant) -> Option<serde_json::Value> {
        if let Some(refusal) = &self.refused {
            return Some(serde_json::json!({
                "state": "refused",
                "reason": refusal.reason,
                "next_probe_ms": refusal.next_probe.saturating_duration_since(now).as_millis() as u64,
            }));
        }
        let until = self.resting_until.filter(|until| now < *until)?;
        Some(serde_json::json!({
            "state": "resting",
            "rest_ms": (until - now).as_millis() as u64,
        }))
    }
}

/// The scope of what an upstream said about a key.
#[derive(Debug, Clone, Copy)]
pub enum KeyScope<'m> {
    /// The key itself (an invalid key).
    Key,
    /// The key for one upstream model.
    Model(&'m str),
}

impl UpstreamKey {
    /// The secret, for the upstream request only.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    fn state(&self) -> std::sync::MutexGuard<'_, KeyState> {
        // Each update leaves the state whole: a panicked holder cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the key for a call on `model` if nothing holds it back now (claiming a due probe of
    /// a refused key); otherwise says whether it was refused and when it comes back.
    fn take_if_back(&self, model: &str, now: Instant) -> Result<(), (bool, Instant)> {
        let mut state = self.state();
        let for_model = state.models.get(model);
        let refused =
            state.key.refused.is_some() || for_model.is_some_and(|model| model.refused.is_some());
        let for_model = for_model.map_or(now, |restriction| restriction.back_at(now));
        let back_at = state.key.back_at(now).max(for_model);
        if back_at > now {
            return Err((refused, back_at));
        }
        Self::claim(&mut state, model, now);
        Ok(())
    }

    /// Takes the key for a call on `model` whatever holds it back: a last resort.
    fn take(&self, model: &str, now: Instant) {
        Self::claim(&mut self.state(), model, now);
    }

    fn claim(state: &mut KeyState, model: &str, now: Instant) {
        state.key.claim_probe(now);
        if let Some(restriction) = state.models.get_mut(model) {
            restriction.claim_probe(now);
        }
    }

    /// The upstream refused the key (for `scope`): out of the pool until a probe after a
    /// backoff that doubles with every refusal in a row.
    pub fn refuse(&self, scope: KeyScope<'_>, reason: String) {
        tracing::warn!(key = %self.id, ?scope, reason, "upstream key refused");
        let now = Instant::now();
        let mut state = self.state();
        let restriction = match scope {
            KeyScope::Key => &mut state.key,
            KeyScope::Model(model) => state.models.entry(model.to_owned()).or_default(),
        };
        let backoff = restriction
            .refused
            .as_ref()
            .map_or(FIRST_PROBE_BACKOFF, |refusal| {
                (refusal.backoff * 2).min(LONGEST_PROBE_BACKOFF)
            });
        restriction.refused = Some(Refusal {
            reason,
            next_probe: now + backoff,
            backoff,
        });
    }

    /// Rests the key for `scope` until `until` (a 429).
    pub fn rest(&self, scope: KeyScope<'_>, until: Instant) {
        let mut state = self.state();
        match scope {
            KeyScope::Key => state.key.resting_until = Some(until),
            KeyScope::Model(model) => {
                state
                    .models
                    .entry(model.to_owned())
                    .or_default()
                    .resting_until = Some(until);
            }
        }
    }

    /// The upstream answered a call on `model` with this key: whatever held it back for that
    /// model (and the key's own refusal, which the answer disproves) is over.
    pub fn answered(&self, model: &str) {
        let mut state = self.state();
        if state.key.is_clear() && state.models.is_empty() {
            return;
        }
        state.key = Restriction::default();
        state.models.remove(model);
    }

    /// What holds the key back now, for `/admin/channels`: the key's own state and its
    /// per-model ones (`refused` with the reason and the next probe, or `resting`).
    pub fn report(&self, now: Instant) -> serde_json::Value {
        let mut state = self.state();
        state.models.retain(|_, restriction| {
            restriction.refused.is_some()
                || restriction.resting_until.is_some_and(|until| now < until)
        });
        let models: serde_json::Map<String, serde_json::Value> = state
            .models
            .iter()
            .filter_map(|(model, restriction)| Some((model.clone(), restriction.report(now)?)))
            .collect();
        serde_json::json!({
            "id": self.id,
            "state": state.key.report(now).unwrap_or_else(|| serde_json::json!({"state": "usable"})),
            "models": models,
        })
    }
}

impl Channel {
    /// The time-to-first-byte timeout for a public model on this channel.
    pub fn first_byte_timeout(&self, public_model: &str) -> Duration {
        Duration::from_millis(
            self.config
                .model_first_byte_timeout_ms
                .get(public_model)
                .copied()
                .unwrap_or(self.config.first_byte_timeout_ms),
        )
    }

    /// Picks the key for a tenant's call on `model` (the upstream model): the same one every time
    /// while it stays usable, so the provider's prompt cache keeps working; otherwise the next
    /// usable key not yet tried. `Ok(None)` means the channel needs no key; `Err` that every key
    /// is held back, with the moment the first comes back.
    ///
    /// As a last resort (`anyway`), a held-back key is taken too: the one that comes back first.
    /// A key's state then never refuses the last route by itself: a healthy upstream answers at
    /// once, and an unhealthy one's own error (with its `retry-after`) reaches the client.
    pub fn pick_key(
        &self,
        tenant: &str,
        model: &str,
        now: Instant,
        tried: &[usize],
        anyway: bool,
    ) -> Result<Option<usize>, Instant> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let start = tenant.bytes().fold(0usize, |hash, byte| {
            hash.wrapping_mul(31).wrapping_add(usize::from(byte))
        });
        let untried = (0..self.keys.len())
            .map(|offset| (start + offset) % self.keys.len())
            .filter(|index| !tried.contains(index));
        // A resting key before a refused one (a rate limit passes; a refusal seldom does), then
        // the one back first.
        let mut soonest: Option<((bool, Instant), usize)> = None;
        for index in untried {
            match self.keys[index].take_if_back(model, now) {
                Ok(()) => return Ok(Some(index)),
                Err(held) => {
                    if soonest.is_none_or(|(soonest, _)| held < soonest) {
                        soonest = Some((held, index));
                    }
                }
            }
        }
        // Every key was tried already: nothing comes back within this request.
        let ((_, back_at), index) = soonest.ok_or(now)?;
        if !anyway {
            return Err(back_at);
        }
        self.keys[index].take(model, now);
        Ok(Some(index))
    }
}

impl Channel {
    /// A channel listing key variables of which none is set has no way to authenticate: it is
    /// kept out of routing until they are set (and the gateway restarted).
    pub fn is_active(&self) -> bool {
        self.config.api_key_env.is_empty() || !self.keys.is_empty()
    }
}

/// The certificates of a channel's `ca_file`.
pub fn trusted_roots(
    channel: &str,
    path: &std::path::Path,
) -> Result<Vec<reqwest::Certificate>, ChannelError> {
    let unusable = |reason: String| ChannelError::CaFile {
        channel: channel.to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|error| unusable(error.to_string()))?;
    let roots =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| unusable(error.to_string()))?;
    if roots.is_empty() {
        return Err(unusable("it holds no PEM certificate".to_owned()));
    }
    Ok(roots)
}

impl Channel {
    /// A channel with its key pool given as (id, secret) pairs, and an HTTP client for each of the
    /// `workers` serving threads.
    pub(crate) fn with_keys(
        config: &ChannelConfig,
        keys: Vec<(String, String)>,
        health: &HealthConfig,
        workers: usize,
    ) -> Result<Channel, ChannelError> {
        let secrets = Arc::new(SecretScrubber::new(
            keys.iter().map(|(_, secret)| secret.as_str()),
        ));
        let keys = keys
            .into_iter()
            .map(|(id, secret)| UpstreamKey {
                id,
                secret,
                state: Mutex::new(KeyState::default()),
            })
            .collect();
        let base_url =
            reqwest::Url::parse(&config.base_url).map_err(|error| ChannelError::BaseUrl {
                channel: config.name.clone(),
                base_url: config.base_url.clone(),
                reason: error.to_string(),
            })?;
        let roots = match &config.ca_file {
            Some(path) => trusted_roots(&config.name, path)?,
            None => Vec::new(),
        };
        let clients = (0..workers.max(1))
            .map(|_| {
                // HTTP/1.1 only, though providers offer HTTP/2 by ALPN: an HTTP/2 client keeps one
                // connection per upstream and never opens a second when the provider's limit of
                // concurrent streams on it (about a hundred) is reached (hyperium/hyper#2197), so
                // requests past it would wait for a running stream to end, as long as minutes.
                // HTTP/1.1 opens a connection per request in flight and keeps them for reuse.
                let mut client = reqwest::Client::builder()
                    .http1_only()
                    .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                    .pool_idle_timeout(Duration::from_secs(90));
                for root in &roots {
                    client = client.add_root_certificate(root.clone());
                }
                client.build().map_err(|source| ChannelError::HttpClient {
                    channel: config.name.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Channel {
            options_json: serde_json::to_string(&config.options)
                .unwrap_or_else(|_| "{}".to_owned()),
            config: config.clone(),
            keys,
            base_url,
            clients,
            health: ChannelHealth::new(health.clone()),
            model_health: config
                .models
                .keys()
                .map(|model| (model.clone(), ChannelHealth::new(health.clone())))
                .collect(),
            silence: SilenceWatch::new(health),
            secrets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> UpstreamKey {
        UpstreamKey {
            id: "KEY".into(),
            secret: "secret".into(),
            state: Mutex::default(),
        }
    }

    #[test]
    fn a_refusal_for_one_model_spares_the_others_and_is_probed_after_a_growing_backoff() {
        let key = key();
        let now = Instant::now();
        key.refuse(KeyScope::Model("m1"), "403".into());
        assert!(
            key.take_if_back("m2", now).is_ok(),
            "another model keeps the key"
        );
        let Err((refused, back_at)) = key.take_if_back("m1", now) else {
            panic!("m1 is refused");
        };
        assert!(refused);
        assert!(back_at >= now + FIRST_PROBE_BACKOFF - Duration::from_secs(1));
        // The probe is due: one call takes it, the next waits for the backoff again.
        let due = back_at + Duration::from_millis(1);
        assert!(key.take_if_back("m1", due).is_ok());
        assert!(key.take_if_back("m1", due).is_err());
        key.refuse(KeyScope::Model("m1"), "403 again".into());
        let Err((_, back_at)) = key.take_if_back("m1", Instant::now()) else {
            panic!("m1 is refused again");
        };
        assert!(back_at >= Instant::now() + FIRST_PROBE_BACKOFF * 2 - Duration::from_secs(1));
        key.answered("m1");
        assert!(
            key.take_if_back("m1", Instant::now()).is_ok(),
            "an answer clears it"
        );
    }

    #[test]
    fn a_rest_for_the_key_holds_every_model_until_it_ends() {
        let key = key();
        let now = Instant::now();
        key.rest(KeyScope::Key, now + Duration::from_secs(2));
        assert_eq!(
            key.take_if_back("m1", now),
            Err((false, now + Duration::from_secs(2)))
        );
        assert!(key.take_if_back("m2", now + Duration::from_secs(2)).is_ok());
    }
}

/// The gateway's channels, in configuration order, indexed when the set changes so that a request
/// finds the channels of its model, and a plan's channel by name, without looking at the others:
/// a relay runs hundreds of channels, and a request's cost must not grow with them.
#[derive(Default)]
pub struct ChannelSet {
    channels: Vec<Arc<Channel>>,
    /// Public model → positions in `channels` of the channels serving it, in order.
    by_model: HashMap<String, Vec<usize>>,
    /// Channel name → its position.
    by_name: HashMap<String, usize>,
}

impl ChannelSet {
    /// Indexes `channels`.
    pub fn new(channels: Vec<Arc<Channel>>) -> Self {
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_name = HashMap::with_capacity(channels.len());
        for (position, channel) in channels.iter().enumerate() {
            by_name.insert(channel.config.name.clone(), position);
            for model in channel.config.models.keys() {
                by_model.entry(model.clone()).or_default().push(position);
            }
        }
        Self {
            channels,
            by_model,
            by_name,
        }
    }

    /// The channels serving the public `model`, in configuration order.
    pub fn serving<'s>(&'s self, model: &str) -> impl Iterator<Item = &'s Arc<Channel>> {
        self.by_model
            .get(model)
            .into_iter()
            .flatten()
            .map(|&position| &self.channels[position])
    }

    /// The channel named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Channel>> {
        self.by_name
            .get(name)
            .map(|&position| &self.channels[position])
    }

    /// The public models some channel serves, in no particular order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(String::as_str)
    }
}

impl std::ops::Deref for ChannelSet {
    type Target = [Arc<Channel>];

    fn deref(&self) -> &Self::Target {
        &self.channels
    }
}
