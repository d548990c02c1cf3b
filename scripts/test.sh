#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (redis-server, cmake, python3 and a
# pinned virtual environment for the interop suite) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_missing redis-server:redis-server cmake:cmake
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust first (https://rustup.rs)" >&2
  exit 1
fi

cargo test --workspace --all-features "$@"
# The integration suite once more, on the Pingora engine (one test body, parameterised).
LLMGATE_TEST_ENGINE=pingora cargo test -p llmgate --all-features --test it "$@"
# The interop suite (docs/interop.md): the real eval-protocol client code and a real LiteLLM
# proxy around the gateway, on both engines.
scripts/interop.sh
LLMGATE_TEST_ENGINE=pingora scripts/interop.sh
