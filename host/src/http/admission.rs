//! Admission: what a client must show before the gateway spends descriptors, memory or log lines
//! on it.
//!
//! - Connections that have not yet authenticated a request are capped
//!   (`server.max_unauthenticated_connections`); at the cap the oldest of them is closed, so a
//!   flood of idle or trickling connections gives way to the clients that arrive after it.
//! - Failed authentication (API key or admin token) is throttled per client address
//!   (`server.failed_auth_per_second`) and logged as counts per interval, not one line each. A
//!   valid credential is never refused by the throttle, whatever its address.
//! - A request body must arrive within `server.body_read_timeout_ms`, extended by one second per
//!   `server.body_min_bytes_per_second` bytes received.
//!
//! `listen` makes one [`ClientConnection`] per accepted connection and puts it in the extensions
//! of each of its requests; the handlers (and the admin guard) report what authentication found.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// How long an address stays throttled once it used up its failed attempts, and what its
/// `retry-after` says.
const THROTTLED_FOR: Duration = Duration::from_secs(10);
/// How often failed authentications are logged, as counts per address.
pub const FAILED_AUTHENTICATION_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Addresses tracked at once; past it, new addresses share one record (and one throttle).
const TRACKED_ADDRESSES: usize = 65_536;
/// Addresses named in one interval's log lines; the rest are summed in one more line.
const LOGGED_ADDRESSES: usize = 20;

/// The settings of admission, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Connections without an authenticated request, at most.
    pub max_unauthenticated_connections: usize,
    /// Failed authentications a second one address may make before it is throttled.
    pub failed_auth_per_second: u32,
    /// A body's time to arrive before the minimum-rate extension.
    pub body_read_timeout: Duration,
    /// Each this many bytes received extend the body's deadline by one second; 0: no extension.
    pub body_min_bytes_per_second: u64,
}

/// The gateway's admission state, shared by every serving worker.
pub struct ClientAdmission {
    limits: AdmissionLimits,
    unauthenticated: Mutex<Unauthenticated>,
    failures: Mutex<Failures>,
}

/// Connections without an authenticated request, oldest first.
#[derive(Default)]
struct Unauthenticated {
    next_id: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
}

/// Failed authentications by address, with the counts of the current log interval.
#[derive(Default)]
struct Failures {
    by_address: HashMap<IpAddr, AddressFailures>,
}

/// One address's failed-authentication budget (a token bucket of `failed_auth_per_second`) and
/// what it did this interval.
struct AddressFailures {
    budget: f64,
    refilled_at: Instant,
    throttled_until: Option<Instant>,
    refused: [u64; 2],
    throttled: [u64; 2],
}

/// Which credential failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A client API key (`Authorization: Bearer`, `x-api-key`).
    ApiKey,
    /// The admin token (the admin API, `/metrics`).
    AdminToken,
}

impl Credential {
    fn index(self) -> usize {
        match self {
            Credential::ApiKey => 0,
            Credential::AdminToken => 1,
        }
    }

    fn name(index: usize) -> &'static str {
        ["api_key", "admin_token"][index]
    }
}

impl ClientAdmission {
    /// Admission state with these limits.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            unauthenticated: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    /// Registers a connection just accepted from `peer`, as not yet authenticated. If that puts
    /// the count over the cap, the oldest such connection is told to close.
    pub fn arrive(self: &Arc<Self>, peer: IpAddr) -> Arc<ClientConnection> {
        let evicted = Arc::new(Notify::new());
        let mut unauthenticated = self.lock_unauthenticated();
        let id = unauthenticated.next_id;
        unauthenticated.next_id += 1;
        unauthenticated.waiting.insert(id, evicted.clone());
        if unauthenticated.waiting.len() > self.limits.max_unauthenticated_connections
            && let Some((_, oldest)) = unauthenticated.waiting.pop_first()
        {
            // A permit is kept if its connection is not waiting yet: the close is never lost.
            oldest.notify_one();
        }
        drop(unauthenticated);
        Arc::new(ClientConnection {
            peer,
            id,
            admission: self.clone(),
            unauthenticated: AtomicBool::new(true),
            evicted,
        })
    }

    /// The limits a request body is read under.
    pub fn body_limits(&self) -> (Duration, u64) {
        (
            self.limits.body_read_timeout,
            self.limits.body_min_bytes_per_second,
        )
    }

