#!/usr/bin/env bash
# Usage: launch/rollouts.sh [--count K] [--first-index I] --model.path M --run_id ID --transport.port P
#                           --transport.learner_host HOST [--section.key value ...]
#
# Starts rollout processes of a multi-node run on this node, pointed at a learner elsewhere
# (launch/learner.sh):
#
#   launch/rollouts.sh --count 2 --first-index 0 --config run.yaml --run_id exp1 \
#       --transport.learner_host 10.0.0.1 --transport.port 29400 --transport.curve_dir /shared/keys
#
# Its own flags:
#   --count K          rollout processes to start (default: rollout.num_processes)
#   --first-index I    index of the first (default 0); they are I .. I+K-1. Give every node its own
#                      range: the index names the rollout's CURVE key rollout-I and its log.
# Each process is `python -m rollout --index I`, in its own session, connected to
# transport.learner_host:transport.port with the learner's --run_id and model. A rollout that fails is
# restarted up to rollout.max_restarts times (the learner re-issues its work and sends it the current
# weights); one that fails before saying hello to the learner (its engine, model or config) stops
# them all at once. The script exits 0 once every rollout has exited 0 (the learner sent Shutdown), and with
# a rollout's status once one has failed more often than that. A rollout that hears nothing from the
# learner for transport.peer_timeout_s gives up (rollout.on_learner_lost). Logs:
# <output.dir>/logs/rollout-I.log. Ctrl-C, TERM or any exit stops every process this script started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
launch_init "$@"

die() { echo "$prog: $*" >&2; exit 2; }
count="" first=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --count) [[ $# -ge 2 ]] || die "--count needs a value"; count="$2"; shift 2 ;;
    --first-index) [[ $# -ge 2 ]] || die "--first-index needs a value"; first="$2"; shift 2 ;;
    --index) die "use --first-index (and --count) instead of --index" ;;
    *) args+=("$1"); shift ;;
  esac
done
read_config processes=rollout.num_processes model_path=model.path run_id=run_id port=transport.port \
  learner_host=transport.learner_host max_restarts=rollout.max_restarts run_dir=output.dir
[[ -z "$count" ]] && count="$processes"
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--count must be a positive integer, got '$count'"
[[ "$first" =~ ^[0-9]+$ ]] || die "--first-index must be a non-negative integer, got '$first'"
[[ -n "$model_path" ]] || die "--model.path (or a --config that sets it) is required: the learner's model"
[[ -n "$run_id" ]] || die "--run_id is required: the learner's"
[[ "$port" != 0 ]] || die "--transport.port is required: the learner's"
curve="$(check_start rollout $(seq "$first" $((first + count - 1))))" || exit 2
mkdir -p "$run_dir/logs"

install_cleanup  # every process group started is stopped on exit, error, Ctrl-C or TERM
echo "rollouts $first..$((first + count - 1)) -> $learner_host:$port (CURVE $curve, run $run_id); logs in $run_dir/logs"
start_rollouts "$first" "$count"
rollouts_alive="$count"
while [[ "$rollouts_alive" -gt 0 ]]; do
  sleep 1
  check_rollouts
done
echo "all $count rollout(s) finished"
