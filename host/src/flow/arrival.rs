//! What listen hands the flow: the facts of a request's head, free of HTTP, and its body still
//! unread, so that authentication comes before the body is read.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::Span;

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::plugin::Operation;
use crate::plugin::translator::{Endpoint, Header};
use crate::stages::auth::{self, AuthError, Caller};
use crate::stages::inbound::ClientProtocol;

/// A request as it arrived: its head's facts, its body unread.
pub struct Arrival {
    /// From `x-request-id`, or made by listen.
    pub request_id: String,
    /// When its head was read.
    pub received_at: Instant,
    /// What authenticates it.
    pub credentials: Credentials,
    /// The client's `x-tollgate-*` headers, as router tags.
    pub tags: Vec<(String, String)>,
    /// The endpoint called.
    pub asked: Asked,
    /// Reads the body (under the body cap and its deadline) when awaited, not before.
    pub body: BodyRead,
}

/// Reads a request's body; a 413 past the cap, a 408 when it is late.
pub type BodyRead = Pin<Box<dyn Future<Output = Result<Bytes, ApiError>> + Send>>;

/// The endpoint a request called.
pub enum Asked {
    /// An OpenAI endpoint.
    OpenAi(Operation),
    /// An endpoint of another client protocol, spoken by its translator.
    Inbound {
        /// The protocol.
        protocol: ClientProtocol,
        /// Which of its endpoints.
        endpoint: Endpoint,
        /// The client's headers of that protocol (its prefix), for the plugin.
        headers: Vec<Header>,
    },
}

/// A request's credential headers, and the client's standing with the listener's throttle.
pub struct Credentials {
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `x-api-key`, as Anthropic's SDKs send the key.
    pub api_key: Option<String>,
    /// Told of the outcome; none for a request that did not come over a counted connection.
    pub client: Option<Arc<dyn ClientStanding>>,
}

/// A client connection, as the throttle on failed authentication counts it.
pub trait ClientStanding: Send + Sync {
    /// A request on it presented a refused key; `Some(retry_after)` when its address is now
    /// throttled and the request is answered 429.
    fn refused(&self) -> Option<Duration>;
    /// A request on it authenticated: it no longer counts as unauthenticated.
    fn authenticated(&self);
}

/// The caller, from the credentials alone. A refusal counts against the client's address; a
/// store failure does not (the client is not at fault).
pub fn authenticate(gateway: &Gateway, credentials: &Credentials) -> Result<Caller, ApiError> {
    let caller = auth::authenticate(
        gateway.store.as_ref(),
        credentials.authorization.as_deref(),
        credentials.api_key.as_deref(),
        crate::store::now_unix_ms(),
    );
    let client = credentials.client.as_deref();
    match caller {
        Ok(caller) => {
            if let Some(client) = client {
                client.authenticated();
            }
            Span::current().record("tenant", caller.tenant.as_str());
            Ok(caller)
        }
        Err(AuthError::Store(error)) => Err(AuthError::Store(error).into()),
        Err(refused) => Err(match client.and_then(ClientStanding::refused) {
            Some(retry_after) => ApiError::AuthThrottled { retry_after },
            None => refused.into(),
        }),
    }
}
