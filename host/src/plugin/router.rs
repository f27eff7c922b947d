//! Bindings of `world router-plugin` and the typed call the route stage makes.

use super::{Binding, Exports, PluginError, Role};

wasmtime::component::bindgen!({
    world: "router-plugin",
    path: "../wit",
    exports: { default: async },
    with: {
        "tollgate:plugin/host": super::wit::host,
        "tollgate:plugin/types": super::wit::types,
    },
});

pub use exports::tollgate::plugin::router::{
    Attempt, Channel, ChannelModel, Circuit, RequestFacts, RouteError,
};

impl Binding {
    /// Asks the router for the plan of one request. The outer error is the plugin's failure; the
    /// inner one the router's own refusal.
    pub async fn plan(
        &self,
        facts: &RequestFacts,
        channels: &[Channel],
    ) -> Result<Result<Vec<Attempt>, RouteError>, PluginError> {
        let Exports::Router(indices) = &self.compiled.exports else {
            return Err(self.wrong_role(Role::Router));
        };
        let output_bytes = |plan: &Result<Vec<Attempt>, RouteError>| match plan {
            Ok(attempts) => attempts
                .iter()
                .map(|attempt| attempt.channel.len() + attempt.upstream_model.len())
                .sum(),
            Err(RouteError::NoRoute(message) | RouteError::Refused(message)) => message.len(),
        };
        let plan = async |store: &mut wasmtime::Store<_>, instance| {
            let plugin = indices.load(&mut *store, &instance)?;
            plugin
                .tollgate_plugin_router()
                .call_plan(&mut *store, facts, channels)
                .await
        };
        self.call("plan", plan, output_bytes).await
    }

    pub(super) async fn router_validate_config(&self) -> Result<Result<(), String>, PluginError> {
        let Exports::Router(indices) = &self.compiled.exports else {
            return Err(self.wrong_role(Role::Router));
        };
        self.call(
            "validate-config",
            async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                plugin
                    .tollgate_plugin_router()
                    .call_validate_config(&mut *store, &self.config)
                    .await
            },
            |_| 0,
        )
        .await
    }
}
