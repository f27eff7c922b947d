#!/usr/bin/env bash
# Installs what building and testing Tollgate needs and a fresh machine may lack: the
# wasm32-wasip2 Rust target (plugins); with --with-test-deps also cargo-nextest (when missing), and
# the official `openai` and `anthropic` SDKs for Python (in tests/sdk/.venv, never the system's
# Python) and the `openai` npm package (in tests/sdk/node_modules).
# --dry-run says what it would install and installs nothing.
# What it cannot install it checks, with a clear message: Rust 1.95 with rustup, python3 >= 3.11
# and node >= 20.
set -euo pipefail
cd "$(dirname "$0")/.."

NEXTEST_VERSION=0.9.143
VENV=tests/sdk/.venv

with_test_deps=false
dry_run=false
for option in "$@"; do
    case "$option" in
        --with-test-deps) with_test_deps=true ;;
        --dry-run) dry_run=true ;;
        *) echo "setup: unknown option $option (use --with-test-deps, --dry-run)" >&2; exit 2 ;;
    esac
done

missing() {
    echo "setup: $1" >&2
    exit 1
}

# Says what is installed, then installs it (unless --dry-run).
install() {
    local what=$1
    shift
    if $dry_run; then
        echo "setup: would install $what" >&2
    else
        echo "setup: installing $what" >&2
        "$@"
    fi
}

command -v rustup >/dev/null || missing "Rust 1.95 with rustup is required (https://rustup.rs)"
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
[[ "$rust_minor" =~ ^[0-9]+$ && "$rust_minor" -ge 95 ]] ||
    missing "Rust 1.95 or newer is required; this is $(rustc --version) (rustup update)"

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    install "the wasm32-wasip2 target" rustup target add wasm32-wasip2
fi

$with_test_deps || exit 0

command -v python3 >/dev/null || missing "python3 3.11 or newer is required for the SDK tests"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    missing "python3 3.11 or newer is required; this is $(python3 --version)"
command -v node >/dev/null || missing "node 20 or newer (with npm) is required for the SDK tests"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' ||
    missing "node 20 or newer is required; this is $(node --version)"

if ! cargo nextest --version >/dev/null 2>&1; then
    install "cargo-nextest $NEXTEST_VERSION (scripts/test.sh runs the tests with it)" \
        cargo install --locked cargo-nextest --version "$NEXTEST_VERSION"
fi

if [[ ! -x "$VENV/bin/python3" ]]; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        install "python3-venv (Debian's python3 needs it for a virtual environment)" \
            apt-get install -y --no-install-recommends python3-venv
    fi
    install "a Python virtual environment in $VENV" python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python3" -c "import openai, anthropic" 2>/dev/null; then
    install "the openai and anthropic Python SDKs into $VENV" \
        "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check \
        -r tests/sdk/requirements.txt
fi

if [[ ! -d tests/sdk/node_modules/openai ]]; then
    install "the openai npm package into tests/sdk/node_modules" \
        npm ci --prefix tests/sdk --no-audit --no-fund --loglevel=error
fi
