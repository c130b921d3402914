# Shared helpers of the launch scripts (local.sh, learner.sh, rollouts.sh, replay.sh, slurm.sbatch);
# sourced, not run.
#
# The sourcing script sets `root` (the repository) before sourcing and `args` (the config flags
# every process gets) before calling the helpers that read the config. Nothing here starts a
# process or changes directory when sourced; `launch_init` does both set-up steps.

# -h/--help among the arguments: the script's help, and exit 0. Otherwise remember the caller's
# directory (relative paths in the flags are taken from there), cd to the repository, create the
# environment on first use, set `py` (the venv's python) and `prog` (the script, for messages).
launch_init() {
  local arg
  for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && launch_help; done
  prog="launch/${0##*/}"
  caller_dir="$PWD"
  cd "$root"
  "$root/launch/setup_env.sh"
  py="${STREAMRLHF_VENV:-$root/.venv}/bin/python"
}

# The script's header comment (what it starts, its own flags and variables), then how config keys are given.
launch_help() {
  script_help
  cat <<'TEXT'

Config: every key of the run config is a flag, --section.key value (e.g. --train.num_steps 10),
applied on top of --config FILE.yaml. Relative paths are taken from the directory you run this
from (those in a YAML file from the file's directory). Every key, with its default and help:
  python -m learner --help    (with the repository's .venv/bin/python)
TEXT
  exit 0
}

script_help() {  # the header comment of the script run, up to the first line that is not "# ..." or "#"
  sed -n '2,/^\(#[^ ]\|[^#]\)/{s/^# //p;s/^#$//p}' "$0"
}

has() {  # whether the flag $1 is among `args` (as `$1 VALUE` or `$1=VALUE`)
  local k
  for k in "${args[@]}"; do [[ "$k" == "$1" || "$k" == "$1="* ]] && return 0; done
  return 1
}

# Read the config once, as every process will, before anything starts: a mistake in `args` is one
# line (naming the closest valid key) and exit 2. Rewrites `args` with --config and the path options
# absolute from the caller's directory (the processes run in the repository), and sets each shell
# variable VAR to the effective value of KEY, all with one Python start. Usage: read_config VAR=KEY ...
read_config() {
  local text
  text="$("$py" -m protocol.config_get "$prog" "$caller_dir" "$@" -- "${args[@]}")" || exit 2
  eval "$text"
}

free_port() { "$py" -c 'from protocol.transport import free_tcp_port; print(free_tcp_port())'; }

# Refuse in a second what the processes would refuse later (the learner only after loading its
# model): a missing input (a model, the data, a reward function file...; for the learner also no
# reward at all: protocol.config.check_inputs), and unauthenticated plain TCP off the loopback
# interface (protocol.network_policy.check_transport_security: transport.bind_host / learner_host,
# curve_dir, curve_required_off_loopback); with CURVE, load the keys the processes will load.
# Usage: check_start learner [INDEX...] | check_start rollout INDEX... (INDEX: the rollouts started).
# Prints "on" or "off" (CURVE); exits 2, with the reason, when something is refused.
check_start() {
  local curve
  curve="$("$py" - "$prog" "$@" -- "${args[@]}" <<'PY'
import sys
from protocol.config import ConfigArgumentParser, ConfigError, check_inputs, config_from_args
from protocol.keys import CurveKeyError, client_keys_from_dir, server_keys_from_dir
from protocol.network_policy import check_transport_security
split = sys.argv.index("--")
prog, role, indices, flags = sys.argv[1], sys.argv[2], sys.argv[3:split], sys.argv[split + 1:]
try:
    cfg = config_from_args(ConfigArgumentParser(prog=prog).parse_args(flags))
    check_inputs(cfg, role)
    curve = check_transport_security(cfg)
    if curve and role == "learner":
        server_keys_from_dir(cfg.transport.curve_dir)
    for i in indices if curve else ():
        client_keys_from_dir(cfg.transport.curve_dir, f"rollout-{i}")
except (ConfigError, CurveKeyError) as exc:
    sys.exit(f"{prog}: refusing to start the {role}: {exc}")
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
# status. One that failed before saying hello to the learner (status 3, rollout/main.py: its
# engine, model, keys or config) would fail the same way again, and the learner would wait for it
# (transport.min_rollouts) until transport.batch_timeout_s: the script exits at once with its error.
# Sets `rollouts_alive` to the number still running.
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
    if [[ "$rc" -ne 3 && "${restarts[$i]}" -lt "$max_restarts" ]]; then
      restarts[$i]=$((restarts[$i] + 1))
      echo "rollout $i exited with status $rc; restarting it (${restarts[$i]}/$max_restarts)" >&2
      start_rollout "$i"
      rollouts_alive=$((rollouts_alive + 1))
    else
      if [[ "$rc" -eq 3 ]]; then
        echo "rollout $i failed to start; stopping the run. Last lines of $run_dir/logs/rollout-$i.log:" >&2
      else
        echo "rollout $i exited with status $rc after ${restarts[$i]} restart(s); last lines of its log:" >&2
      fi
      tail -n 20 "$run_dir/logs/rollout-$i.log" >&2
      exit "$rc"
    fi
  done
}
