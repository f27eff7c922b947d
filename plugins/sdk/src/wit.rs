//! One `generate!` per role world. `pub_export_macro` keeps each world's exports out of this crate's
//! custom sections: the exports are described where a plugin invokes its `export_*!` macro, so a router
//! plugin never claims to export a translator. The shared `host` and `types` interfaces are generated
//! once (in `router`) and reused by the other worlds.

/// Bindings of `world router`.
pub mod router {
    wit_bindgen::generate!({
        world: "router-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_router_world",
        default_bindings_module: "tollgate_plugin_sdk::wit::router",
        generate_all,
    });
}

/// Bindings of `world translator`.
pub mod translator {
    wit_bindgen::generate!({
        world: "translator-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_translator_world",
        default_bindings_module: "tollgate_plugin_sdk::wit::translator",
        with: {
            "tollgate:plugin/host@0.1.2": crate::wit::router::tollgate::plugin::host,
            "tollgate:plugin/types@0.1.2": crate::wit::router::tollgate::plugin::types,
        },
    });
}

/// Bindings of `world billing`.
pub mod billing {
    wit_bindgen::generate!({
        world: "billing-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_billing_world",
        default_bindings_module: "tollgate_plugin_sdk::wit::billing",
        with: {
            "tollgate:plugin/host@0.1.2": crate::wit::router::tollgate::plugin::host,
            "tollgate:plugin/types@0.1.2": crate::wit::router::tollgate::plugin::types,
        },
    });
}
