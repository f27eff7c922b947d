//! Record: commits the request's one usage record with its cost's debit and its hold's release,
//! through the store, before a whole answer goes out.
//!
//! In: the finished [`RequestContext`] with its usage and price. Out: nothing, or a [`RecordError`]
//! (logged: the client already has its answer). Nothing of the prompt or completion is recorded.

use crate::plugin::Operation;
use crate::plugin::translator::Usage;
use crate::stages::bill::Priced;
use crate::stages::context::RequestContext;

use crate::store::{
    Durable, LedgerWriter, OpenedRequest, RecordedAttempt, RecordedLineItem, RecordedUsage,
    StoreError, UsageRecord,
};

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store refused the write.
    #[error("the usage record of request {request_id} could not be written")]
    Store {
        /// The request.
        request_id: String,
        /// The cause.
        #[source]
        source: StoreError,
    },
}

/// Builds the usage record of a finished request.
pub fn usage_record(
    context: &RequestContext,
    usage: &Usage,
    priced: &Priced,
    status: u16,
    error_class: Option<&str>,
) -> UsageRecord {
    UsageRecord {
        unix_ms: context.received_unix_ms,
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: operation_name(context.request.operation).to_owned(),
        model_asked: context
            .degraded_from
            .clone()
            .unwrap_or_else(|| context.request.model.clone()),
        degraded_to: context
            .degraded_from
            .as_ref()
            .map(|_| context.request.model.clone()),
        model_served: context.served_model.clone().unwrap_or_default(),
        channel: context.served_channel.clone().unwrap_or_default(),
        model_mismatch: model_mismatch(context),
        protocol_in: protocol_in(context).to_owned(),
        protocol_out: context.served_protocol.clone(),
        stream: context.request.stream,
        attempts: context.attempts.clone(),
        usage: recorded_usage(usage),
        cost_picos: priced.price.as_ref().map(|price| price.amount_picos),
        line_items: line_items(priced),
        latency_ms: context.elapsed_ms(),
        status,
        error_class: error_class.map(str::to_owned),
        plugins: context.plugins.clone(),
        written_off_picos: priced.written_off_picos,
    }
}

/// The record of a request a stopped gateway left open, charged at the next start: `error_class`
/// says `recovered`; the status is the one the client saw, 200 once text went out (a stream),
/// else 502 (its connection closed without an answer).
pub fn recovered_record(
    opened: &OpenedRequest,
    usage: &Usage,
    priced: &Priced,
    delivered_text_bytes: u64,
) -> UsageRecord {
    UsageRecord {
        unix_ms: opened.unix_ms,
        request_id: opened.request_id.clone(),
        tenant: opened.tenant.clone(),
        key_id: opened.key_id.clone(),
        operation: opened.operation.clone(),
        model_asked: opened.model_asked.clone(),
        degraded_to: None,
        model_served: String::new(),
        channel: opened.channel.clone(),
        model_mismatch: false,
        protocol_in: opened.protocol_in.clone(),
        protocol_out: Some(opened.protocol_out.clone()),
        stream: opened.stream,
        attempts: vec![RecordedAttempt {
            channel: opened.channel.clone(),
            key: None,
            upstream_model: opened.upstream_model.clone(),
            status: None,
            error_class: Some("recovered".to_owned()),
            latency_ms: 0,
            ttfb_ms: None,
        }],
        usage: recorded_usage(usage),
        cost_picos: priced.price.as_ref().map(|price| price.amount_picos),
        line_items: line_items(priced),
        latency_ms: 0,
        status: if delivered_text_bytes > 0 { 200 } else { 502 },
        error_class: Some("recovered".to_owned()),
        plugins: opened.plugins.clone(),
        written_off_picos: priced.written_off_picos,
    }
}

/// An operation as records name it.
pub fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Chat => "chat",
        Operation::Embeddings => "embeddings",
    }
}

/// The protocol the client spoke.
pub fn protocol_in(context: &RequestContext) -> &'static str {
    context
        .inbound
        .as_ref()
        .map_or("openai", |inbound| inbound.protocol)
}

fn recorded_usage(usage: &Usage) -> RecordedUsage {
    RecordedUsage {
        input_tokens: usage.input_tokens,
        cache_read_tokens: usage.cache_read_tokens,
        cache_write_tokens: usage.cache_write_tokens,
        output_tokens: usage.output_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        estimated: usage.estimated,
    }
}

fn line_items(priced: &Priced) -> Vec<RecordedLineItem> {
    priced
        .price
        .as_ref()
        .map(|price| {
            price
                .line_items
                .iter()
                .map(|item| RecordedLineItem {
                    kind: item.kind.clone(),
                    tokens: item.tokens,
                    price_per_million_micros: item.price_per_million_micros,
                    amount_picos: item.amount_picos,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the upstream answered with another model than the route asked for. Providers answer
/// with a dated version of the asked name (`gpt-4o-mini` → `gpt-4o-mini-2024-07-18`), so a served
/// name that starts with the asked one is no mismatch.
fn model_mismatch(context: &RequestContext) -> bool {
    match (&context.routed_model, &context.served_model) {
        (Some(asked), Some(served)) => !served.starts_with(asked.as_str()),
        _ => false,
    }
}

/// Commits one request's record (debiting its cost and releasing its hold) and returns once it
/// is committed, with what says when it is durable.
pub fn commit(
    ledger: &LedgerWriter,
    record: UsageRecord,
    hold_id: Option<String>,
) -> Result<Durable, RecordError> {
    let request_id = record.request_id.clone();
    ledger
        .commit(record, hold_id)
        .map_err(|source| RecordError::Store { request_id, source })
}
