//! Billing `price-table`: prices each usage field by a per-model table of prices per million tokens.
//!
//! Money rule (exact, no rounding): a price is in micro-units per million tokens, so
//! `tokens * price` is exactly the amount in picos (10^-12 of the currency unit). The host keeps picos
//! end to end, so the ledger adds up to the balance to the last pico.

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_plugin_sdk::billing::{
    AuthorizeRequest, Billing, BillingDenial, BillingError, ChargeRequest, Hold, LineItem,
    Operation, Price, Usage,
};
use tollgate_plugin_sdk::export_billing;
use tollgate_plugin_sdk::host::{config, parse_config};

/// Prices of one model, each in micro-units of currency per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelPrices {
    /// Uncached prompt tokens.
    input: u64,
    /// Generated tokens that are not reasoning.
    output: u64,
    /// Prompt tokens read from cache; the input price when absent.
    cache_read: Option<u64>,
    /// Prompt tokens written to cache; the input price when absent.
    cache_write: Option<u64>,
    /// Reasoning tokens; the output price when absent.
    reasoning: Option<u64>,
}

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceTable {
    /// Prices by public model name (the name the client asked for).
    models: BTreeMap<String, ModelPrices>,
    /// How far below zero a tenant's balance may go, in micro-units (0: prepaid only).
    #[serde(default)]
    credit_limit_micros: u64,
    /// Output tokens assumed for the hold of a chat request whose estimate has none (a gateway
    /// that sends no output estimate; today's sends the client's cap or the model's limit).
    #[serde(default = "default_hold_output_tokens")]
    hold_output_tokens: u64,
}

fn default_hold_output_tokens() -> u64 {
    4096
}

const PICOS_PER_MICRO: i128 = 1_000_000;

/// The billing plugin.
struct PriceTablePlugin;

impl Billing for PriceTablePlugin {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<PriceTable>(config).map(|_| ())
    }

    fn authorize(request: AuthorizeRequest) -> Result<Hold, BillingDenial> {
        let table = config::<PriceTable>().map_err(BillingDenial::BudgetExceeded)?;
        authorize(&table, &request)
    }

    fn charge(request: ChargeRequest) -> Result<Price, BillingError> {
        let table = config::<PriceTable>().map_err(BillingError::Internal)?;
        let prices = table.models.get(&request.model_asked).ok_or_else(|| {
            BillingError::UnpricedModel(format!("no price for `{}`", request.model_asked))
        })?;
        price(prices, &request.usage)
    }
}

export_billing!(PriceTablePlugin);

/// Holds the worst case of the estimate: its prompt plus its output cap, priced at the dearer of the
/// output and reasoning prices.
fn authorize(table: &PriceTable, request: &AuthorizeRequest) -> Result<Hold, BillingDenial> {
    let prices = table.models.get(&request.model).ok_or_else(|| {
        BillingDenial::UnpricedModel(format!("no price for the model `{}`", request.model))
    })?;
    let estimate = &request.estimated_usage;
    // Embeddings write no output; a chat estimate without any is a host's that sends no cap.
    let output_tokens = if estimate.output_tokens == 0 && request.operation == Operation::Chat {
        table.hold_output_tokens
    } else {
        estimate.output_tokens
    };
    let output_price = prices.output.max(prices.reasoning.unwrap_or(prices.output));
    let amount_picos = estimate
        .input_tokens
        .checked_mul(prices.input)
        .zip(output_tokens.checked_mul(output_price))
        .and_then(|(input, output)| input.checked_add(output))
        .ok_or_else(|| BillingDenial::BudgetExceeded("the estimate overflows".to_owned()))?;
    let floor = -i128::from(table.credit_limit_micros) * PICOS_PER_MICRO;
    if i128::from(request.balance_picos) - i128::from(amount_picos) < floor {
        return Err(BillingDenial::InsufficientBalance(
            "You exceeded your current quota: the balance does not cover this request.".to_owned(),
        ));
    }
    Ok(Hold { amount_picos })
}

