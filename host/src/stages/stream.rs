//! Stream: carries a streamed upstream answer to the client chunk by chunk, without buffering:
//! through the channel's translator to OpenAI chunks (converted to the client's protocol when it
//! spoke another), or, on a channel of the client's own protocol, passed through as it came.
//!
//! In: the upstream response of one attempt. [`open`] waits for the first content, so an upstream
//! error before it can still fail over; [`pump`] then forwards every chunk the moment it is
//! translated. Out: a [`StreamOutcome`] (usage, served model, how it ended) for bill and record.
//! Errors: [`TranslateError`] before the first chunk; after it, a terminal error event to the client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::error::ApiError;
use crate::plugin::Binding;
use crate::plugin::table::CanaryTally;
use crate::plugin::translator::{
    AttemptContext, ConvertedSession, ForwardedSession, StreamEvent, StreamFraming, StreamSession,
    Usage,
};
use crate::secrets::SecretScrubber;
use crate::sse::{self, DONE_FRAME, EventFramer, carries_finish_reason, data_frame, event_frame};
use crate::stages::bill::BillingError;
use crate::stages::context::Dialect;
use crate::stages::translate::{self, TranslateError};
use crate::stages::upstream::{self, TimeoutPhase, UpstreamError};
use crate::store::Store;

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The upstream body as a sequence of events.
struct UpstreamEvents {
    channel: String,
    /// The channel's secrets, taken out of the errors its upstream writes.
    secrets: Arc<SecretScrubber>,
    body: ByteStream,
    framer: EventFramer,
    ready: VecDeque<StreamEvent>,
    ended: bool,
}

impl UpstreamEvents {
    /// The next whole event, or `None` at a clean end of the body. An event not complete by
    /// `until` is a timeout of `phase`: bytes dripping in do not extend it.
    async fn next(
        &mut self,
        (until, phase): (Instant, TimeoutPhase),
    ) -> Result<Option<StreamEvent>, UpstreamError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            let next = tokio::time::timeout_at(until.into(), self.body.next())
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

/// Where a stream's events come from and in which protocol they reach the client.
pub enum Relay {
    /// The channel's translator turns upstream events into OpenAI chunks, sent as OpenAI SSE.
    OpenAi(StreamSession),
    /// The same, then the client protocol's plugin turns each chunk into its events.
    Converted(StreamSession, Box<ConvertedSession>),
    /// Same protocol: the upstream's events pass through, the plugin reading the usage.
    Forwarded(ForwardedSession),
}

/// What a relay's end produced.
struct RelayEnd {
    frames: Vec<Bytes>,
    usage: Option<Usage>,
    served_model: Option<String>,
}

impl Relay {
    /// Takes one upstream event; returns the frames for the client and whether the answer's end
    /// (a finish reason, or the protocol's own end event) passed.
    async fn push(
        &mut self,
        channel: &str,
        event: &StreamEvent,
        finished: &mut bool,
    ) -> Result<Vec<Bytes>, TranslateError> {
        let wit = |error| translate::plugin_error_named(channel, error);
        match self {
            Relay::OpenAi(session) => {
                let chunks = session.push(event).await?.map_err(wit)?;
                Ok(chunks
                    .iter()
                    .map(|chunk| {
                        *finished |= carries_finish_reason(chunk);
                        data_frame(chunk)
                    })
                    .collect())
            }
            Relay::Converted(session, converter) => {
                let chunks = session.push(event).await?.map_err(wit)?;
                convert(channel, converter, chunks, finished).await
            }
            Relay::Forwarded(session) => {
                let events = session.push(event).await?.map_err(wit)?;
                Ok(events.iter().map(event_frame).collect())
            }
        }
    }

