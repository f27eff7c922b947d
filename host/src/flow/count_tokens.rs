//! `count_tokens` of the Messages API: forwarded to a channel of its own protocol when one
//! answers, else counted here.

use std::sync::Arc;
use std::time::Instant;

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::plugin;
use crate::plugin::Operation;
use crate::stages::context::RequestContext;
use crate::stages::limit;
use crate::stages::route;
use crate::stages::translate::{self, TranslateError};
use crate::stages::upstream;
use crate::tokens;

use super::Arrival;

/// Counts the prompt's tokens for a client protocol's count endpoint. The planned channels of the
/// client's own protocol are asked in order, forwarded untouched (an exact count); when the plan
/// reaches a channel of another protocol, or they all fail, the host counts with its tokenizer
/// and the protocol's plugin writes the answer. Counting is free: nothing is held, charged or
/// recorded, but the key's model allow-list and request rate apply.
pub async fn count_tokens(gateway: Arc<Gateway>, arrival: Arrival) -> Result<String, ApiError> {
    let context = super::arrive(&gateway, arrival).await?;
    let tenant = Arc::from(context.caller.tenant.as_str());
    plugin::serving(tenant, count_tokens_served(gateway, context)).await
}

async fn count_tokens_served(
    gateway: Arc<Gateway>,
    mut context: RequestContext,
) -> Result<String, ApiError> {
    let mut permit = limit::admit(&gateway.limiter, &context.caller, &context.request)?;
    permit.settle_tokens(0);
    let plan = route::plan(&gateway.channels(), &mut context).await?;
    let Some(inbound) = context.inbound.as_ref() else {
        return Err(ApiError::NoAttempt);
    };
    for attempt in &plan.attempts {
        let channel = attempt.channel.as_ref();
        if !inbound.forwards_to(&channel.config.protocol) {
            break;
        }
        let now = Instant::now();
        let Ok(key) = channel.pick_key(
            &context.caller.tenant,
            &attempt.upstream_model,
            now,
            &[],
            true,
        ) else {
            continue;
        };
        let translator = translate::translator(&context, channel)?;
        let attempt_context = translate::attempt_context(&context, channel, attempt);
        let forwarded = translate::forward(&translator, channel, &attempt_context, inbound).await?;
        let first_byte = channel.first_byte_timeout(&context.request.model);
        let sent_at = Instant::now();
        // The local estimate is always left to go to.
        let probe = translate::SilenceProbe {
            translator: &forwarded.ran,
            attempt: &attempt_context,
        };
        let upstream_key = key.map(|index| &channel.keys[index]);
        let sending = upstream::send(channel, upstream_key, forwarded.value, first_byte);
        let sent =
            upstream::unless_silent(&attempt.channel, key, sent_at, Some(&probe), sending).await;
        let answered = match sent {
            Ok(response) => {
                let max_bytes = gateway.max_upstream_body_bytes;
                upstream::read_whole(channel, response, max_bytes, sent_at).await
            }
            Err(error) => Err(error),
        };
        let counted = match answered {
            Ok(whole) => {
                translate::forwarded_answer(
                    &forwarded.ran,
                    channel,
                    &attempt_context,
                    inbound.endpoint,
                    &whole,
                )
                .await
            }
            Err(error) => Err(error.into()),
        };
        match counted {
            Ok(answer) => return Ok(answer.body),
            Err(TranslateError::Upstream(error)) if error.is_retryable() => {
                tracing::info!(channel = %channel.config.name, class = error.class(), "token count failed; next channel");
            }
            Err(error) => return Err(error.into()),
        }
    }
    let counted = tokens::prompt_tokens(Operation::Chat, &context.request.body);
    Ok(inbound.plugin.count_tokens_answer(counted).await?)
}
