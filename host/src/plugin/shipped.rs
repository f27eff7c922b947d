//! The plugins compiled into the binary (built by `host/build.rs`), used when the config names a
//! plugin by its shipped name rather than a file.

use super::Role;

/// A plugin shipped inside the binary.
pub struct ShippedPlugin {
    /// The name a config uses for it.
    pub name: &'static str,
    /// Its role.
    pub role: Role,
    /// The component bytes.
    pub bytes: &'static [u8],
}

/// Every shipped plugin.
pub const SHIPPED: &[ShippedPlugin] = &[
    ShippedPlugin {
        name: "openai",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_openai.wasm"
        )),
    },
    ShippedPlugin {
        name: "anthropic",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_anthropic.wasm"
        )),
    },
    ShippedPlugin {
        name: "gemini",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_gemini.wasm"
        )),
    },
    ShippedPlugin {
        name: "failover",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_failover.wasm"
        )),
    },
    ShippedPlugin {
        name: "cost-first",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_cost_first.wasm"
        )),
    },
    ShippedPlugin {
        name: "latency-first",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_latency_first.wasm"
        )),
    },
    ShippedPlugin {
        name: "least-busy",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_least_busy.wasm"
        )),
    },
    ShippedPlugin {
        name: "weighted",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_weighted.wasm"
        )),
    },
    ShippedPlugin {
        name: "price-table",
        role: Role::Billing,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_billing_price_table.wasm"
        )),
    },
];

/// The shipped plugin of this role and name, if there is one.
pub fn find(role: Role, name: &str) -> Option<&'static ShippedPlugin> {
    SHIPPED
        .iter()
        .find(|plugin| plugin.role == role && plugin.name == name)
}
