#!/usr/bin/env bash
# Rollout processes of a multi-node run on this node, pointed at a learner elsewhere (launch/learner.sh).
#
#   launch/rollouts.sh --count 2 --first-index 0 --config run.yaml --run_id exp1 \
#       --transport.learner_host 10.0.0.1 --transport.port 29400 --transport.curve_dir /shared/keys
#
# Starts --count K (default rollout.num_processes) processes `python -m rollout --index I`, for
# I = --first-index .. first+K-1 (default 0; give every node its own range: the index names the
# rollout's CURVE key rollout-I and its log), each in its own session, connected to
# transport.learner_host:transport.port with the learner's --run_id and model. A rollout that fails is
# restarted up to rollout.max_restarts times (the learner re-issues its work and sends it the current
# weights); the script exits 0 once every rollout has exited 0 (the learner sent Shutdown), and with
# a rollout's status once one has failed more often than that. A rollout that hears nothing from the
# learner for transport.peer_timeout_s gives up. Logs: <output.dir>/logs/rollout-I.log.
# Ctrl-C, TERM or any exit stops every process this script started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
launch_init

die() { echo "launch/rollouts.sh: $*" >&2; exit 2; }
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
[[ -z "$count" ]] && count="$(config_value rollout.num_processes)"
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--count must be a positive integer, got '$count'"
[[ "$first" =~ ^[0-9]+$ ]] || die "--first-index must be a non-negative integer, got '$first'"
[[ -n "$(config_value model.path)" ]] || die "--model.path (or a --config that sets it) is required: the learner's model"
[[ -n "$(config_value run_id)" ]] || die "--run_id is required: the learner's"
port="$(config_value transport.port)"
[[ "$port" != 0 ]] || die "--transport.port is required: the learner's"
curve="$(check_transport rollout $(seq "$first" $((first + count - 1))))" || exit 2
max_restarts="$(config_value rollout.max_restarts)"
run_dir="$(config_value output.dir)"
mkdir -p "$run_dir/logs"

install_cleanup  # every process group started is stopped on exit, error, Ctrl-C or TERM
echo "rollouts $first..$((first + count - 1)) -> $(config_value transport.learner_host):$port (CURVE $curve," \
     "run $(config_value run_id)); logs in $run_dir/logs"
start_rollouts "$first" "$count"
rollouts_alive="$count"
while [[ "$rollouts_alive" -gt 0 ]]; do
  sleep 1
  check_rollouts
done
echo "all $count rollout(s) finished"
