//! The router role: order the channels a request tries.

pub use crate::types::Operation;
pub use crate::wit::router::exports::tollgate::plugin::router::{
    Attempt, Channel, ChannelModel, Circuit, RequestFacts, RouteError,
};

/// A router plugin. Implement it on a unit struct and export it with [`export_router!`](crate::export_router).
pub trait Router {
    /// Checks the configuration JSON before the operator's binding takes effect. Accepts anything by default.
    fn validate_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Orders the attempts for one request: the returned list is the failover chain.
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError>;
}

/// Exports a [`Router`] implementation as the plugin's router world.
#[macro_export]
macro_rules! export_router {
    ($router:ty) => {
        #[doc(hidden)]
        struct TollgateRouterExport;


        impl $crate::wit::router::exports::tollgate::plugin::router::Guest for TollgateRouterExport {
            fn validate_config(config: String) -> Result<(), String> {
                <$router as $crate::router::Router>::validate_config(&config)
            }

            fn plan(
                facts: $crate::router::RequestFacts,
                channels: Vec<$crate::router::Channel>,
            ) -> Result<Vec<$crate::router::Attempt>, $crate::router::RouteError> {
                <$router as $crate::router::Router>::plan(facts, channels)
            }
        }

        // Only a wasm build exports the world: a native build (for the plugin's unit tests) cannot
        // link the component-model export names.
        #[cfg(target_arch = "wasm32")]
        $crate::wit::router::export_router_world!(TollgateRouterExport with_types_in $crate::wit::router);
    };
}
