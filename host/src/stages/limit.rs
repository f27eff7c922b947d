//! Limit: what a key may do before anything is routed — its model allow-list, requests per minute,
//! tokens per minute — and how many requests its tenant may have in flight.
//!
//! In: the [`Caller`] (key and tenant limits) and the client's request. Out: a [`LimitPermit`] the
//! request holds until it ends, or a [`LimitError`] (404 `model_not_found`, 429
//! `rate_limit_exceeded` with `retry-after`). Next: route. State is in memory, per gateway
//! instance: token buckets refill continuously at the per-minute rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::request::ClientRequest;
use crate::stages::auth::Caller;

/// Why a request is over a limit.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The key may not use this model (404 `model_not_found`, as OpenAI answers).
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotAllowed {
        /// The model asked for.
        model: String,
    },
    /// Over the key's requests or tokens per minute, or the tenant's concurrency cap (429).
    #[error("Rate limit reached for {what}; retry after {} ms.", .retry_after.as_millis())]
    RateLimited {
        /// `requests per minute`, `tokens per minute`, `concurrent requests` or open streams.
        what: &'static str,
        /// When the request would pass.
        retry_after: Duration,
    },
}

/// A token bucket: `capacity` per minute, refilled continuously.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    tokens: f64,
    refreshed: Instant,
}

impl Bucket {
    fn new(capacity: f64, now: Instant) -> Self {
        Self {
            capacity,
            tokens: capacity,
            refreshed: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let per_second = self.capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.refreshed).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(self.capacity);
        self.refreshed = now;
    }

    /// The bucket at `capacity`, the key's limit of the moment (changed terms are in force for
    /// the next request): a raised limit adds what it raised at once, a lowered one keeps at most
    /// the new capacity.
    fn at_capacity(&mut self, capacity: f64) -> &mut Self {
        if self.capacity != capacity {
            let raised = (capacity - self.capacity).max(0.0);
            self.tokens = (self.tokens + raised).min(capacity);
            self.capacity = capacity;
        }
        self
    }

    /// Takes `amount`, or says how long until it could.
    fn take(&mut self, amount: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= amount {
            self.tokens -= amount;
            return Ok(());
        }
        let per_second = self.capacity / 60.0;
        let missing = amount.min(self.capacity) - self.tokens;
        Err(Duration::from_secs_f64((missing / per_second).max(0.001)))
    }

    /// Gives back (or, negative, takes more than) what was reserved, once the real figure is known.
    fn adjust(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + amount).min(self.capacity);
    }
}

/// Token buckets by key id.
type Buckets = Arc<Mutex<HashMap<String, Bucket>>>;
/// Requests in flight by tenant.
type InFlight = Arc<Mutex<HashMap<String, u32>>>;

/// The in-memory limit state of one gateway.
pub struct Limiter {
    requests: Buckets,
    tokens: Buckets,
    in_flight: InFlight,
    /// Open streams by tenant: each holds a plugin instance for its whole life.
    open_streams: InFlight,
    /// The plugin instances calls and streams may hold at once (most of `plugins.max_instances`).
    instance_pool: u32,
    /// A fixed cap on each tenant's open streams instead of the fair share.
    streams_per_tenant: Option<u32>,
}

impl Limiter {
    /// Limits for a gateway whose calls and streams may hold `instance_pool` plugin instances.
    pub fn new(instance_pool: u32, streams_per_tenant: Option<u32>) -> Self {
        Self {
            requests: Buckets::default(),
            tokens: Buckets::default(),
            in_flight: InFlight::default(),
            open_streams: InFlight::default(),
            instance_pool,
            streams_per_tenant,
        }
    }

