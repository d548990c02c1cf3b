#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (redis-server, cmake, promtool from
# Debian's prometheus package, python3 and a pinned virtual environment for the interop suite)
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_missing redis-server:redis-server cmake:cmake promtool:prometheus
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust first (https://rustup.rs)" >&2
  exit 1
fi

# The README's run command builds the default feature set: no crate of it runs cmake, and that
# build refuses the Pingora engine with the command that gets it.
if cargo tree -p llmgate -e normal,build --prefix none | grep -q '^cmake '; then
  echo "the default build of llmgate needs cmake (the README's run command does not install it)" >&2
  exit 1
fi
refusal=$(timeout 300 cargo run -q -p llmgate --bin llmgate -- serve --engine pingora 2>&1 || true)
case "$refusal" in
  *"cargo run --release --features pingora -- serve --engine pingora"*) ;;
  *) echo "a build without the pingora feature does not say how to get it: $refusal" >&2; exit 1 ;;
esac

# The alert rules (deploy/prometheus): they parse, and each fires when it should and only then.
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

cargo test --workspace --all-features "$@"
# The integration suite once more, on the Pingora engine (one test body, parameterised).
LLMGATE_TEST_ENGINE=pingora cargo test -p llmgate --all-features --test it "$@"
# The interop suite (docs/interop.md): the real eval-protocol client code and a real LiteLLM
# proxy around the gateway, on both engines.
scripts/interop.sh
LLMGATE_TEST_ENGINE=pingora scripts/interop.sh
