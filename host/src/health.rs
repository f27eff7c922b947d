//! Health: what the gateway knows about each channel right now — latency and time-to-first-byte
//! averages, recent error rate, calls in flight, and a circuit breaker. Routers receive these
//! figures; the flow asks [`ChannelHealth::admit`] before each attempt and reports how it went.
//!
//! Circuit: closed → open after `failure_threshold` consecutive failures, or when the recent error
//! rate passes `error_rate_permille` over at least `min_samples` calls; open → half-open once
//! `cooldown` has passed, when one probe call is let through; the probe's success closes the
//! circuit, its failure opens it again. Only the channel's own failures count (connection,
//! timeout, 5xx, overload, rate limit, broken answers), never the client's invalid requests.
//! An open circuit only moves its route to the end of the plan: when every route is held back,
//! they are tried anyway ([`ChannelHealth::admit_anyway`]), so a breaker never causes an outage.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::plugin::router::Circuit;

/// Circuit-breaker settings, from the `[health]` config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Recent error rate, in thousandths, that opens the circuit.
    pub error_rate_permille: u32,
    /// Calls needed before the error rate is trusted.
    pub min_samples: u32,
    /// How long an open circuit rejects calls before a probe, in milliseconds.
    pub cooldown_ms: u64,
    /// How long a call may wait for its response headers before the channel is asked whether it
    /// still answers anything, in milliseconds; 0 turns the silence probe off.
    pub silence_probe_after_ms: u64,
    /// How long that probe waits for its own response headers before the channel is judged
    /// silent, in milliseconds.
    pub silence_probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            error_rate_permille: 500,
            min_samples: 20,
            cooldown_ms: 5_000,
            silence_probe_after_ms: 1_000,
            silence_probe_timeout_ms: 1_500,
        }
    }
}

/// Weight of the newest call in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct State {
    latency_ewma_ms: Option<f64>,
    ttfb_ewma_ms: Option<f64>,
    error_ewma: f64,
    samples: u32,
    consecutive_failures: u32,
    circuit: CircuitState,
}

/// The live health of one channel.
#[derive(Debug)]
pub struct ChannelHealth {
    config: HealthConfig,
    in_flight: AtomicU32,
    state: Mutex<State>,
}

/// The figures a router sees.
#[derive(Debug, Clone, Copy)]
pub struct HealthSnapshot {
    /// Circuit state.
    pub circuit: Circuit,
    /// Mean latency of recent calls, in milliseconds.
    pub latency_ewma_ms: Option<u32>,
    /// Mean time to first byte of recent calls, in milliseconds.
    pub ttfb_ewma_ms: Option<u32>,
    /// Recent error rate, in thousandths.
    pub error_rate_permille: u32,
    /// Calls in flight now.
    pub in_flight: u32,
}

/// An admitted call: counts as in flight until dropped. Report its end with `succeeded`,
/// `failed` or `neutral`. One admission may cover several healths (a channel and its model).
pub struct Admission {
    parts: Vec<Part>,
}

struct Part {
    health: Arc<ChannelHealth>,
    probe: bool,
    finished: bool,
}

