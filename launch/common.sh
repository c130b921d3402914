# Shared helpers of the launch scripts (local.sh, learner.sh, rollouts.sh); sourced, not run.
#
# The sourcing script sets `root` (the repository) before sourcing and `args` (the config flags
# every process gets) before calling the helpers that read the config. Nothing here starts a
# process or changes directory when sourced; `launch_init` does both set-up steps.

# cd to the repository, create the environment on first use, set `py` (the venv's python).
launch_init() {
  cd "$root"
  "$root/launch/setup_env.sh"
  py="${STREAMRLHF_VENV:-$root/.venv}/bin/python"
}

has() { local k; for k in "${args[@]}"; do [[ "$k" == "$1" ]] && return 0; done; return 1; }

config_value() {  # the effective value of a config key (YAML file + flags), read by the config loader itself
  "$py" -m protocol.config_get "$1" "${args[@]}"
}

config_values() {  # VAR=KEY ...: set each shell variable VAR to config_value KEY, with one Python start
  local pairs=("$@") keys=() values=() text i
  for i in "${!pairs[@]}"; do keys+=("${pairs[$i]#*=}"); done
  text="$("$py" -m protocol.config_get "$(IFS=,; echo "${keys[*]}")" "${args[@]}")" || exit 2
  mapfile -t values <<<"$text"
  for i in "${!pairs[@]}"; do printf -v "${pairs[$i]%%=*}" '%s' "${values[$i]}"; done
}

free_port() { "$py" -c 'from protocol.transport import free_tcp_port; print(free_tcp_port())'; }

# Refuse unauthenticated plain TCP off the loopback interface (protocol.transport.
# check_transport_security: transport.bind_host / learner_host, curve_dir,
# curve_required_off_loopback) and, with CURVE, load the keys the processes will load. The learner
# and the rollouts check this themselves too, the learner only after loading its model; this fails
# in a second. Usage: check_transport learner | check_transport rollout INDEX...
# Prints "on" or "off" (CURVE); exits 2, with the reason, when the transport or a key is refused.
check_transport() {
  local curve
  curve="$("$py" - "$@" -- "${args[@]}" <<'PY'
import argparse, sys
from protocol.config import ConfigError, add_config_arguments, config_from_args
from protocol.keys import CurveKeyError, client_keys_from_dir, server_keys_from_dir
from protocol.transport import check_transport_security
split = sys.argv.index("--")
role, indices, flags = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
parser = argparse.ArgumentParser(prog=f"launch/{role}")
add_config_arguments(parser)
cfg = config_from_args(parser.parse_args(flags))
try:
    curve = check_transport_security(cfg)
    if curve and role == "learner":
        server_keys_from_dir(cfg.transport.curve_dir)
    for i in indices if curve else ():
        client_keys_from_dir(cfg.transport.curve_dir, f"rollout-{i}")
except (ConfigError, CurveKeyError) as exc:
    sys.exit(f"{role}: refusing to start: {exc}")
print("on" if curve else "off")
PY
  )" || exit 2
  echo "$curve"
}

# Process groups of everything started (restarted rollouts included); all stopped on exit.
pids=()
cleanup() {
  trap - EXIT INT TERM
  local pid tries
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for tries in {1..20}; do any_alive || break; sleep 0.1; done  # up to 2 s to exit, then killed
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
any_alive() { local pid; for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && return 0; done; return 1; }
install_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

# Rollout processes by index (a sparse array: rollouts.sh starts at --first-index); logs go to
# $run_dir/logs/rollout-INDEX.log. Set `max_restarts` and `run_dir` before using these.
rollout_pid=()
restarts=()
rollout_cores=()  # set by local.sh's placement: rollout i runs on cores ${rollout_cores[i]} (empty: unpinned)
start_rollout() {  # each process in its own session, so its vLLM engine processes go with it
  local pin=()
  [[ -n "${rollout_cores[$1]:-}" ]] && pin=(env VLLM_CPU_OMP_THREADS_BIND="${rollout_cores[$1]}" taskset -c "${rollout_cores[$1]}")
  setsid "${pin[@]}" "$py" -m rollout --index "$1" "${args[@]}" >>"$run_dir/logs/rollout-$1.log" 2>&1 &
  rollout_pid[$1]=$!
  pids+=("$!")
}
start_rollouts() {  # $1: first index, $2: count
  local i
  for ((i = $1; i < $1 + $2; i++)); do
    restarts[$i]=0
    start_rollout "$i"
  done
}

# One pass over the rollouts: a rollout that exited 0 was told to stop by the learner and stays
# stopped; one that failed is restarted (the learner re-issues its unanswered work and sends it
# the current weights) up to rollout.max_restarts times, after which the script exits with its
# status. Sets `rollouts_alive` to the number still running.
check_rollouts() {
  local i pid rc
  rollouts_alive=0
  for i in "${!rollout_pid[@]}"; do
    pid="${rollout_pid[$i]}"
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then rollouts_alive=$((rollouts_alive + 1)); continue; fi
    wait "$pid" && rc=0 || rc=$?
    rollout_pid[$i]=""
    [[ "$rc" -eq 0 ]] && continue  # told to stop by the learner
    if [[ "${restarts[$i]}" -lt "$max_restarts" ]]; then
      restarts[$i]=$((restarts[$i] + 1))
      echo "rollout $i exited with status $rc; restarting it (${restarts[$i]}/$max_restarts)" >&2
      start_rollout "$i"
      rollouts_alive=$((rollouts_alive + 1))
    else
      echo "rollout $i exited with status $rc after ${restarts[$i]} restart(s); last lines of its log:" >&2
      tail -n 20 "$run_dir/logs/rollout-$i.log" >&2
      exit "$rc"
    fi
  done
}
