//! Which plugin serves which request: the live binding table.
//!
//! In: bindings per scope (a role for one tenant or for all; translators also per protocol), each
//! with an optional canary and a failure policy. Out: for one request and role, the [`Resolved`]
//! binding to call, chosen once, so a request runs on the version it started with however often the
//! operator rebinds meanwhile. The table is immutable; a rebind builds a new one and swaps it in.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc::UnboundedSender;

use super::{Binding, PluginError, Role};

/// What a binding applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The tenant, or `None` for the global default.
    pub tenant: Option<String>,
    /// The role.
    pub role: Role,
    /// The protocol name, for translators only.
    pub protocol: Option<String>,
}

impl Scope {
    /// The store key: `global/router`, `tenant/acme/translator/anthropic`.
    pub fn key(&self) -> String {
        let mut key = match &self.tenant {
            Some(tenant) => format!("tenant/{tenant}/{}", self.role),
            None => format!("global/{}", self.role),
        };
        if let Some(protocol) = &self.protocol {
            key.push('/');
            key.push_str(protocol);
        }
        key
    }

    /// Reads a store key back; `None` for a key this host does not know.
    pub fn parse(key: &str) -> Option<Self> {
        let (tenant, rest) = match key.strip_prefix("tenant/") {
            Some(rest) => {
                let (tenant, rest) = rest.split_once('/')?;
                (Some(tenant.to_owned()), rest)
            }
            None => (None, key.strip_prefix("global/")?),
        };
        let (role, protocol) = match rest.split_once('/') {
            Some((role, protocol)) => (role, Some(protocol.to_owned())),
            None => (rest, None),
        };
        let role = Role::parse(role)?;
        (protocol.is_some() == (role == Role::Translator)).then_some(Self {
            tenant,
            role,
            protocol,
        })
    }

    /// The global scope of the same role (and protocol).
    pub fn global(&self) -> Self {
        Self {
            tenant: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// What happens to a request when its plugin fails (trap, deadline, limit, contract breach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The request gets the plugin's error.
    #[default]
    Closed,
    /// The global default plugin of the role serves the request instead; the trace says so.
    Open,
}

impl FailurePolicy {
    /// Reads `closed` or `open`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "closed" => Some(Self::Closed),
            "open" => Some(Self::Open),
            _ => None,
        }
    }

    /// `closed` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// The running tally of a canary's calls, judged against its failure threshold.
#[derive(Debug)]
pub struct CanaryStats {
    /// Failure share that rolls the canary back, in %.
    max_failure_percent: u8,
    /// Calls before the failure share is judged.
    min_calls: u64,
    calls: AtomicU64,
    failures: AtomicU64,
    tripped: AtomicBool,
}

impl CanaryStats {
    /// A fresh tally for a canary with these thresholds.
    pub fn new(max_failure_percent: u8, min_calls: u64) -> Self {
        Self {
            max_failure_percent,
            min_calls,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            tripped: AtomicBool::new(false),
        }
    }

    /// Counts one call; returns the tally `(calls, failures)` when this call takes the failure
    /// share past the threshold, once enough calls were made. Only one call ever does, so the
    /// canary is rolled back once.
    fn record(&self, failed: bool) -> Option<(u64, u64)> {
        let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let failures = self
            .failures
            .fetch_add(u64::from(failed), Ordering::Relaxed)
            + u64::from(failed);
        let over =
            calls >= self.min_calls && failures * 100 > calls * u64::from(self.max_failure_percent);
        (over && !self.tripped.swap(true, Ordering::Relaxed)).then_some((calls, failures))
    }

