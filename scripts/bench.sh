#!/usr/bin/env bash
# The end-to-end load benchmark: bare proxy hop vs the full reference proxy, both engines.
# Installs what it needs (redis-server, cmake, python3 via apt; oha via cargo) when missing,
# builds the release binaries, then runs scripts/bench.py (settings: see its docstring).
# Writes docs/bench-result.json and the "End-to-end" section of docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_missing redis-server:redis-server cmake:cmake python3:python3
install_oha
cargo build --release --quiet --features pingora --bin llmgate
cargo build --release --quiet -p llmgate-test-support --bin langfuse-stand-in
# 1,000 open streams need twice as many sockets, plus the load generator's.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench.py "$@"
