//! The billing role: price usage. The host moves the money; a plugin only computes amounts in picos
//! (10^-12 of the currency unit), so `tokens * price-per-million-micros` is exact.

pub use crate::types::{Operation, Usage};
pub use crate::wit::billing::exports::tollgate::plugin::billing::{
    AuthorizeRequest, BillingDenial, BillingError, CallOutcome, ChargeRequest, Hold, LineItem,
    Price,
};

/// A billing plugin. Implement it on a unit struct and export it with [`export_billing!`](crate::export_billing).
pub trait Billing {
    /// Checks the configuration JSON before the operator's binding takes effect. Accepts anything by default.
    fn validate_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Decides before the upstream call whether the request may go ahead, and how much to hold.
    fn authorize(request: AuthorizeRequest) -> Result<Hold, BillingDenial>;

    /// Prices the call after it ended.
    fn charge(request: ChargeRequest) -> Result<Price, BillingError>;
}

/// Exports a [`Billing`] implementation as the plugin's billing world.
#[macro_export]
macro_rules! export_billing {
    ($billing:ty) => {
        #[doc(hidden)]
        struct TollgateBillingExport;


        impl $crate::wit::billing::exports::tollgate::plugin::billing::Guest for TollgateBillingExport {
            fn validate_config(config: String) -> Result<(), String> {
                <$billing as $crate::billing::Billing>::validate_config(&config)
            }

            fn authorize(
                request: $crate::billing::AuthorizeRequest,
            ) -> Result<$crate::billing::Hold, $crate::billing::BillingDenial> {
                <$billing as $crate::billing::Billing>::authorize(request)
            }

            fn charge(
                request: $crate::billing::ChargeRequest,
            ) -> Result<$crate::billing::Price, $crate::billing::BillingError> {
                <$billing as $crate::billing::Billing>::charge(request)
            }
        }

        // Only a wasm build exports the world: a native build (for the plugin's unit tests) cannot
        // link the component-model export names, and holds the export here instead, so that the
        // plugin's own type is not dead code there.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(String) -> Result<(), String> =
            <TollgateBillingExport as $crate::wit::billing::exports::tollgate::plugin::billing::Guest>::validate_config;
        #[cfg(target_arch = "wasm32")]
        $crate::wit::billing::export_billing_world!(TollgateBillingExport with_types_in $crate::wit::billing);
    };
}

/// Builders for testing billing plugins natively (`cargo test`); set prices with
/// [`host::testing::set_config`](crate::host::testing::set_config).
pub mod testing {
    use super::{AuthorizeRequest, Operation, Usage};

    /// Usage of `input_tokens` prompt tokens and `output_tokens` generated ones, as reported.
    pub fn usage(input_tokens: u64, output_tokens: u64) -> Usage {
        Usage {
            input_tokens,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens,
            reasoning_tokens: 0,
            estimated: false,
        }
    }

    /// A chat request for `model` estimated at `estimated`, from a tenant whose balance is
    /// `balance_picos`.
    pub fn authorize_request(
        model: &str,
        estimated: Usage,
        balance_picos: i64,
    ) -> AuthorizeRequest {
        AuthorizeRequest {
            request_id: "test-request".into(),
            tenant: "tenant".into(),
            key_id: "key".into(),
            operation: Operation::Chat,
            model: model.into(),
            estimated_usage: estimated,
            balance_picos,
        }
    }
}