    /// Ends the relay once the upstream ended: trailing frames, usage, served model. The closing
    /// frames of a converted stream go out only when the answer finished (a cut stream gets an
    /// error event instead).
    async fn end(
        &mut self,
        channel: &str,
        finished: &mut bool,
        prompt_estimate: u64,
    ) -> Result<RelayEnd, TranslateError> {
        let wit = |error| translate::plugin_error_named(channel, error);
        match self {
            Relay::OpenAi(session) => {
                let end = session.finish().await?.map_err(wit)?;
                let mut frames: Vec<Bytes> = end
                    .chunks
                    .iter()
                    .map(|chunk| {
                        *finished |= carries_finish_reason(chunk);
                        data_frame(chunk)
                    })
                    .collect();
                if *finished {
                    frames.push(Bytes::from_static(DONE_FRAME.as_bytes()));
                }
                Ok(RelayEnd {
                    frames,
                    usage: end.usage,
                    served_model: end.served_model,
                })
            }
            Relay::Converted(session, converter) => {
                let end = session.finish().await?.map_err(wit)?;
                let mut frames = convert(channel, converter, end.chunks, finished).await?;
                if *finished {
                    // The client reads the final usage here: the reported one, else the estimate.
                    let usage = end.usage.unwrap_or(Usage {
                        input_tokens: prompt_estimate,
                        cache_read_tokens: 0,
                        cache_write_tokens: 0,
                        output_tokens: 0,
                        reasoning_tokens: 0,
                        estimated: true,
                    });
                    let events = converter.finish(usage).await?.map_err(wit)?;
                    frames.extend(events.iter().map(event_frame));
                }
                Ok(RelayEnd {
                    frames,
                    usage: end.usage,
                    served_model: end.served_model,
                })
            }
            Relay::Forwarded(session) => {
                let end = session.finish().await?.map_err(wit)?;
                *finished = end.complete;
                Ok(RelayEnd {
                    frames: end.events.iter().map(event_frame).collect(),
                    usage: end.usage,
                    served_model: end.served_model,
                })
            }
        }
    }

