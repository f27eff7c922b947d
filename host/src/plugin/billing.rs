//! Bindings of `world billing-plugin` and the typed calls the bill stage makes.

use std::time::Duration;

use super::{Binding, Exports, PluginError, Role, sandbox};

/// How long pricing waits for a pool slot at most, and between tries: the reserve is sized so it
/// never waits; a pool taken whole still prices the call once anything ends.
const MOST_SETTLEMENT_WAIT: Duration = Duration::from_secs(30);
const SETTLEMENT_RETRY: Duration = Duration::from_millis(10);

wasmtime::component::bindgen!({
    world: "billing-plugin",
    path: "../wit",
    exports: { default: async },
    with: {
        "tollgate:plugin/host": super::wit::host,
        "tollgate:plugin/types": super::wit::types,
    },
});

pub use exports::tollgate::plugin::billing::{
    AuthorizeRequest, BillingDenial, BillingError, CallOutcome, ChargeRequest, Hold, Price,
};

impl Binding {
    /// Asks the billing plugin whether the request may go ahead and what to hold.
    pub async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<Result<Hold, BillingDenial>, PluginError> {
        let Exports::Billing(indices) = &self.compiled.exports else {
            return Err(self.wrong_role(Role::Billing));
        };
        self.call(
            "authorize",
            async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                plugin
                    .tollgate_plugin_billing()
                    .call_authorize(&mut *store, request)
                    .await
            },
            |_| 0,
        )
        .await
    }

    /// Asks the billing plugin to price a finished call. Pricing draws on the pool's reserve, and
    /// waits for a slot while even that is in use: a request that was served is always priced.
    pub async fn charge(
        &self,
        request: &ChargeRequest,
    ) -> Result<Result<Price, BillingError>, PluginError> {
        let mut waited = Duration::ZERO;
        loop {
            match self.charge_once(request).await {
                Err(PluginError::PoolFull { .. }) if waited < MOST_SETTLEMENT_WAIT => {
                    tokio::time::sleep(SETTLEMENT_RETRY).await;
                    waited += SETTLEMENT_RETRY;
                }
                priced => return priced,
            }
        }
    }

    async fn charge_once(
        &self,
        request: &ChargeRequest,
    ) -> Result<Result<Price, BillingError>, PluginError> {
        let Exports::Billing(indices) = &self.compiled.exports else {
            return Err(self.wrong_role(Role::Billing));
        };
        let mut store = self.settlement_store();
        let price = self
            .call_in(&mut store, "charge", async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                plugin
                    .tollgate_plugin_billing()
                    .call_charge(&mut *store, request)
                    .await
            })
            .await?;
        if let Ok(price) = &price {
            // Each line item is stored with the usage record: its text and three numbers.
            let bytes = price
                .line_items
                .iter()
                .map(|item| item.kind.len() + 24)
                .sum();
            sandbox::check_output(&store, "charge", bytes)?;
        }
        Ok(price)
    }

    pub(super) async fn billing_validate_config(&self) -> Result<Result<(), String>, PluginError> {
        let Exports::Billing(indices) = &self.compiled.exports else {
            return Err(self.wrong_role(Role::Billing));
        };
        self.call(
            "validate-config",
            async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                plugin
                    .tollgate_plugin_billing()
                    .call_validate_config(&mut *store, &self.config)
                    .await
            },
            |_| 0,
        )
        .await
    }
}