impl ChannelHealth {
    /// A healthy channel with no history.
    pub fn new(config: HealthConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            in_flight: AtomicU32::new(0),
            state: Mutex::new(State {
                latency_ewma_ms: None,
                ttfb_ewma_ms: None,
                error_ewma: 0.0,
                samples: 0,
                consecutive_failures: 0,
                circuit: CircuitState::Closed,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a panicked holder cannot corrupt it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The router's view now.
    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let state = self.state();
        let circuit = match state.circuit {
            CircuitState::Closed => Circuit::Closed,
            CircuitState::Open { until } if now < until => Circuit::Open,
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => Circuit::HalfOpen,
        };
        HealthSnapshot {
            circuit,
            latency_ewma_ms: state.latency_ewma_ms.map(|ms| ms.round() as u32),
            ttfb_ewma_ms: state.ttfb_ewma_ms.map(|ms| ms.round() as u32),
            error_rate_permille: (state.error_ewma * 1000.0).round() as u32,
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Lets a call through only if every one of `healths` admits it (see [`ChannelHealth::admit`]).
    pub fn admit_all(healths: &[&Arc<Self>], now: Instant) -> Option<Admission> {
        let mut parts = Vec::with_capacity(healths.len());
        for health in healths {
            // A refusal drops the parts admitted so far, which releases their probes.
            parts.extend(health.admit(now)?.parts);
        }
        Some(Admission { parts })
    }

    /// Lets a call through whatever the circuits say: the last resort when every route of a plan
    /// is held back, so that a breaker reorders traffic but never refuses it alone. Its success
    /// closes the circuits, its failure keeps them open.
    pub fn admit_anyway(healths: &[&Arc<Self>]) -> Admission {
        let parts = healths
            .iter()
            .map(|health| {
                health.in_flight.fetch_add(1, Ordering::Relaxed);
                Part {
                    health: Arc::clone(health),
                    probe: false,
                    finished: false,
                }
            })
            .collect();
        Admission { parts }
    }

    /// Lets a call through unless the circuit is open (or half-open with its probe under way).
    pub fn admit(self: &Arc<Self>, now: Instant) -> Option<Admission> {
        let mut state = self.state();
        let probe = match state.circuit {
            CircuitState::Closed => false,
            CircuitState::Open { until } if now < until => return None,
            CircuitState::HalfOpen { probing: true } => return None,
            CircuitState::Open { .. } | CircuitState::HalfOpen { probing: false } => {
                state.circuit = CircuitState::HalfOpen { probing: true };
                true
            }
        };
        drop(state);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Admission {
            parts: vec![Part {
                health: self.clone(),
                probe,
                finished: false,
            }],
        })
    }
}

impl Admission {
    /// The call succeeded; `ttfb` is the time to the first byte (stream) or the whole answer.
    pub fn succeeded(mut self, latency: Duration, ttfb: Duration) {
        for part in &mut self.parts {
            part.finished = true;
            part.health.record_success(latency, ttfb);
        }
    }

    /// The call failed through the upstream's fault. When the upstream `answered` (with an error
    /// status or a broken answer) it is reachable, so only the most specific health — the last one
    /// given to [`ChannelHealth::admit_all`], the model's — counts the failure; a connection
    /// failure or timeout counts against every part.
    pub fn failed(mut self, now: Instant, answered: bool) {
        let last = self.parts.len().saturating_sub(1);
        for (index, part) in self.parts.iter_mut().enumerate() {
            part.finished = true;
            if answered && index != last {
                if part.probe {
                    part.health.state().circuit = CircuitState::HalfOpen { probing: false };
                }
                continue;
            }
            part.health.record_failure(part.probe, now);
        }
    }

    /// The call ended without saying anything about the channel (the client's fault, a plugin's).
    pub fn neutral(mut self) {
        for part in &mut self.parts {
            part.finished = true;
            if part.probe {
                // Let the next call probe instead.
                part.health.state().circuit = CircuitState::HalfOpen { probing: false };
            }
        }
    }
}

impl ChannelHealth {
    /// Opens the circuit now, whatever its state: the channel was judged silent.
    pub fn trip(&self, now: Instant) {
        self.state().circuit = CircuitState::Open {
            until: now + Duration::from_millis(self.config.cooldown_ms),
        };
    }

    fn record_success(&self, latency: Duration, ttfb: Duration) {
        let mut state = self.state();
        let ewma = |old: Option<f64>, new: f64| {
            Some(old.map_or(new, |old| old + EWMA_ALPHA * (new - old)))
        };
        state.latency_ewma_ms = ewma(state.latency_ewma_ms, latency.as_secs_f64() * 1000.0);
        state.ttfb_ewma_ms = ewma(state.ttfb_ewma_ms, ttfb.as_secs_f64() * 1000.0);
        state.error_ewma *= 1.0 - EWMA_ALPHA;
        state.samples = state.samples.saturating_add(1);
        state.consecutive_failures = 0;
        state.circuit = CircuitState::Closed;
    }

    fn record_failure(&self, probe: bool, now: Instant) {
        let config = &self.config;
        let mut state = self.state();
        state.error_ewma += EWMA_ALPHA * (1.0 - state.error_ewma);
        state.samples = state.samples.saturating_add(1);
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let too_many = state.consecutive_failures >= config.failure_threshold;
        let too_often = state.samples >= config.min_samples
            && state.error_ewma * 1000.0 >= f64::from(config.error_rate_permille);
        if probe || too_many || too_often {
            state.circuit = CircuitState::Open {
                until: now + Duration::from_millis(config.cooldown_ms),
            };
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished && self.probe {
            self.health.state().circuit = CircuitState::HalfOpen { probing: false };
        }
    }
}

/// Whether a channel still answers, for the calls waiting on it for response headers.
///
/// A whole answer's headers come only when the model has finished, so a long wait proves nothing
/// by itself; a channel that accepts connections and never answers looks the same for up to the
/// first-byte timeout, which the failover budget cannot outlast. So a call that has waited
/// `silence_probe_after_ms` asks: did the channel answer the headers of any call sent after this
/// one, within that time? If not, one small streamed request (the probe, shared by every waiting
/// call) is sent; providers send a stream's headers at once. No headers within
/// `silence_probe_timeout_ms`: the channel is silent, and every call sent before the probe leaves
/// it for the next route.
#[derive(Debug)]
pub struct SilenceWatch {
    after: Duration,
    probe_timeout: Duration,
    state: Mutex<SilenceState>,
    /// Bumped when a probe ends.
    probe_ended: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct SilenceState {
    /// The send time of the latest call whose response headers came.
    answered_sent_at: Option<Instant>,
    /// The send time of the probe in flight.
    probe_sent_at: Option<Instant>,
    /// The send time of the latest probe that got no headers in time.
    silent_at: Option<Instant>,
}

/// What a call without response headers should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilenceCheck {
    /// A probe sent after the call got no answer: leave.
    Silent,
    /// A call sent after this one was answered; ask again at `until`.
    Answering {
        /// When that evidence is too old.
        until: Instant,
    },
    /// A probe is under way: wait for it to end.
    Probing,
    /// Send the probe now; report it with [`SilenceWatch::probed`].
    Probe,
}

impl SilenceWatch {
    /// A watch with the `[health]` settings.
    pub fn new(config: &HealthConfig) -> Self {
        Self {
            after: Duration::from_millis(config.silence_probe_after_ms),
            probe_timeout: Duration::from_millis(config.silence_probe_timeout_ms),
            state: Mutex::default(),
            probe_ended: tokio::sync::watch::Sender::new(0),
        }
    }

    /// How long a call waits for headers before checking; `None` when probes are off.
    pub fn after(&self) -> Option<Duration> {
        (!self.after.is_zero()).then_some(self.after)
    }

    /// How long the probe waits for its headers.
    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    fn state(&self) -> MutexGuard<'_, SilenceState> {
        // Every update leaves the state consistent, so a panicked holder cannot corrupt it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The response headers of a call sent at `sent_at` came.
    pub fn heard(&self, sent_at: Instant) {
        let mut state = self.state();
        state.answered_sent_at = state.answered_sent_at.max(Some(sent_at));
    }

    /// Asked by a call sent at `sent_at` that is still waiting for its headers. [`SilenceCheck::Probe`]
    /// makes the caller the prober.
    pub fn check(&self, sent_at: Instant, now: Instant) -> SilenceCheck {
        let mut state = self.state();
        if state.silent_at.is_some_and(|silent| silent >= sent_at) {
            return SilenceCheck::Silent;
        }
        if let Some(answered) = state.answered_sent_at
            && answered >= sent_at
            && answered + self.after > now
        {
            return SilenceCheck::Answering {
                until: answered + self.after,
            };
        }
        if state.probe_sent_at.is_some() {
            return SilenceCheck::Probing;
        }
        state.probe_sent_at = Some(now);
        SilenceCheck::Probe
    }

    /// The probe ended: it got headers (`Some(true)`), got none in time (`Some(false)`), or could
    /// not be sent (`None`).
    pub fn probed(&self, answered: Option<bool>) {
        let mut state = self.state();
        if let Some(sent_at) = state.probe_sent_at.take() {
            match answered {
                Some(true) => state.answered_sent_at = state.answered_sent_at.max(Some(sent_at)),
                Some(false) => state.silent_at = state.silent_at.max(Some(sent_at)),
                None => {}
            }
        }
        drop(state);
        self.probe_ended.send_modify(|ended| *ended += 1);
    }

    /// Follows the ends of probes.
    pub fn probe_ends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.probe_ended.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            failure_threshold: 3,
            error_rate_permille: 500,
            min_samples: 20,
            cooldown_ms: 1_000,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_a_probe() {
        let health = ChannelHealth::new(config());
        let start = Instant::now();
        for _ in 0..3 {
            health.admit(start).expect("closed").failed(start, false);
        }
        assert_eq!(health.snapshot(start).circuit, Circuit::Open);
        assert!(health.admit(start + Duration::from_millis(500)).is_none());
        let later = start + Duration::from_millis(1_500);
        assert_eq!(health.snapshot(later).circuit, Circuit::HalfOpen);
        let probe = health.admit(later).expect("one probe after the cooldown");
        assert!(health.admit(later).is_none(), "only one probe at a time");
        probe.succeeded(Duration::from_millis(10), Duration::from_millis(5));
        assert_eq!(health.snapshot(later).circuit, Circuit::Closed);
        assert_eq!(health.snapshot(later).in_flight, 0);
    }

    #[test]
    fn a_failed_probe_opens_the_circuit_again() {
        let health = ChannelHealth::new(config());
        let start = Instant::now();
        for _ in 0..3 {
            health.admit(start).expect("closed").failed(start, false);
        }
        let later = start + Duration::from_millis(1_500);
        health.admit(later).expect("probe").failed(later, false);
        assert_eq!(health.snapshot(later).circuit, Circuit::Open);
    }

    #[test]
    fn a_joint_admission_needs_every_part_and_reports_to_all() {
        let channel = ChannelHealth::new(config());
        let model = ChannelHealth::new(config());
        let now = Instant::now();
        for _ in 0..3 {
            ChannelHealth::admit_all(&[&channel, &model], now)
                .expect("both closed")
                .failed(now, true);
        }
        assert_eq!(model.snapshot(now).circuit, Circuit::Open);
        assert_eq!(
            channel.snapshot(now).circuit,
            Circuit::Closed,
            "answered failures are the model's"
        );
        for _ in 0..3 {
            ChannelHealth::admit_all(&[&channel], now)
                .expect("closed")
                .failed(now, false);
        }
        assert_eq!(channel.snapshot(now).circuit, Circuit::Open);
        let other_model = ChannelHealth::new(config());
        assert!(ChannelHealth::admit_all(&[&other_model, &channel], now).is_none());
        assert_eq!(
            other_model.snapshot(now).in_flight,
            0,
            "a refused admission holds nothing"
        );
    }

    #[test]
    fn averages_and_in_flight_are_reported() {
        let health = ChannelHealth::new(config());
        let now = Instant::now();
        let first = health.admit(now).expect("closed");
        assert_eq!(health.snapshot(now).in_flight, 1);
        first.succeeded(Duration::from_millis(100), Duration::from_millis(40));
        health
            .admit(now)
            .expect("closed")
            .succeeded(Duration::from_millis(200), Duration::from_millis(40));
        let snapshot = health.snapshot(now);
        assert_eq!(snapshot.latency_ewma_ms, Some(120));
        assert_eq!(snapshot.ttfb_ewma_ms, Some(40));
        assert_eq!(snapshot.in_flight, 0);
        health.admit(now).expect("closed").failed(now, false);
        assert_eq!(health.snapshot(now).error_rate_permille, 200);
    }

    fn watch() -> SilenceWatch {
        SilenceWatch::new(&HealthConfig {
            silence_probe_after_ms: 1_000,
            ..HealthConfig::default()
        })
    }

    #[test]
    fn a_call_is_vouched_for_by_a_later_call_answered_recently() {
        let watch = watch();
        let sent = Instant::now();
        let later = sent + Duration::from_millis(100);
        watch.heard(sent - Duration::from_millis(1));
        assert_eq!(
            watch.check(sent, sent + Duration::from_millis(1_000)),
            SilenceCheck::Probe,
            "an answer to an earlier call proves nothing"
        );
        watch.probed(None);
        watch.heard(later);
        let check_at = sent + Duration::from_millis(1_000);
        assert_eq!(
            watch.check(sent, check_at),
            SilenceCheck::Answering {
                until: later + Duration::from_millis(1_000)
            }
        );
        assert_eq!(
            watch.check(sent, later + Duration::from_millis(1_000)),
            SilenceCheck::Probe,
            "evidence goes stale"
        );
    }

    #[test]
    fn one_probe_at_a_time_and_its_failure_silences_the_calls_sent_before_it() {
        let watch = watch();
        let sent = Instant::now();
        let now = sent + Duration::from_millis(1_000);
        assert_eq!(watch.check(sent, now), SilenceCheck::Probe);
        assert_eq!(watch.check(sent, now), SilenceCheck::Probing);
        watch.probed(Some(false));
        assert_eq!(watch.check(sent, now), SilenceCheck::Silent);
        let after_the_probe = now + Duration::from_millis(1);
        assert_eq!(
            watch.check(
                after_the_probe,
                after_the_probe + Duration::from_millis(1_000)
            ),
            SilenceCheck::Probe,
            "a call sent after the failed probe needs a probe of its own"
        );
        watch.probed(Some(true));
        assert_eq!(
            watch.check(
                after_the_probe,
                after_the_probe + Duration::from_millis(1_000)
            ),
            SilenceCheck::Answering {
                until: after_the_probe + Duration::from_millis(2_000)
            }
        );
    }

    #[test]
    fn a_probe_not_sent_lets_the_next_call_probe() {
        let watch = watch();
        let sent = Instant::now();
        let now = sent + Duration::from_millis(1_000);
        assert_eq!(watch.check(sent, now), SilenceCheck::Probe);
        watch.probed(None);
        assert_eq!(watch.check(sent, now), SilenceCheck::Probe);
    }
}
