#!/usr/bin/env bash
# The interop suite (tests/interop, docs/interop.md): llmgate against real eval-protocol client
# modules, a real LiteLLM proxy with its langfuse_otel callback, the OpenAI SDK, redis-server and
# the Langfuse stand-in. Arguments go to pytest (e.g. `scripts/interop.sh -k defect3 -x`).
#
# Environment:
#   LLMGATE_BIN, LANGFUSE_STAND_IN_BIN  use these binaries instead of building them
#   LLMGATE_TEST_ENGINE=hyper|pingora   the gateway's engine (default hyper)
#   INTEROP_VENV                        the virtual environment (default: a cached one, below)
#   INTEROP_LOG_DIR                     keep the processes' logs there (default: pytest's tmp dir)
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_missing python3:python3 redis-server:redis-server

req=tests/interop/requirements.txt
req_nodeps=tests/interop/requirements-nodeps.txt
python_version=$(python3 -c 'import sys; print(sys.version.split()[0])')
hash=$(cat "$req" "$req_nodeps" <(echo "$python_version") | sha256sum | cut -c1-16)
venv=${INTEROP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmgate/interop-$hash}

# make_venv DIR: python3 -m venv; on Debian, where ensurepip lives in python3-venv, installs that
# package first (install_missing installs the package of a command missing from the PATH; no
# command stands for the venv module, so the name given is one that is never there).
make_venv() {
  if python3 -m venv "$1" >/dev/null 2>&1; then
    return 0
  fi
  rm -rf "$1"
  install_missing "llmgate-interop-python3-venv:python3-venv"
  python3 -m venv "$1"
}

if [ ! -f "$venv/.complete" ]; then
  echo "interop: creating the virtual environment $venv (once per requirements change)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  make_venv "$venv"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" ||
    ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req_nodeps"; then
    echo "interop: installing the requirements into $venv FAILED" >&2
    rm -rf "$venv"
    exit 1
  fi
  LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c \
    'import eval_protocol.pytest.remote_rollout_processor, eval_protocol.adapters.langfuse, litellm.proxy.proxy_server' ||
    { echo "interop: the virtual environment $venv cannot import what the suite needs" >&2; rm -rf "$venv"; exit 1; }
  touch "$venv/.complete"
fi

if [ -z "${LLMGATE_BIN:-}" ] || [ -z "${LANGFUSE_STAND_IN_BIN:-}" ]; then
  # With the Pingora engine (the cargo feature `pingora`, which needs cmake): the suite runs on both.
  install_missing cmake:cmake
  cargo build -p llmgate --features llmgate/pingora --bin llmgate -p llmgate-test-support --bin langfuse-stand-in
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  export LLMGATE_BIN=${LLMGATE_BIN:-$target_dir/debug/llmgate}
  export LANGFUSE_STAND_IN_BIN=${LANGFUSE_STAND_IN_BIN:-$target_dir/debug/langfuse-stand-in}
fi
export LLMGATE_TEST_ENGINE=${LLMGATE_TEST_ENGINE:-hyper}

echo "interop: engine $LLMGATE_TEST_ENGINE, llmgate $LLMGATE_BIN"
exec "$venv/bin/python" -m pytest -p no:cacheprovider tests/interop "$@"
