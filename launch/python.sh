#!/usr/bin/env bash
# Usage: launch/python.sh [PYTHON ARGUMENTS ...]
#
# Runs the repository's Python (its .venv, created on first use) with these arguments in the
# directory you run this from, the repository's packages importable: for its modules, from
# anywhere. It starts nothing else. For example, the built-in task's tiny model in ./tiny-task:
#
#   ~/StreamRLHF/launch/python.sh -m learner.tasks.arithmetic prepare --out tiny-task
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"  # script_help
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { script_help; exit 0; }
"$root/launch/setup_env.sh"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "${STREAMRLHF_VENV:-$root/.venv}/bin/python" "$@"
