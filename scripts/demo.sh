#!/usr/bin/env bash
# Starts the gateway with its embedded defaults, answering offline: the upstream simulator (a
# SIMULATED OpenAI upstream, not a real model) on 127.0.0.1:8099, then `tollgate serve` on
# 127.0.0.1:8080 with data in ./data. On the first run it creates tenant `demo` and prints its key.
# Set OPENAI_API_KEY to bring the real OpenAI channel alive as well.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked -p tollgate -p tollgate-simulator
target/debug/tollgate-simulator --listen 127.0.0.1:8099 &
simulator=$!
trap 'kill "$simulator" 2>/dev/null || true' EXIT
target/debug/tollgate serve
