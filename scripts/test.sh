#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests (host and plugins, natively) and the
# end-to-end tests, which start the real `tollgate` binary with the real compiled plugins.
# `cargo build` of the host also builds the wasm plugins (host/build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-test-deps
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
