//! The interfaces every plugin role shares (`host`, `types`), generated once: each role's bindings
//! (router, translator, billing) use these, and the sandbox implements `host` on them.

wasmtime::component::bindgen!({
    inline: "package tollgate:host-side; world shared {
        import tollgate:plugin/host@0.1.2;
        import tollgate:plugin/types@0.1.2;
    }",
    path: "../wit",
});

pub use tollgate::plugin::{host, types};
