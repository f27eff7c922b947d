//! {{name}}: a Tollgate billing plugin. It prices usage; the host moves the money. Amounts are
//! picos (10^-12 of the currency unit), so `tokens × price per million in micros` is exact.

use serde::Deserialize;
use tollgate_plugin_sdk::billing::{
    AuthorizeRequest, Billing, BillingDenial, BillingError, ChargeRequest, Hold, LineItem, Price,
};
use tollgate_plugin_sdk::export_billing;
use tollgate_plugin_sdk::host::{config, parse_config};

/// The configuration: one price for every model, per million tokens, in micro-units.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    input_micros_per_million: u64,
    output_micros_per_million: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            input_micros_per_million: 1_000_000,
            output_micros_per_million: 2_000_000,
        }
    }
}

fn settings() -> Settings {
    config::<Settings>().unwrap_or_default()
}

fn line(kind: &str, tokens: u64, price_per_million_micros: u64) -> LineItem {
    LineItem {
        kind: kind.to_owned(),
        tokens,
        price_per_million_micros,
        amount_picos: tokens.saturating_mul(price_per_million_micros),
    }
}

/// The billing plugin.
struct Plugin;

impl Billing for Plugin {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Settings>(config).map(|_| ())
    }

    fn authorize(request: AuthorizeRequest) -> Result<Hold, BillingDenial> {
        let prices = settings();
        let usage = request.estimated_usage;
        let amount = line("input", usage.input_tokens, prices.input_micros_per_million)
            .amount_picos
            .saturating_add(
                line("output", usage.output_tokens, prices.output_micros_per_million).amount_picos,
            );
        if i128::from(request.balance_picos) < i128::from(amount) {
            return Err(BillingDenial::InsufficientBalance(
                "The balance does not cover this request.".to_owned(),
            ));
        }
        Ok(Hold {
            amount_picos: amount,
        })
    }

    fn charge(request: ChargeRequest) -> Result<Price, BillingError> {
        let prices = settings();
        let line_items = vec![
            line("input", request.usage.input_tokens, prices.input_micros_per_million),
            line("output", request.usage.output_tokens, prices.output_micros_per_million),
        ];
        Ok(Price {
            amount_picos: line_items.iter().map(|item| item.amount_picos).sum(),
            line_items,
        })
    }
}

export_billing!(Plugin);

// `cargo test` runs these natively: the SDK stands in for the host (`host::testing`).
#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::billing::testing::{authorize_request, usage};
    use tollgate_plugin_sdk::host::testing::set_config;

    #[test]
    fn the_hold_prices_the_estimate_at_the_configured_prices() {
        set_config(r#"{"input_micros_per_million": 3, "output_micros_per_million": 5}"#);
        let request = authorize_request("test-model", usage(100, 10), 1_000_000);
        let hold = Plugin::authorize(request).expect("authorized");
        assert_eq!(hold.amount_picos, 100 * 3 + 10 * 5);
    }

    #[test]
    fn a_balance_short_of_the_hold_is_refused() {
        let request = authorize_request("test-model", usage(100, 10), 1);
        assert!(matches!(
            Plugin::authorize(request),
            Err(BillingDenial::InsufficientBalance(_))
        ));
    }
}
