//! Stream: carries a streamed upstream answer to the client chunk by chunk, through the channel's
//! translator, without buffering.
//!
//! In: the upstream response of one attempt. [`open`] waits for the first content, so an upstream
//! error before it can still fail over; [`pump`] then forwards every chunk the moment it is
//! translated. Out: a [`StreamOutcome`] (usage, served model, how it ended) for bill and record.
//! Errors: [`TranslateError`] before the first chunk; after it, a terminal error event to the client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::gateway::Channel;
use crate::plugin::Binding;
use crate::plugin::translator::{
    AttemptContext, StreamEvent, StreamFraming, StreamSession, TranslateError as WitError, Usage,
};
use crate::sse::{DONE_FRAME, EventFramer, carries_finish_reason, data_frame};
use crate::translate::{self, TranslateError};
use crate::upstream::{self, TimeoutPhase, UpstreamError};

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The upstream body as a sequence of events.
struct UpstreamEvents {
    channel: String,
    body: ByteStream,
    framer: EventFramer,
    ready: VecDeque<StreamEvent>,
    ended: bool,
}

impl UpstreamEvents {
    /// The next event, or `None` at a clean end of the body; a gap longer than `wait` is a timeout.
    async fn next(
        &mut self,
        wait: Duration,
        phase: TimeoutPhase,
    ) -> Result<Option<StreamEvent>, UpstreamError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            let next = tokio::time::timeout(wait, self.body.next())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    channel: self.channel.clone(),
                    phase,
                })?;
            match next {
                Some(Ok(bytes)) => self.ready.extend(self.framer.push(&bytes)),
                Some(Err(error)) => {
                    return Err(UpstreamError::Cut {
                        channel: self.channel.clone(),
                        reason: error.to_string(),
                    });
                }
                None => {
                    self.ended = true;
                    self.ready.extend(self.framer.finish());
                }
            }
        }
    }
}

/// A stream whose first content has arrived (or which ended without any).
pub struct OpenStream {
    session: StreamSession,
    events: UpstreamEvents,
    first_chunks: Vec<String>,
    idle: Duration,
}

/// How a pumped stream ended.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    /// Usage the upstream reported, if any.
    pub usage: Option<Usage>,
    /// The model the upstream reported.
    pub served_model: Option<String>,
    /// Set when the stream ended early: the class of what cut it.
    pub cut: Option<&'static str>,
    /// The client went away before the end.
    pub client_gone: bool,
}

fn from_wit(channel: &Channel, error: WitError) -> TranslateError {
    translate::plugin_error(channel, error)
}

/// Opens the translator on a streamed response and waits for its first content, within the
/// channel's first-byte timeout. Until this returns `Ok`, nothing has reached the client, so any
/// error here may fail over to the next attempt.
pub async fn open(
    translator: &Binding,
    channel: &Channel,
    attempt: &AttemptContext,
    framing: StreamFraming,
    response: reqwest::Response,
    max_error_body_bytes: usize,
) -> Result<OpenStream, TranslateError> {
    if !response.status().is_success() {
        let whole = upstream::read_whole(channel, response, max_error_body_bytes).await?;
        return Err(translate::failure(translator, channel, attempt, &whole).await);
    }
    let mut session = translator.open_stream(attempt).await?;
    let mut events = UpstreamEvents {
        channel: channel.config.name.clone(),
        body: Box::pin(response.bytes_stream()),
        framer: EventFramer::new(framing),
        ready: VecDeque::new(),
        ended: false,
    };
    let first_byte = channel.first_byte_timeout(&attempt.public_model);
    let mut first_chunks = Vec::new();
    while first_chunks.is_empty() {
        let Some(event) = events.next(first_byte, TimeoutPhase::FirstByte).await? else {
            break;
        };
        first_chunks = session
            .push(&event)
            .await?
            .map_err(|error| from_wit(channel, error))?;
    }
    Ok(OpenStream {
        session,
        events,
        first_chunks,
        idle: Duration::from_millis(channel.config.idle_timeout_ms),
    })
}