    /// How many streams a tenant with `own` open may hold, `open` being every tenant's count: its
    /// fair share of the pool among the tenants that have streams open (this one included).
    fn stream_share(&self, open: &HashMap<String, u32>, own: u32) -> u32 {
        if let Some(fixed) = self.streams_per_tenant {
            return fixed;
        }
        let holders = open.len() + usize::from(own == 0);
        let share = crate::plugin::fair_share(self.instance_pool as usize, holders);
        u32::try_from(share).unwrap_or(u32::MAX)
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few arithmetic steps that leave the maps consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What an admitted request holds: its tenant's in-flight slot, its open-stream slot and its
/// token reservation.
pub struct LimitPermit {
    /// The tenant's in-flight counter and name.
    tenant: Option<(InFlight, String)>,
    /// The tenant's open-stream counter and name, for a stream.
    stream: Option<(InFlight, String)>,
    /// The key's token bucket, key id and the tokens reserved.
    tokens: Option<(Buckets, String, u64)>,
}

impl LimitPermit {
    /// Corrects the token reservation with the tokens the call really used.
    pub fn settle_tokens(&mut self, used: u64) {
        if let Some((buckets, key, reserved)) = self.tokens.take()
            && let Some(bucket) = locked(&buckets).get_mut(&key)
        {
            bucket.adjust(reserved as f64 - used as f64, Instant::now());
        }
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        if let Some((in_flight, tenant)) = &self.tenant
            && let Some(count) = locked(in_flight).get_mut(tenant)
        {
            *count = count.saturating_sub(1);
        }
        if let Some((open, tenant)) = &self.stream {
            let mut open = locked(open);
            if let Some(count) = open.get_mut(tenant) {
                *count = count.saturating_sub(1);
                // Only tenants with streams open count as sharing the pool.
                if *count == 0 {
                    open.remove(tenant);
                }
            }
        }
    }
}

/// Checks every limit of the caller for this request, and reserves what the request will use.
pub fn admit(
    limiter: &Limiter,
    caller: &Caller,
    request: &ClientRequest,
) -> Result<LimitPermit, LimitError> {
    if !caller.allowed_models.is_empty() && !caller.allowed_models.contains(&request.model) {
        return Err(LimitError::ModelNotAllowed {
            model: request.model.clone(),
        });
    }
    let now = Instant::now();
    if let Some(rpm) = caller.rpm {
        locked(&limiter.requests)
            .entry(caller.key_id.clone())
            .or_insert_with(|| Bucket::new(f64::from(rpm), now))
            .at_capacity(f64::from(rpm))
            .take(1.0, now)
            .map_err(|retry_after| LimitError::RateLimited {
                what: "requests per minute",
                retry_after,
            })?;
    }
    let mut permit = LimitPermit {
        tenant: None,
        stream: None,
        tokens: None,
    };
    if let Some(tpm) = caller.tpm {
        // The prompt is reserved up front; the output is counted when the real usage is known.
        let reserved = request.estimated_input_tokens;
        locked(&limiter.tokens)
            .entry(caller.key_id.clone())
            .or_insert_with(|| Bucket::new(tpm as f64, now))
            .at_capacity(tpm as f64)
            .take(reserved as f64, now)
            .map_err(|retry_after| LimitError::RateLimited {
                what: "tokens per minute",
                retry_after,
            })?;
        permit.tokens = Some((limiter.tokens.clone(), caller.key_id.clone(), reserved));
    }
    if let Some(cap) = caller.max_concurrency {
        let mut in_flight = locked(&limiter.in_flight);
        let count = in_flight.entry(caller.tenant.clone()).or_insert(0);
        if *count >= cap {
            drop(in_flight);
            permit.settle_tokens(0);
            return Err(LimitError::RateLimited {
                what: "concurrent requests",
                retry_after: Duration::from_secs(1),
            });
        }
        *count += 1;
        permit.tenant = Some((limiter.in_flight.clone(), caller.tenant.clone()));
    }
    if request.stream {
        let mut open = locked(&limiter.open_streams);
        let own = open.get(&caller.tenant).copied().unwrap_or(0);
        if own >= limiter.stream_share(&open, own) {
            drop(open);
            permit.settle_tokens(0);
            return Err(LimitError::RateLimited {
                what: "open streams (this tenant's share of the gateway)",
                retry_after: Duration::from_secs(1),
            });
        }
        *open.entry(caller.tenant.clone()).or_insert(0) += 1;
        permit.stream = Some((limiter.open_streams.clone(), caller.tenant.clone()));
    }
    Ok(permit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_per_minute_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(60.0, start);
        for _ in 0..60 {
            bucket.take(1.0, start).expect("a full minute's worth");
        }
        let wait = bucket.take(1.0, start).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        bucket
            .take(1.0, start + Duration::from_secs(1))
            .expect("refilled one");
    }

    #[test]
    fn a_stream_share_shrinks_with_the_tenants_that_hold_streams() {
        let limiter = Limiter::new(100, None);
        let mut open = HashMap::new();
        assert_eq!(
            limiter.stream_share(&open, 0),
            90,
            "a lone tenant: the pool less a tenth"
        );
        open.insert("a".to_owned(), 90);
        assert_eq!(limiter.stream_share(&open, 0), 45, "a newcomer halves it");
        assert_eq!(limiter.stream_share(&open, 90), 90);
        for tenant in 0..200 {
            open.insert(format!("t{tenant}"), 1);
        }
        assert_eq!(limiter.stream_share(&open, 1), 1, "never below a hundredth");
        assert_eq!(Limiter::new(100, Some(7)).stream_share(&open, 1), 7);
    }

    #[test]
    fn adjusting_returns_unused_reservations() {
        let start = Instant::now();
        let mut bucket = Bucket::new(100.0, start);
        bucket.take(80.0, start).expect("fits");
        bucket.adjust(80.0 - 30.0, start);
        bucket.take(70.0, start).expect("50 were given back");
        assert!(bucket.take(1.0, start).is_err());
    }
}
