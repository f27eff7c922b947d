//! Builds the WebAssembly guests — the shipped plugins embedded in the binary and the hostile test
//! plugins the end-to-end tests load — with `cargo build --target wasm32-wasip2 --release`, so that a
//! plain `cargo build` yields a gateway that works offline with its defaults.
//!
//! The nested cargo uses its own target directory (`target/guests`): sharing the outer one would wait
//! forever on the lock the outer cargo holds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Every guest crate, by package name. The shipped ones are embedded by `plugin::shipped`.
const GUESTS: &[&str] = &[
    "tollgate-translator-openai",
    "tollgate-translator-anthropic",
    "tollgate-translator-gemini",
    "tollgate-router-failover",
    "tollgate-billing-price-table",
    "tollgate-router-cost-first",
    "tollgate-router-latency-first",
    "tollgate-router-least-busy",
    "tollgate-router-weighted",
    "tollgate-test-plugin-trap",
    "tollgate-test-plugin-answer-trap",
    "tollgate-test-plugin-endless-loop",
    "tollgate-test-plugin-billing-trap",
    "tollgate-test-plugin-billing-instance-probe",
    "tollgate-test-plugin-scripted-router",
    "tollgate-test-plugin-reads-files",
    "tollgate-test-plugin-not-a-plugin",
    "tier-router",
];

fn main() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let workspace = manifest_dir
        .parent()
        .ok_or("host/ has a parent directory")?
        .to_path_buf();
    for watched in [
        "wit",
        "plugins",
        "tests/plugins",
        "examples",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let target_dir = workspace.join("target").join("guests");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build
        .current_dir(&workspace)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
        .env("CARGO_TARGET_DIR", &target_dir)
        // The outer build's wrappers and flags are for the host target (clippy, coverage, …).
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    for guest in GUESTS {
        build.args(["-p", guest]);
    }
    let status = build
        .status()
        .map_err(|error| format!("could not run cargo for the wasm guests: {error}"))?;
    if !status.success() {
        return Err(format!(
            "building the wasm guests failed ({status}). Is the target installed? \
             Run `rustup target add wasm32-wasip2`, or `scripts/build-plugins.sh`."
        ));
    }
    println!(
        "cargo:rustc-env=TOLLGATE_GUEST_DIR={}",
        target_dir.join("wasm32-wasip2").join("release").display()
    );
    Ok(())
}
