#!/usr/bin/env bash
# Builds the shipped plugins as WebAssembly components into target/wasm32-wasip2/release/, for
# operators who load them from files. (`cargo build -p tollgate` also builds and embeds them.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --release --target wasm32-wasip2 \
    -p tollgate-translator-openai -p tollgate-translator-anthropic -p tollgate-translator-gemini \
    -p tollgate-router-failover -p tollgate-billing-price-table \
    -p tollgate-router-cost-first -p tollgate-router-latency-first -p tollgate-router-least-busy \
    -p tollgate-router-weighted
ls -1 target/wasm32-wasip2/release/*.wasm
