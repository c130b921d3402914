#!/usr/bin/env bash
# Usage: launch/local.sh [--config FILE.yaml] [--section.key value ...]
#
# Starts a whole run on this machine: one learner (train.learner_ranks DeepSpeed ranks, under
# torchrun when more than one) and rollout.num_processes rollout processes (one vLLM engine each),
# on a CPU machine the learner on every core and the rollouts on the second half of the cores
# (protocol/placement.py). Ctrl-C, an error in any process, or the end of training stops every
# process it started.
#
#   launch/local.sh                         # the default job: tiny built-in model, A+B= task (configs/tiny.yaml)
#   launch/local.sh --train.num_steps 5     # ... with any config key changed
#   launch/local.sh --config my.yaml        # your model, prompts and reward (see configs/*.yaml)
#   launch/local.sh --model.path /models/qwen --data.path prompts.jsonl --reward.function my_reward.py:score
#   launch/local.sh --train.learner_ranks 2 # a 2-rank data-parallel learner (torchrun)
#
# Without --config and --model.path it runs configs/tiny.yaml; without a model.path it prepares the
# built-in task first (once, no download, in $TASK_DIR, default runs/arithmetic) and uses its model,
# and its prompts and reward unless data.path is given. Your own data needs a reward:
# --reward.function and/or --reward.model_path. Outputs (metrics, logs, final model) go to
# output.dir; rollout logs to <output.dir>/logs/rollout-I.log. No flags of its own besides -h/--help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"  # launch_init, has, read_config, check_start, cleanup, start_rollout(s), check_rollouts
launch_init "$@"

args=("$@")
if ! has --config && ! has --model.path; then
  args=(--config "$root/configs/tiny.yaml" "${args[@]}")
elif ! has --config; then  # say so: a key not given is not the tiny job's value either
  echo "config: the defaults (python -m learner --help) and your flags; no --config file"
fi
read_config model_path=model.path data_path=data.path reward_fn=reward.function reward_url=reward.url reward_model=reward.model_path \
  port=transport.port run_id=run_id rollouts=rollout.num_processes min_rollouts=transport.min_rollouts run_dir=output.dir \
  ranks=train.learner_ranks max_restarts=rollout.max_restarts
if [[ -z "$model_path" ]]; then
  task_dir="${TASK_DIR:-runs/arithmetic}"
  # its build's progress output is shown only if the build fails: an error stays the one line it is
  prepare_log="$(mktemp)"
  if ! prepared="$("$py" -m learner.tasks.arithmetic prepare --out "$task_dir" 2>"$prepare_log" | tail -n 1)"; then
    cat "$prepare_log" >&2; rm -f "$prepare_log"
    echo "$prog: preparing the built-in task in $task_dir failed (above)" >&2; exit 1
  fi
  rm -f "$prepare_log"
  task_path() { "$py" -c 'import json,os,sys; print(os.path.abspath(json.loads(sys.argv[1])[sys.argv[2]]))' "$prepared" "$1"; }
  args+=(--model.path "$(task_path model)")
  if [[ -z "$data_path" ]]; then  # the built-in task's prompts, and its reward (unless one is given)
    args+=(--data.path "$(task_path prompts)")
    [[ -z "$reward_fn$reward_url$reward_model" ]] && args+=(--reward.function learner.tasks.arithmetic:arithmetic_reward)
  fi
fi
[[ "$port" == 0 ]] && port="$(free_port)"
[[ -z "$run_id" ]] && run_id="local-$(date +%s)-$$"
args+=(--transport.port "$port" --run_id "$run_id")
# the learner hands out work once every rollout started here is up (the first steps are shared)
[[ "$min_rollouts" == 1 ]] && args+=(--transport.min_rollouts "$rollouts")
# inputs present, a reward given, and off loopback only with CURVE keys
check_start learner $(seq 0 $((rollouts - 1))) >/dev/null
mkdir -p "$run_dir/logs"

install_cleanup  # every process group started is stopped on exit, error or Ctrl-C

# CPU machines: the learner on every core with passive OpenMP waits, the rollouts pinned to the
# second half (protocol/placement.py; train.cpu_cores, rollout.cpu_cores): training needs about
# three times generation's arithmetic, and the learner takes the rollout cores while they idle.
learner_pin=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  while read -r role a b c; do
    if [[ "$role" == learner ]]; then
      learner_pin=(taskset -c "$a")
      # a learner thread whose core a rollout holds must sleep, not spin, while the others wait for it
      [[ "$c" == passive && -z "${OMP_WAIT_POLICY:-}" ]] && learner_pin=(env OMP_WAIT_POLICY=PASSIVE "${learner_pin[@]}")
      has --train.torch_threads || args+=(--train.torch_threads "$b")
    elif [[ -z "${VLLM_CPU_OMP_THREADS_BIND:-}" ]]; then  # a binding the user chose wins
      rollout_cores[$a]="$b"
    fi
  done < <("$py" -m protocol.placement "${args[@]}" || echo fail)
  [[ ${#learner_pin[@]} -gt 0 ]] || exit 2
fi
if [[ "$ranks" -gt 1 ]]; then
  learner_cmd=("${learner_pin[@]}" "$py" -m torch.distributed.run --nproc_per_node "$ranks" --master_port "$(free_port)" -m learner)
else
  learner_cmd=("${learner_pin[@]}" "$py" -m learner)
fi
echo "learner: ${learner_cmd[*]} (port $port, run $run_id); $rollouts rollout process(es)${rollout_cores[0]:+ on cores ${rollout_cores[*]}}; logs in $run_dir/logs"
setsid "${learner_cmd[@]}" "${args[@]}" &
learner_pid=$!
pids+=("$learner_pid")
start_rollouts 0 "$rollouts"

# The learner decides when the run is over. A rollout that dies is restarted (the learner
# re-issues its unanswered work and sends it the current weights) up to rollout.max_restarts times.
status=0
while kill -0 "$learner_pid" 2>/dev/null; do
  check_rollouts
  sleep 1
done
wait "$learner_pid" || status=$?
exit "$status"
