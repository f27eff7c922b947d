//! `count_tokens` of the Messages API: forwarded to a channel of its own protocol when one
//! answers, else counted here.

use std::sync::Arc;

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::plugin;
use crate::plugin::Operation;
use crate::stages::context::RequestContext;
use crate::stages::limit;
use crate::stages::route::{self, Plan};
use crate::tokens;

use super::Arrival;
use super::attempt::{PlanFailure, Reply, run_plan};

/// Counts the prompt's tokens for a client protocol's count endpoint. The planned channels of the
/// client's own protocol are asked in order, forwarded untouched (an exact count), on the same
/// attempt loop as any request (circuits, key pools, retries, the silence watch); when the plan
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
    let writer = inbound.plugin.clone();
    let forwarded = Plan {
        attempts: plan
            .attempts
            .into_iter()
            .take_while(|attempt| inbound.forwards_to(&attempt.channel.config.protocol))
            .collect(),
    };
    // A count is a whole answer, whatever the body says.
    context.request.stream = false;
    let deadline = context.received_at + gateway.failover_budget;
    // The local count is always left to go to.
    match run_plan(&gateway, &mut context, &forwarded, deadline, true).await {
        Ok(answered) => {
            let Reply::Whole(answer) = answered.reply else {
                unreachable!("a request with `stream` false is answered whole");
            };
            answered
                .admission
                .succeeded(answered.started.elapsed(), answered.ttfb);
            return Ok(answer.body);
        }
        Err(PlanFailure::Fatal(ApiError::NoAttempt) | PlanFailure::Failed(_)) => {}
        Err(PlanFailure::Fatal(error)) => return Err(error),
    }
    let counted = tokens::prompt_tokens(Operation::Chat, &context.request.body);
    Ok(writer.count_tokens_answer(counted).await?)
}