    /// The usage so far, for a stream that ends early; sends nothing.
    async fn usage_so_far(&mut self) -> (Option<Usage>, Option<String>) {
        let end = match self {
            Relay::OpenAi(session) | Relay::Converted(session, _) => session
                .finish()
                .await
                .ok()
                .and_then(Result::ok)
                .map(|end| (end.usage, end.served_model)),
            Relay::Forwarded(session) => session
                .finish()
                .await
                .ok()
                .and_then(Result::ok)
                .map(|end| (end.usage, end.served_model)),
        };
        end.unwrap_or_default()
    }
}

/// OpenAI chunks through the client protocol's converter, as frames.
async fn convert(
    channel: &str,
    converter: &mut ConvertedSession,
    chunks: Vec<String>,
    finished: &mut bool,
) -> Result<Vec<Bytes>, TranslateError> {
    let mut frames = Vec::new();
    for chunk in chunks {
        *finished |= carries_finish_reason(&chunk);
        let events = converter
            .push(&chunk)
            .await?
            .map_err(|error| translate::plugin_error_named(channel, error))?;
        frames.extend(events.iter().map(event_frame));
    }
    Ok(frames)
}

/// A stream whose first content has arrived (or which ended without any).
pub struct OpenStream {
    relay: Relay,
    events: UpstreamEvents,
    first_frames: Vec<Bytes>,
    finished: bool,
    idle: Duration,
    /// The attempt's total timeout ends then, stream or not.
    total_until: Instant,
    dialect: Dialect,
    prompt_estimate: u64,
    /// Bytes of generated text sent to the client so far.
    delivered_text_bytes: u64,
    /// Past this many bytes of text the stream is cut (see [`StreamShape::output_allowance`]).
    max_text_bytes: u64,
    /// Where the stream's progress is noted, and when it was last.
    progress: Option<ProgressMarks>,
    /// The translator's canary, when the canary translates this stream: its end counts.
    canary: Option<CanaryTally>,
}

impl OpenStream {
    /// Counts the stream's end against the canary that translates it.
    pub fn watched_by(mut self, canary: Option<CanaryTally>) -> Self {
        self.canary = canary;
        self
    }
}

/// Notes in the ledger log how much text a stream delivered, so that a crash mid-stream charges
/// what the client was sent: on the first content, then whenever another [`MARK_EVERY_BYTES`]
/// went out or a second passed with more.
pub struct ProgressMarks {
    /// The store whose log takes the marks.
    pub store: Arc<dyn Store>,
    /// The request's hold, which names it in the log.
    pub hold_id: String,
    /// Text bytes at the last mark, and when it was written.
    pub marked: Option<(u64, Instant)>,
}

/// Text bytes between progress marks, at most (with a second between them, at most).
const MARK_EVERY_BYTES: u64 = 4096;

impl ProgressMarks {
    fn note(&mut self, delivered: u64) {
        let due = match self.marked {
            None => delivered > 0,
            Some((bytes, at)) => {
                delivered >= bytes + MARK_EVERY_BYTES
                    || (delivered > bytes && at.elapsed() >= Duration::from_secs(1))
            }
        };
        if !due {
            return;
        }
        self.marked = Some((delivered, Instant::now()));
        if let Err(error) = self.store.mark_progress(&self.hold_id, delivered) {
            tracing::warn!(%error, "a stream's progress could not be noted");
        }
    }
}

/// How one stream is read and written.
pub struct StreamShape {
    /// The upstream's framing.
    pub framing: StreamFraming,
    /// The client's dialect, for the error event of a stream that fails after it started.
    pub dialect: Dialect,
    /// Cap on an error answer's body.
    pub max_error_body_bytes: usize,
    /// The prompt tokens a converted stream reports when the upstream reported none.
    pub prompt_estimate: u64,
    /// The output tokens the request's hold covers. An upstream that writes past its cap is cut
    /// once the text sent passes a quarter more than that at four bytes a token (the margin keeps
    /// an answer that honours its cap, in words longer than four bytes a token, whole); what it
    /// wrote past the hold is written off, never charged.
    pub output_allowance: Option<u64>,
    /// Where its progress is noted (a request with a hold).
    pub progress: Option<ProgressMarks>,
}

/// The text bytes past which a stream with this allowance is cut.
fn max_text_bytes(output_allowance: Option<u64>) -> u64 {
    output_allowance.map_or(u64::MAX, |tokens| {
        tokens.saturating_mul(5).saturating_add(64)
    })
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

/// Opens a streamed response with its relay and waits for its first content, within the channel's
/// first-byte timeout of the attempt's start (`started`). Until this returns `Ok`, nothing has
/// reached the client, so any error here may fail over to the next attempt. The relay is made
/// only for a successful answer.
pub async fn open(
    translator: &Binding,
    relay: impl AsyncFnOnce() -> Result<Relay, TranslateError>,
    channel: &Channel,
    attempt: &AttemptContext,
    (response, started): (reqwest::Response, Instant),
    shape: StreamShape,
) -> Result<OpenStream, TranslateError> {
    let total_until = started + Duration::from_millis(channel.config.total_timeout_ms);
    if !response.status().is_success() {
        let whole =
            upstream::read_whole(channel, response, shape.max_error_body_bytes, started).await?;
        return Err(translate::failure(translator, channel, attempt, &whole).await);
    }
    let mut relay = relay().await?;
    let mut events = UpstreamEvents {
        channel: channel.config.name.clone(),
        secrets: channel.secrets.clone(),
        body: Box::pin(response.bytes_stream()),
        framer: EventFramer::new(shape.framing),
        ready: VecDeque::new(),
        ended: false,
    };
    let first_byte = channel.first_byte_timeout(&attempt.public_model);
    let first_content = (started + first_byte)
        .checked_duration_since(Instant::now())
        .unwrap_or_default();
    let first_content = TimeoutPhase::FirstContent.deadline(first_content, total_until);
    let mut first_frames = Vec::new();
    let mut finished = false;
    while first_frames.is_empty() {
        let Some(event) = events.next(first_content).await? else {
            break;
        };
        first_frames = relay
            .push(&channel.config.name, &event, &mut finished)
            .await
            .map_err(|error| error.scrubbed(&channel.secrets))?;
    }
    Ok(OpenStream {
        relay,
        events,
        first_frames,
        finished,
        idle: Duration::from_millis(channel.config.idle_timeout_ms),
        total_until,
        dialect: shape.dialect,
        prompt_estimate: shape.prompt_estimate,
        delivered_text_bytes: 0,
        max_text_bytes: max_text_bytes(shape.output_allowance),
        progress: shape.progress,
        canary: None,
    })
}

/// Forwards the stream to the client: the first frames, then each relayed event as it arrives,
/// the relay's trailing frames and the protocol's end. A failure after the first frame cannot
/// change the status any more: the client gets one error event in its dialect and the stream closes.
pub async fn pump(mut stream: OpenStream, client: mpsc::Sender<Bytes>) -> StreamOutcome {
    let ending = relay_events(&mut stream, &client).await;
    let outcome = StreamOutcome::default();
    // A held stream keeps only the relaying loop's state: the ending's plugin calls are boxed,
    // so they take memory when the stream ends, not all its life (2.6 KiB for this future; 4.9
    // KiB with them inline).
    match ending {
        Ending::Drained => {
            if let Some(canary) = &stream.canary {
                canary.count_outcome(None);
            }
            Box::pin(end(stream, outcome, &client)).await
        }
        Ending::ClientGone => {
            let mut outcome = Box::pin(finish_quietly(stream, outcome)).await;
            outcome.client_gone = true;
            outcome
        }
        Ending::Cut(error) => {
            if let Some(canary) = &stream.canary {
                canary.count_outcome(error.plugin_error());
            }
            Box::pin(cut(stream, outcome, &client, error)).await
        }
    }
}

/// How the relaying of upstream events stopped.
enum Ending {
    /// The upstream ended its stream.
    Drained,
    /// The client went away.
    ClientGone,
    /// The upstream or the relay failed.
    Cut(ApiError),
}

/// Sends the first frames, then relays each upstream event until the upstream, the client, a
/// failure or the output allowance stops it.
async fn relay_events(stream: &mut OpenStream, client: &mpsc::Sender<Bytes>) -> Ending {
    let first_frames = std::mem::take(&mut stream.first_frames);
    if let Some(ending) = send_frames(stream, client, first_frames).await {
        return ending;
    }
    loop {
        // A client that goes away while the upstream is silent is noticed at once: the upstream
        // call ends with it.
        let next = tokio::select! {
            next = stream.events.next(TimeoutPhase::Idle.deadline(stream.idle, stream.total_until)) => next,
            () = client.closed() => return Ending::ClientGone,
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => return Ending::Drained,
            Err(error) => return Ending::Cut(ApiError::from(error)),
        };
        let channel = &stream.events.channel;
        let frames = match stream
            .relay
            .push(channel, &event, &mut stream.finished)
            .await
        {
            Ok(frames) => frames,
            Err(error) => {
                return Ending::Cut(ApiError::from(error.scrubbed(&stream.events.secrets)));
            }
        };
        if let Some(ending) = send_frames(stream, client, frames).await {
            return ending;
        }
    }
}

/// Sends frames, counting their text; a frame that would take the text past the allowance is not
/// sent, and the stream is cut instead.
async fn send_frames(
    stream: &mut OpenStream,
    client: &mpsc::Sender<Bytes>,
    frames: Vec<Bytes>,
) -> Option<Ending> {
    for mut frame in frames {
        // An error event relayed as the upstream wrote it (a stream in the client's own protocol)
        // may echo the key.
        if frame.starts_with(b"event: error")
            && let std::borrow::Cow::Owned(clean) = stream.events.secrets.scrub_bytes(&frame)
        {
            frame = Bytes::from(clean);
        }
        let text = sse::text_bytes(&frame);
        if stream.delivered_text_bytes.saturating_add(text) > stream.max_text_bytes {
            return Some(Ending::Cut(ApiError::Billing(
                BillingError::InsufficientBalance(
                    "The answer reached the output this request's balance covers.".to_owned(),
                ),
            )));
        }
        stream.delivered_text_bytes += text;
        if client.send(frame).await.is_err() {
            return Some(Ending::ClientGone);
        }
    }
    if let Some(progress) = stream.progress.as_mut() {
        progress.note(stream.delivered_text_bytes);
    }
    None
}

/// Ends a stream the upstream ended: the relay's trailing frames, then an error event if the
/// answer stopped before its finish.
async fn end(
    mut stream: OpenStream,
    mut outcome: StreamOutcome,
    client: &mpsc::Sender<Bytes>,
) -> StreamOutcome {
    let channel = stream.events.channel.clone();
    let dialect = stream.dialect;
    match stream
        .relay
        .end(&channel, &mut stream.finished, stream.prompt_estimate)
        .await
    {
        Ok(end) => {
            outcome.usage = end.usage;
            outcome.served_model = end.served_model;
            for frame in end.frames {
                if client.send(frame).await.is_err() {
                    outcome.client_gone = true;
                    return outcome;
                }
            }
            if !stream.finished {
                // The upstream closed cleanly but mid-answer: never a silent stop.
                let error = UpstreamError::Cut {
                    channel,
                    reason: "the stream ended before the answer finished".to_owned(),
                };
                send_error(client, &mut outcome, ApiError::from(error), dialect).await;
            }
            outcome
        }
        Err(error) => {
            let error = error.scrubbed(&stream.events.secrets);
            send_error(client, &mut outcome, ApiError::from(error), dialect).await;
            outcome
        }
    }
}

/// Ends a stream early: asks the relay for the usage so far, then sends the error event.
async fn cut(
    stream: OpenStream,
    outcome: StreamOutcome,
    client: &mpsc::Sender<Bytes>,
    error: ApiError,
) -> StreamOutcome {
    let dialect = stream.dialect;
    let mut outcome = finish_quietly(stream, outcome).await;
    send_error(client, &mut outcome, error, dialect).await;
    outcome
}

async fn send_error(
    client: &mpsc::Sender<Bytes>,
    outcome: &mut StreamOutcome,
    error: ApiError,
    dialect: Dialect,
) {
    outcome.cut = Some(error.class());
    // The client may be gone already; the record says the stream was cut either way.
    let _ = client.send(error.sse_frame(dialect)).await;
}

/// Collects what usage the relay has, without sending anything more.
async fn finish_quietly(mut stream: OpenStream, mut outcome: StreamOutcome) -> StreamOutcome {
    let (usage, served_model) = stream.relay.usage_so_far().await;
    outcome.usage = usage;
    outcome.served_model = served_model;
    outcome
}
