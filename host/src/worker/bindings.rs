//! Host-side bindings generated from `wit/plugin.wit`, and nothing else.
//!
//! The imported interfaces are implemented in [`super::host`], on top of [`crate::effects`]; the exports are called by
//! `worker` and `plugins::loader`.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
});
