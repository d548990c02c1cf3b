#!/usr/bin/env bash
# The end-to-end load benchmark: bare proxy hop vs the full reference proxy, both engines.
# Installs what it needs (redis-server, cmake, python3 via apt; oha via cargo) when missing,
# builds the release binaries, then runs scripts/bench.py (settings: see its docstring).
# Writes docs/bench-result.json and the "End-to-end" section of docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (cargo install, a few minutes once)"
  cargo install oha --locked --quiet
fi
cargo build --release --quiet --bin llmgate
cargo build --release --quiet -p llmgate-test-support --bin langfuse-stand-in
# 1,000 open streams need twice as many sockets, plus the load generator's.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench.py "$@"
