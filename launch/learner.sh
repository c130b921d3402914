#!/usr/bin/env bash
# Usage: [NNODES=.. NODE_RANK=.. MASTER_ADDR=.. MASTER_PORT=.. | HOSTFILE=..] [DRY_RUN=1]
#        launch/learner.sh --model.path M --data.path D --run_id ID --transport.port P [--section.key value ...]
#
# Starts the learner of a multi-node run, alone; the rollouts run elsewhere (launch/rollouts.sh).
#
#   launch/learner.sh --config run.yaml --run_id exp1 --transport.port 29400 \
#       --transport.bind_host 10.0.0.1 --transport.curve_dir /shared/keys
#   launch/learner.sh ... --train.learner_ranks 4                        # 4 ranks on this node (torchrun)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 MASTER_PORT=29500 launch/learner.sh ... --train.learner_ranks 4
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 MASTER_PORT=29500 launch/learner.sh ... --train.learner_ranks 4
#   HOSTFILE=hosts launch/learner.sh ... --train.learner_ranks 4         # DeepSpeed launcher, all hosts
#
# Every rollout must get the same --run_id, --transport.port and model (launch/rollouts.sh with
# --transport.learner_host set to this node's address), so all are required here (no port 0), with
# --data.path and a reward (--reward.function, --reward.url and/or --reward.model_path).
# The learner binds transport.bind_host:transport.port (rank 0 only). Anything but a loopback
# address needs CURVE (--transport.curve_dir, keys from `python -m protocol.keys generate`) unless
# --transport.curve_required_off_loopback false; this is checked before anything starts.
# Learner ranks (--train.learner_ranks N, N per node):
#   N = 1 and NNODES unset: `python -m learner`.
#   otherwise: torchrun --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR
#     --master_port $MASTER_PORT --nproc_per_node N -m learner. NNODES defaults to 1, NODE_RANK to 0;
#     with NNODES > 1 run this script on every learner node with the same MASTER_ADDR (the node with
#     NODE_RANK 0, whose rank 0 binds bind_host) and MASTER_PORT (default 29500); with NNODES = 1
#     they default to 127.0.0.1 and a free port.
#   HOSTFILE set: the DeepSpeed launcher starts every rank on every host of the hostfile
#     ("host slots=N" lines) from this one command: `deepspeed --hostfile $HOSTFILE --num_gpus N
#     [--master_addr ...] [--master_port ...] --module learner`. It needs passwordless ssh (and pdsh)
#     from this node to every host, the repository and .venv at the same path on every host, and
#     numactl where cores are bound to ranks (DEEPSPEED_ARGS=--bind_cores_to_rank). The first host
#     runs rank 0, so bind_host must be one of its addresses.
# DRY_RUN=1 prints the command instead of running it. Ctrl-C or TERM stops the learner's process
# group. The exit status is the learner's. No flags of its own besides -h/--help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
launch_init "$@"

args=("$@")
die() { echo "$prog: $*" >&2; exit 2; }
read_config model_path=model.path data_path=data.path run_id=run_id port=transport.port \
  ranks=train.learner_ranks bind_host=transport.bind_host
[[ -n "$model_path" && -n "$data_path" ]] || \
  die "--model.path and --data.path (or a --config that sets them) are required; for the built-in task run" \
      "\`python -m learner.tasks.arithmetic prepare --out DIR\` on shared storage and pass its model and prompts"
[[ -n "$run_id" ]] || die "--run_id is required (the rollouts must be given the same one)"
[[ "$port" != 0 ]] || die "--transport.port is required (the rollouts connect to it; 0 would pick one they cannot know)"
curve="$(check_start learner)" || exit 2

nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ "$HOSTFILE" == /* ]] || HOSTFILE="$caller_dir/$HOSTFILE"  # relative to where this was run, as the flags
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE does not exist"
  learner_cmd=("$(dirname "$py")/deepspeed" --hostfile "$HOSTFILE" --num_gpus "$ranks"
               ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"}
               ${DEEPSPEED_ARGS:-} --module learner)
elif [[ "$ranks" -gt 1 || "$nnodes" -gt 1 ]]; then
  if [[ "$nnodes" -gt 1 ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$nnodes needs MASTER_ADDR (the address of the node with NODE_RANK 0)"
    master_addr="$MASTER_ADDR" master_port="${MASTER_PORT:-29500}"
  else
    master_addr="${MASTER_ADDR:-127.0.0.1}" master_port="${MASTER_PORT:-$(free_port)}"
  fi
  learner_cmd=("$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank"
               --master_addr "$master_addr" --master_port "$master_port" --nproc_per_node "$ranks" -m learner)
else
  learner_cmd=("$py" -m learner)
fi
echo "learner: ${learner_cmd[*]} (listening on $bind_host:$port, CURVE $curve, run $run_id)"
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${learner_cmd[@]}" "${args[@]}"; echo
  exit 0
fi

install_cleanup  # the learner's process group is stopped on exit, error, Ctrl-C or TERM
setsid "${learner_cmd[@]}" "${args[@]}" &
learner_pid=$!
pids+=("$learner_pid")
status=0
wait "$learner_pid" || status=$?
exit "$status"
