#!/usr/bin/env bash
# Replay-from-disk: feed a recorded run to the learner, with no rollout processes.
#
#   launch/local.sh --output.record true --output.dir runs/x     # record a run
#   launch/replay.sh runs/x/recording                            # replay it (checks every step)
#   launch/replay.sh runs/x/recording --replay.stop_after_step 3 # stop after step 3, dump its batch
#   python -m learner.inspect_recording runs/x/recording --steps # look inside
#
# The recorded run's config is the default; flags override it. Replay runs one learner rank: a
# recording of a multi-rank run replays with other numerics (use the same torchrun command instead).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: launch/replay.sh RECORDING_DIR [--section.key value ...]" >&2
  exit 2
fi
"$root/launch/setup_env.sh"
recording="$1"
shift
exec "${STREAMRLHF_VENV:-$root/.venv}/bin/python" -m learner --replay.path "$recording" "$@"
