#!/usr/bin/env bash
# Runs the whole test suite (fast unit tests first, then the end-to-end tests that start real
# vLLM rollouts, ZeroMQ sockets and a DeepSpeed learner). Creates the environment on first use.
#   launch/test.sh                 # everything
#   launch/test.sh -m "not e2e"    # only the fast unit tests
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/launch/setup_env.sh"
exec "${STREAMRLHF_VENV:-$root/.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