    fn lock_unauthenticated(&self) -> std::sync::MutexGuard<'_, Unauthenticated> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.unauthenticated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a failed authentication from `peer`; `Some(retry_after)` when the address is over
    /// its budget and the attempt is to be answered 429 instead of 401.
    fn failed(&self, peer: IpAddr, credential: Credential, now: Instant) -> Option<Duration> {
        let per_second = f64::from(self.limits.failed_auth_per_second);
        let mut failures = self.lock_failures();
        let own = counted_address(peer);
        // Past the cap, new addresses share one record; tracked ones keep theirs.
        let address = if failures.by_address.len() < TRACKED_ADDRESSES
            || failures.by_address.contains_key(&own)
        {
            own
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        let record = failures
            .by_address
            .entry(address)
            .or_insert_with(|| AddressFailures {
                budget: per_second,
                refilled_at: now,
                throttled_until: None,
                refused: [0; 2],
                throttled: [0; 2],
            });
        record.refused[credential.index()] += 1;
        if let Some(until) = record.throttled_until {
            if now < until {
                record.throttled[credential.index()] += 1;
                return Some(until - now);
            }
            record.throttled_until = None;
            record.budget = per_second;
            record.refilled_at = now;
        }
        let elapsed = now.duration_since(record.refilled_at).as_secs_f64();
        record.budget = (record.budget + elapsed * per_second).min(per_second);
        record.refilled_at = now;
        if record.budget >= 1.0 {
            record.budget -= 1.0;
            return None;
        }
        record.throttled_until = Some(now + THROTTLED_FOR);
        record.throttled[credential.index()] += 1;
        Some(THROTTLED_FOR)
    }

    /// Logs the interval's failed authentications, one line per address and credential (the
    /// busiest [`LOGGED_ADDRESSES`], then one line for the rest), and forgets addresses that
    /// are neither throttled nor short of budget.
    pub fn log_failed_authentications(&self) {
        let now = Instant::now();
        let per_second = f64::from(self.limits.failed_auth_per_second);
        let mut counted: Vec<(IpAddr, usize, u64, u64)> = Vec::new();
        {
            let mut failures = self.lock_failures();
            for (address, record) in &mut failures.by_address {
                for index in 0..2 {
                    if record.refused[index] > 0 {
                        counted.push((
                            *address,
                            index,
                            record.refused[index],
                            record.throttled[index],
                        ));
                    }
                }
                record.refused = [0; 2];
                record.throttled = [0; 2];
            }
            failures.by_address.retain(|_, record| {
                let refilled = record.budget
                    + now.duration_since(record.refilled_at).as_secs_f64() * per_second;
                record.throttled_until.is_some_and(|until| until > now) || refilled < per_second
            });
        }
        counted.sort_by_key(|&(_, _, refused, _)| std::cmp::Reverse(refused));
        let mut rest = (0u64, 0u64, 0usize);
        for (rank, (address, index, refused, throttled)) in counted.into_iter().enumerate() {
            if rank < LOGGED_ADDRESSES {
                tracing::warn!(
                    address = %address,
                    kind = %Credential::name(index),
                    refused,
                    throttled,
                    "failed authentication"
                );
            } else {
                rest = (rest.0 + refused, rest.1 + throttled, rest.2 + 1);
            }
        }
        if rest.2 > 0 {
            tracing::warn!(
                addresses = rest.2,
                refused = rest.0,
                throttled = rest.1,
                "failed authentication from other addresses"
            );
        }
    }
}

/// The address a failure is counted under: an IPv6 client by its /64 (one subscriber's
/// network), an IPv4-mapped one as IPv4.
fn counted_address(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

/// One accepted connection: its peer address, and whether a request on it has authenticated.
pub struct ClientConnection {
    /// The client's address.
    pub peer: IpAddr,
    id: u64,
    admission: Arc<ClientAdmission>,
    unauthenticated: AtomicBool,
    evicted: Arc<Notify>,
}

impl ClientConnection {
    /// A request on this connection authenticated: it no longer counts against the cap.
    pub fn authenticated(&self) {
        if self.unauthenticated.swap(false, Ordering::Relaxed) {
            self.admission
                .lock_unauthenticated()
                .waiting
                .remove(&self.id);
        }
    }

    /// A request on this connection failed authentication; `Some(retry_after)` when its address
    /// is throttled and the request is to be answered 429.
    pub fn failed(&self, credential: Credential) -> Option<Duration> {
        self.admission.failed(self.peer, credential, Instant::now())
    }

    /// Completes when the connection was closed to make room under the cap.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// A request body read under a deadline: `timeout` after the request head, plus one second per
/// `min_bytes_per_second` bytes received. A client that stalls or trickles its body cannot hold
/// its connection (and the request's memory) for ever.
pub struct TimedBody<B> {
    inner: B,
    started: Instant,
    timeout: Duration,
    min_bytes_per_second: u64,
    received: u64,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> TimedBody<B> {
    /// `inner`, due under the admission's body limits from now.
    pub fn new(inner: B, admission: &ClientAdmission) -> Self {
        let (timeout, min_bytes_per_second) = admission.body_limits();
        Self {
            inner,
            started: Instant::now(),
            timeout,
            min_bytes_per_second,
            received: 0,
            deadline: None,
        }
    }

    fn deadline(&self) -> Instant {
        let earned_ms = self
            .received
            .saturating_mul(1000)
            .checked_div(self.min_bytes_per_second)
            .unwrap_or(0);
        self.started + self.timeout + Duration::from_millis(earned_ms)
    }
}

/// A body that did not arrive in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "The request body did not arrive in time (`server.body_read_timeout_ms` = {timeout_ms}, at \
     least {min_bytes_per_second} bytes a second after it); {received} bytes came."
)]
pub struct BodyReadTimedOut {
    /// The timeout before the rate's extension, in milliseconds.
    pub timeout_ms: u64,
    /// The minimum rate.
    pub min_bytes_per_second: u64,
    /// Bytes received before the deadline.
    pub received: u64,
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                let deadline = this.deadline();
                if Instant::now() > deadline {
                    return Poll::Ready(Some(Err(this.timed_out())));
                }
                if let Some(sleep) = &mut this.deadline {
                    sleep.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = this.deadline();
                let sleep = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.timed_out()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> TimedBody<B> {
    fn timed_out(&self) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(BodyReadTimedOut {
            timeout_ms: self.timeout.as_millis() as u64,
            min_bytes_per_second: self.min_bytes_per_second,
            received: self.received,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_unauthenticated_connections: usize) -> Arc<ClientAdmission> {
        ClientAdmission::new(AdmissionLimits {
            max_unauthenticated_connections,
            failed_auth_per_second: 20,
            body_read_timeout: Duration::from_secs(10),
            body_min_bytes_per_second: 1000,
        })
    }

    #[test]
    fn an_address_is_throttled_after_its_budget_and_freed_after_the_pause() {
        let admission = admission(10);
        let peer: IpAddr = [192, 0, 2, 7].into();
        let start = Instant::now();
        for _ in 0..20 {
            assert_eq!(admission.failed(peer, Credential::ApiKey, start), None);
        }
        assert_eq!(
            admission.failed(peer, Credential::AdminToken, start),
            Some(THROTTLED_FOR)
        );
        // Another address is not throttled by this one.
        assert_eq!(
            admission.failed([192, 0, 2, 8].into(), Credential::ApiKey, start),
            None
        );
        let later = start + THROTTLED_FOR / 2;
        assert_eq!(
            admission.failed(peer, Credential::ApiKey, later),
            Some(THROTTLED_FOR / 2)
        );
        let after = start + THROTTLED_FOR + Duration::from_millis(1);
        assert_eq!(admission.failed(peer, Credential::ApiKey, after), None);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("an address");
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("an address");
        assert_eq!(counted_address(one), counted_address(other));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("an address");
        assert_eq!(counted_address(mapped), IpAddr::from([192, 0, 2, 1]));
    }

    #[tokio::test]
    async fn the_oldest_unauthenticated_connection_gives_way() {
        let admission = admission(2);
        let peer: IpAddr = [127, 0, 0, 1].into();
        let first = admission.arrive(peer);
        let second = admission.arrive(peer);
        second.authenticated();
        let third = admission.arrive(peer);
        let fourth = admission.arrive(peer);
        // first, third and fourth were unauthenticated: the oldest, first, is told to close.
        tokio::time::timeout(Duration::from_secs(1), first.evicted())
            .await
            .expect("the oldest is evicted");
        let waited = tokio::time::timeout(Duration::from_millis(50), third.evicted()).await;
        assert!(waited.is_err(), "the newer ones stay");
        drop(fourth);
        assert_eq!(admission.lock_unauthenticated().waiting.len(), 1);
    }

    #[test]
    fn the_body_deadline_grows_with_what_arrived() {
        let admission = admission(1);
        let mut body = TimedBody::new((), &admission);
        let start = body.started;
        assert_eq!(body.deadline(), start + Duration::from_secs(10));
        body.received = 2_500;
        assert_eq!(body.deadline(), start + Duration::from_millis(12_500));
    }
}