/// Prices every usage field once: uncached input, cache reads, cache writes, visible output, reasoning.
fn price(prices: &ModelPrices, usage: &Usage) -> Result<Price, BillingError> {
    let overflow = || BillingError::Internal("usage breaks the subset rules".to_owned());
    let uncached_input = usage
        .input_tokens
        .checked_sub(usage.cache_read_tokens)
        .and_then(|rest| rest.checked_sub(usage.cache_write_tokens))
        .ok_or_else(overflow)?;
    let visible_output = usage
        .output_tokens
        .checked_sub(usage.reasoning_tokens)
        .ok_or_else(overflow)?;
    let parts = [
        ("input", uncached_input, prices.input),
        (
            "cache-read",
            usage.cache_read_tokens,
            prices.cache_read.unwrap_or(prices.input),
        ),
        (
            "cache-write",
            usage.cache_write_tokens,
            prices.cache_write.unwrap_or(prices.input),
        ),
        ("output", visible_output, prices.output),
        (
            "reasoning",
            usage.reasoning_tokens,
            prices.reasoning.unwrap_or(prices.output),
        ),
    ];
    let mut line_items = Vec::new();
    let mut amount_picos: u64 = 0;
    for (kind, tokens, price) in parts {
        if tokens == 0 {
            continue;
        }
        let amount = tokens
            .checked_mul(price)
            .ok_or_else(|| BillingError::Internal(format!("{kind} amount overflows")))?;
        amount_picos = amount_picos
            .checked_add(amount)
            .ok_or_else(|| BillingError::Internal("total overflows".to_owned()))?;
        line_items.push(LineItem {
            kind: kind.to_owned(),
            tokens,
            price_per_million_micros: price,
            amount_picos: amount,
        });
    }
    Ok(Price {
        amount_picos,
        line_items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cache_read: u64, cache_write: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: input,
            cache_read_tokens: cache_read,
            cache_write_tokens: cache_write,
            output_tokens: output,
            reasoning_tokens: reasoning,
            estimated: false,
        }
    }

    fn prices() -> ModelPrices {
        ModelPrices {
            input: 150_000,
            output: 600_000,
            cache_read: Some(75_000),
            cache_write: None,
            reasoning: Some(1_000_000),
        }
    }

    #[test]
    fn every_token_is_priced_once() {
        let price = price(&prices(), &usage(1000, 200, 100, 500, 300)).unwrap();
        // 700 uncached * 150_000 + 200 * 75_000 + 100 * 150_000 + 200 * 600_000 + 300 * 1_000_000
        assert_eq!(
            price.amount_picos,
            105_000_000 + 15_000_000 + 15_000_000 + 120_000_000 + 300_000_000
        );
        let tokens: u64 = price.line_items.iter().map(|item| item.tokens).sum();
        assert_eq!(tokens, 1000 + 500);
    }

    #[test]
    fn usage_breaking_the_subset_rule_is_an_error() {
        assert!(price(&prices(), &usage(10, 20, 0, 0, 0)).is_err());
        assert!(price(&prices(), &usage(10, 0, 0, 1, 2)).is_err());
    }

    fn table(credit_limit_micros: u64) -> PriceTable {
        PriceTable {
            models: BTreeMap::from([("m".to_owned(), prices())]),
            credit_limit_micros,
            hold_output_tokens: 100,
        }
    }

    fn authorize_request(model: &str, balance_picos: i64) -> AuthorizeRequest {
        AuthorizeRequest {
            request_id: "r".into(),
            tenant: "t".into(),
            key_id: "k".into(),
            operation: Operation::Chat,
            model: model.into(),
            estimated_usage: usage(10, 0, 0, 0, 0),
            balance_picos,
        }
    }

    #[test]
    fn hold_covers_prompt_and_output_cap_at_the_dearest_output_price() {
        let hold = authorize(&table(1_000), &authorize_request("m", 0)).unwrap();
        assert_eq!(hold.amount_picos, 10 * 150_000 + 100 * 1_000_000);
    }

    #[test]
    fn a_request_that_costs_nothing_is_refused_only_below_the_floor() {
        let mut request = authorize_request("m", -1_000_000_000);
        request.operation = Operation::Embeddings;
        request.estimated_usage = usage(0, 0, 0, 0, 0);
        assert!(authorize(&table(1_000), &request).is_ok(), "at the floor");
        request.balance_picos -= 1;
        assert!(matches!(
            authorize(&table(1_000), &request),
            Err(BillingDenial::InsufficientBalance(_))
        ));
    }

    #[test]
    fn balance_below_the_hold_is_denied() {
        let denial = authorize(&table(0), &authorize_request("m", 1)).unwrap_err();
        assert!(matches!(denial, BillingDenial::InsufficientBalance(_)));
        let unknown = authorize(&table(0), &authorize_request("x", i64::MAX)).unwrap_err();
        assert!(matches!(unknown, BillingDenial::UnpricedModel(_)));
    }
}
