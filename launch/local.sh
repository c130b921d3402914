#!/usr/bin/env bash
# All processes on this machine: one learner (N DeepSpeed ranks) and R rollout processes.
#
#   launch/local.sh                         # the default job: tiny model, A+B= task
#   launch/local.sh --config my.yaml        # any Hugging Face model and prompt dataset
#   launch/local.sh --train.num_steps 5     # any config key as a flag
#   launch/local.sh --train.learner_ranks 2 # a 2-rank data-parallel learner (torchrun)
#
# Without --model.path/--data.path it prepares the built-in task first (once; no download).
# Ctrl-C, an error in any process, or the end of training stops every process it started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/launch/setup_env.sh"
py="${STREAMRLHF_VENV:-$root/.venv}/bin/python"

args=("$@")
has() { local k; for k in "${args[@]}"; do [[ "$k" == "$1" ]] && return 0; done; return 1; }
config_value() {  # the effective value of a config key (YAML file + flags), read by the config loader itself
  "$py" -m protocol.config_get "$1" "${args[@]}"
}
if ! has --config && ! has --model.path; then
  args=(--config configs/tiny.yaml "${args[@]}")
fi
if [[ -z "$(config_value model.path)" ]]; then
  task_dir="${TASK_DIR:-runs/arithmetic}"
  prepared="$("$py" -m learner.tasks.arithmetic prepare --out "$task_dir" | tail -n 1)"
  args+=(--model.path "$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$prepared")")
  [[ -z "$(config_value data.path)" ]] && \
    args+=(--data.path "$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["prompts"])' "$prepared")")
fi
port="$(config_value transport.port)"
[[ "$port" == 0 ]] && port="$("$py" -c 'from protocol.transport import free_tcp_port; print(free_tcp_port())')"
run_id="$(config_value run_id)"
[[ -z "$run_id" ]] && run_id="local-$(date +%s)-$$"
args+=(--transport.port "$port" --run_id "$run_id")
rollouts="$(config_value rollout.num_processes)"
run_dir="$(config_value output.dir)"
mkdir -p "$run_dir/logs"

pids=()       # process-group leaders of everything started (restarted rollouts included), for cleanup
rollout_pid=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_rollout() {  # each process in its own session, so its vLLM engine processes go with it
  setsid "$py" -m rollout --index "$1" "${args[@]}" >>"$run_dir/logs/rollout-$1.log" 2>&1 &
  rollout_pid[$1]=$!
  pids+=("$!")
}

ranks="$(config_value train.learner_ranks)"
if [[ "$ranks" -gt 1 ]]; then
  learner_cmd=("$py" -m torch.distributed.run --nproc_per_node "$ranks" --master_port "$("$py" -c 'from protocol.transport import free_tcp_port; print(free_tcp_port())')" -m learner)
else
  learner_cmd=("$py" -m learner)
fi
max_restarts="$(config_value rollout.max_restarts)"
echo "learner: ${learner_cmd[*]} (port $port, run $run_id); $rollouts rollout process(es); logs in $run_dir/logs"
setsid "${learner_cmd[@]}" "${args[@]}" &
learner_pid=$!
pids+=("$learner_pid")
restarts=()
for ((i = 0; i < rollouts; i++)); do
  restarts[$i]=0
  start_rollout "$i"
done

# The learner decides when the run is over. A rollout that dies is restarted (the learner
# re-issues its unanswered work and sends it the current weights) up to rollout.max_restarts times.
status=0
while kill -0 "$learner_pid" 2>/dev/null; do
  for ((i = 0; i < rollouts; i++)); do
    pid="${rollout_pid[$i]}"
    [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null && continue
    wait "$pid" && rc=0 || rc=$?
    rollout_pid[$i]=""
    [[ "$rc" -eq 0 ]] && continue  # told to stop by the learner
    if [[ "${restarts[$i]}" -lt "$max_restarts" ]]; then
      restarts[$i]=$((restarts[$i] + 1))
      echo "rollout $i exited with status $rc; restarting it (${restarts[$i]}/$max_restarts)" >&2
      start_rollout "$i"
    else
      echo "rollout $i exited with status $rc after ${restarts[$i]} restart(s); last lines of its log:" >&2
      tail -n 20 "$run_dir/logs/rollout-$i.log" >&2
      exit "$rc"
    fi
  done
  sleep 1
done
wait "$learner_pid" || status=$?
exit "$status"