/// Forwards the stream to the client: the first chunks, then each translated event as it arrives,
/// the translator's trailing chunks and `[DONE]`. A failure after the first chunk cannot change the
/// status any more: the client gets one OpenAI-shaped error event and the stream closes.
pub async fn pump(mut stream: OpenStream, client: mpsc::Sender<Bytes>) -> StreamOutcome {
    let mut outcome = StreamOutcome::default();
    let mut finished = false;
    for chunk in std::mem::take(&mut stream.first_chunks) {
        finished |= carries_finish_reason(&chunk);
        if client.send(data_frame(&chunk)).await.is_err() {
            outcome.client_gone = true;
            return finish_quietly(stream, outcome).await;
        }
    }
    loop {
        let event = match stream.events.next(stream.idle, TimeoutPhase::Idle).await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => return cut(stream, outcome, &client, ApiError::from(error)).await,
        };
        let chunks = match stream.session.push(&event).await {
            Ok(Ok(chunks)) => chunks,
            Ok(Err(error)) => {
                let channel = stream.events.channel.clone();
                let error = translate::plugin_error_named(&channel, error);
                return cut(stream, outcome, &client, ApiError::from(error)).await;
            }
            Err(error) => return cut(stream, outcome, &client, ApiError::from(error)).await,
        };
        for chunk in chunks {
            finished |= carries_finish_reason(&chunk);
            if client.send(data_frame(&chunk)).await.is_err() {
                outcome.client_gone = true;
                return finish_quietly(stream, outcome).await;
            }
        }
    }
    match stream.session.finish().await {
        Ok(Ok(end)) => {
            outcome.usage = end.usage;
            outcome.served_model = end.served_model;
            for chunk in end.chunks {
                finished |= carries_finish_reason(&chunk);
                if client.send(data_frame(&chunk)).await.is_err() {
                    outcome.client_gone = true;
                    return outcome;
                }
            }
            if !finished {
                // The upstream closed cleanly but mid-answer: never a silent stop.
                let error = UpstreamError::Cut {
                    channel: stream.events.channel.clone(),
                    reason: "the stream ended before the answer finished".to_owned(),
                };
                send_error(&client, &mut outcome, ApiError::from(error)).await;
                return outcome;
            }
            if client
                .send(Bytes::from_static(DONE_FRAME.as_bytes()))
                .await
                .is_err()
            {
                outcome.client_gone = true;
            }
            outcome
        }
        Ok(Err(error)) => {
            let channel = stream.events.channel.clone();
            let error = translate::plugin_error_named(&channel, error);
            send_error(&client, &mut outcome, ApiError::from(error)).await;
            outcome
        }
        Err(error) => {
            send_error(&client, &mut outcome, ApiError::from(error)).await;
            outcome
        }
    }
}

/// Ends a stream early: asks the translator for the usage so far, then sends the error event.
async fn cut(
    stream: OpenStream,
    outcome: StreamOutcome,
    client: &mpsc::Sender<Bytes>,
    error: ApiError,
) -> StreamOutcome {
    let mut outcome = finish_quietly(stream, outcome).await;
    send_error(client, &mut outcome, error).await;
    outcome
}

async fn send_error(client: &mpsc::Sender<Bytes>, outcome: &mut StreamOutcome, error: ApiError) {
    outcome.cut = Some(error.class());
    // The client may be gone already; the record says the stream was cut either way.
    let _ = client.send(error.sse_frame()).await;
}

/// Collects what usage the translator has, without sending anything more.
async fn finish_quietly(mut stream: OpenStream, mut outcome: StreamOutcome) -> StreamOutcome {
    if let Ok(Ok(end)) = stream.session.finish().await {
        outcome.usage = end.usage;
        outcome.served_model = end.served_model;
    }
    outcome
}
