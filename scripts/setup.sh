#!/usr/bin/env bash
# Installs what building and testing Tollgate needs and a fresh machine may lack:
# the wasm32-wasip2 Rust target (plugins), the official `openai` SDKs for Python and Node.js and the
# official `anthropic` Python SDK (end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: adding the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi

if [[ "${1:-}" == "--with-test-deps" ]]; then
    if ! python3 -c "import openai, anthropic" 2>/dev/null; then
        echo "setup: installing the openai and anthropic Python SDKs" >&2
        python3 -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
    fi
    if [[ ! -d tests/sdk/node_modules/openai ]]; then
        echo "setup: installing the openai npm package" >&2
        npm ci --prefix tests/sdk --no-audit --no-fund --loglevel=error
    fi
fi