    /// (calls, plugin failures) so far.
    pub fn tally(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// A candidate version serving a share of a scope's requests.
#[derive(Clone)]
pub struct Canary {
    /// The candidate.
    pub binding: Arc<Binding>,
    /// Share of requests it serves, 1–99 %.
    pub percent: u8,
    /// Its thresholds and tally since it was bound (or since the gateway started).
    pub stats: Arc<CanaryStats>,
}

/// Everything bound to one scope.
#[derive(Clone)]
pub struct Slot {
    /// What serves the scope; `None` while only a canary is bound here, so the rest of the
    /// traffic falls through to the global binding.
    pub current: Option<Arc<Binding>>,
    /// What a failure does.
    pub failure_policy: FailurePolicy,
    /// A candidate beside it.
    pub canary: Option<Canary>,
}

/// Every live binding, looked up per request. Immutable: a change builds a new table
/// ([`BindingTable::with_slot`]) that shares every untouched slot.
#[derive(Clone)]
pub struct BindingTable {
    /// Where a canary that passes its failure threshold is reported, to be rolled back.
    trips: UnboundedSender<CanaryTripped>,
    /// Slots stored through the admin API.
    slots: HashMap<Scope, Arc<Slot>>,
    /// The configuration file's bindings (and the shipped translators), global only: the last
    /// resort, and what a failing global binding with the `open` policy falls back to.
    defaults: HashMap<Scope, Arc<Binding>>,
}

/// The binding one request calls for one role, and what to do if it fails.
#[derive(Clone)]
pub struct Resolved {
    /// The scope it was found under.
    pub scope: Scope,
    /// The binding to call.
    pub binding: Arc<Binding>,
    /// Set when the canary was drawn: its tally.
    pub canary: Option<Arc<CanaryStats>>,
    /// Where to report the canary passing its threshold.
    trips: UnboundedSender<CanaryTripped>,
    /// The global default to call instead if this binding fails and its policy is `open`.
    pub fallback: Option<Arc<Binding>>,
}

/// A canary's failure share passed its threshold: what to roll back and why.
#[derive(Debug, Clone)]
pub struct CanaryTripped {
    /// Its scope.
    pub scope: Scope,
    /// Why, in words.
    pub reason: String,
    /// The tripped canary's tally: the rollback applies only while this canary still runs, not to
    /// one an operator started since.
    pub stats: Arc<CanaryStats>,
}

/// What a call through a [`Resolved`] binding returned, and which plugin produced it.
pub struct Called<T> {
    /// The value.
    pub value: T,
    /// The binding that produced it (the fallback, after a fail-open).
    pub ran: Arc<Binding>,
    /// The trace entry: `name@sha`, then ` (canary)` when the canary ran, or
    /// ` (fail-open after name@sha: class)` when the fallback served.
    pub trace: String,
    /// Set when the canary produced the value: the attempt's later calls of the same plugin (its
    /// answer translation, its stream) count against the canary too.
    pub canary: Option<CanaryTally>,
    /// The global default that serves instead should a later call of the same plugin fail, when
    /// its binding's policy is `open` (none once the fallback itself ran).
    pub fallback: Option<Arc<Binding>>,
}

/// Where the later calls of a canary that ran are counted.
#[derive(Clone)]
pub struct CanaryTally {
    stats: Arc<CanaryStats>,
    scope: Scope,
    plugin: String,
    trips: UnboundedSender<CanaryTripped>,
}

impl CanaryTally {
    /// Counts a later call of the attempt, failed when `error` is this plugin's own failure.
    pub fn count_outcome(&self, error: Option<&PluginError>) {
        let culprit = error.and_then(PluginError::culprit);
        self.count(culprit.is_some_and(|(plugin, _)| plugin.to_string() == self.plugin));
    }

    /// Counts one call of the canary; reports the trip when this call causes it.
    pub fn count(&self, failed: bool) {
        let Some((calls, failures)) = self.stats.record(failed) else {
            return;
        };
        // The receiver lives as long as the gateway; a send after shutdown has no one to tell.
        let _ = self.trips.send(CanaryTripped {
            stats: self.stats.clone(),
            scope: self.scope.clone(),
            reason: format!(
                "canary {} failed {failures} of {calls} calls, above the {} % allowed",
                self.plugin, self.stats.max_failure_percent
            ),
        });
    }
}

impl<T> Called<T> {
    /// The same call with its value checked and converted.
    pub fn try_map<U, E>(self, convert: impl FnOnce(T) -> Result<U, E>) -> Result<Called<U>, E> {
        Ok(Called {
            value: convert(self.value)?,
            ran: self.ran,
            trace: self.trace,
            canary: self.canary,
            fallback: self.fallback,
        })
    }
}

impl BindingTable {
    /// A table of the configuration file's bindings and no stored slot; tripped canaries are
    /// reported to `trips`.
    pub fn new(
        defaults: HashMap<Scope, Arc<Binding>>,
        trips: UnboundedSender<CanaryTripped>,
    ) -> Self {
        Self {
            trips,
            slots: HashMap::new(),
            defaults,
        }
    }

    /// This table with one scope's slot replaced (or removed).
    pub fn with_slot(&self, scope: Scope, slot: Option<Slot>) -> Self {
        let mut next = self.clone();
        match slot {
            Some(slot) if slot.current.is_some() || slot.canary.is_some() => {
                next.slots.insert(scope, Arc::new(slot));
            }
            _ => {
                next.slots.remove(&scope);
            }
        }
        next
    }

    /// The stored slot of a scope.
    pub fn slot(&self, scope: &Scope) -> Option<&Slot> {
        self.slots.get(scope).map(Arc::as_ref)
    }

    /// What serves a scope's requests outside its canary: its own binding, else the global one.
    pub fn serving(&self, scope: &Scope) -> Option<&Arc<Binding>> {
        let global = Scope {
            tenant: None,
            ..scope.clone()
        };
        [scope, &global]
            .into_iter()
            .find_map(|scope| self.slot(scope)?.current.as_ref())
    }

    /// The configuration file's bindings.
    pub fn defaults(&self) -> impl Iterator<Item = (&Scope, &Arc<Binding>)> {
        self.defaults.iter()
    }

    /// Protocols some translator is bound for, globally or for some tenant.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.defaults
            .keys()
            .chain(self.slots.keys())
            .filter_map(|scope| scope.protocol.as_deref())
    }

    /// [`BindingTable::resolve`], or the error that names what lacks a binding.
    pub fn require(
        &self,
        tenant: &str,
        role: Role,
        protocol: Option<&str>,
    ) -> Result<Resolved, PluginError> {
        self.resolve(tenant, role, protocol)
            .ok_or_else(|| PluginError::Unbound {
                role,
                what: protocol.map_or_else(
                    || format!("tenant `{tenant}`"),
                    |protocol| format!("protocol `{protocol}`"),
                ),
            })
    }

    /// The binding a request of `tenant` calls for `role` (and `protocol`, for translators): the
    /// tenant's own, else the global one, else the configuration file's. A canary is drawn here,
    /// once per request and role.
    pub fn resolve(&self, tenant: &str, role: Role, protocol: Option<&str>) -> Option<Resolved> {
        let global = Scope {
            tenant: None,
            role,
            protocol: protocol.map(str::to_owned),
        };
        let own = Scope {
            tenant: Some(tenant.to_owned()),
            ..global.clone()
        };
        let default = self.defaults.get(&global);
        let global_current = self
            .slots
            .get(&global)
            .and_then(|slot| slot.current.clone())
            .or_else(|| default.cloned());
        for (scope, fallback) in [(own, global_current), (global.clone(), default.cloned())] {
            let Some(slot) = self.slots.get(&scope) else {
                continue;
            };
            let (binding, canary) = match (&slot.canary, &slot.current) {
                (Some(canary), _) if rand::random_range(0..100u8) < canary.percent => {
                    (canary.binding.clone(), Some(canary.stats.clone()))
                }
                (_, Some(current)) => (current.clone(), None),
                (_, None) => continue,
            };
            let fallback = fallback
                .filter(|_| slot.failure_policy == FailurePolicy::Open)
                .filter(|fallback| fallback.plugin() != binding.plugin());
            return Some(Resolved {
                scope,
                binding,
                canary,
                trips: self.trips.clone(),
                fallback,
            });
        }
        Some(Resolved {
            scope: global,
            binding: default?.clone(),
            canary: None,
            trips: self.trips.clone(),
            fallback: None,
        })
    }
}

impl Resolved {
    /// Calls the binding; counts the call against a canary (reporting it when it passes its
    /// threshold); when the plugin itself failed and the policy is `open`, calls the global default
    /// instead.
    pub async fn call<T, Fut>(
        &self,
        call: impl Fn(Arc<Binding>) -> Fut,
    ) -> Result<Called<T>, PluginError>
    where
        Fut: Future<Output = Result<T, PluginError>>,
    {
        let outcome = call(self.binding.clone()).await;
        // A full pool, or a tenant's full share of it, is load, not the plugin's failure.
        let failed = outcome.as_ref().is_err_and(|error| {
            !matches!(
                error,
                PluginError::PoolFull { .. } | PluginError::TenantShare { .. }
            )
        });
        let tally = self.tally();
        if let Some(tally) = &tally {
            tally.count(failed);
        }
        let ran = self.binding.plugin().to_string();
        let marker = if self.canary.is_some() {
            " (canary)"
        } else {
            ""
        };
        match outcome {
            Ok(value) => Ok(Called {
                value,
                ran: self.binding.clone(),
                trace: format!("{ran}{marker}"),
                canary: tally,
                fallback: self.fallback.clone(),
            }),
            Err(error) if error.culprit().is_some() && self.fallback.is_some() => {
                let fallback = self.fallback.as_ref().expect("checked in the guard");
                tracing::warn!(%error, fallback = %fallback.plugin(), "plugin failed; failing open");
                fallback.count_fail_open();
                let value = call(fallback.clone()).await?;
                Ok(Called {
                    value,
                    ran: fallback.clone(),
                    trace: format!(
                        "{} (fail-open after {ran}{marker}: {})",
                        fallback.plugin(),
                        error.class()
                    ),
                    canary: None,
                    fallback: None,
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Where the drawn canary's calls are counted, if the canary was drawn.
    fn tally(&self) -> Option<CanaryTally> {
        Some(CanaryTally {
            stats: self.canary.clone()?,
            scope: self.scope.clone(),
            plugin: self.binding.plugin().to_string(),
            trips: self.trips.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_their_store_keys() {
        let scopes = [
            Scope {
                tenant: None,
                role: Role::Router,
                protocol: None,
            },
            Scope {
                tenant: Some("acme".into()),
                role: Role::Billing,
                protocol: None,
            },
            Scope {
                tenant: Some("acme".into()),
                role: Role::Translator,
                protocol: Some("anthropic".into()),
            },
        ];
        for scope in scopes {
            assert_eq!(Scope::parse(&scope.key()), Some(scope.clone()), "{scope}");
        }
        assert_eq!(
            Scope::parse("tenant/acme/translator/gemini").map(|scope| scope.global().key()),
            Some("global/translator/gemini".to_owned())
        );
        for unknown in [
            "global/translator",
            "global/router/openai",
            "tenant/acme",
            "elsewhere/router",
            "global/auditor",
        ] {
            assert_eq!(Scope::parse(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn failure_policies_read_and_print_the_same_names() {
        for policy in [FailurePolicy::Closed, FailurePolicy::Open] {
            assert_eq!(FailurePolicy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(FailurePolicy::parse("sometimes"), None);
    }

    #[test]
    fn a_canary_trips_once_past_its_threshold_after_its_minimum_calls() {
        let stats = CanaryStats::new(20, 5);
        // Four failures in four calls: still under the minimum number of calls.
        assert!((0..4).all(|_| stats.record(true).is_none()));
        assert_eq!(
            stats.record(false),
            Some((5, 4)),
            "4 of 5 failed, above 20 %"
        );
        assert_eq!(stats.record(true), None, "it trips once");
        assert_eq!(stats.tally(), (6, 5));

        let healthy = CanaryStats::new(20, 5);
        // One failure in five is 20 %: not above the threshold.
        assert!((0..4).all(|_| healthy.record(false).is_none()));
        assert_eq!(healthy.record(true), None);
    }
}
