#!/usr/bin/env bash
# Usage: launch/replay.sh RECORDING_DIR [--section.key value ...]
#
# Starts the learner alone, fed from disk: it replays a run recorded with --output.record true
# (RECORDING_DIR is <its output.dir>/recording), with no rollout processes, and checks at every step
# that the losses and the resulting weights are the recorded ones (--replay.verify false: do not).
#
#   launch/local.sh --output.record true --output.dir runs/x     # record a run
#   launch/replay.sh runs/x/recording                            # replay it (checks every step)
#   launch/replay.sh runs/x/recording --replay.stop_after_step 3 # stop after step 3, dump its batch
#   python -m learner.recording.inspect runs/x/recording --steps # look inside
#
# The recorded run's config is the default; flags override it. Outputs go to
# <recording>/../replay unless --output.dir is given. Replay runs one learner rank: a recording of a
# multi-rank run replays with other numerics (use the same torchrun command instead).
# No flags of its own besides -h/--help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
launch_init "$@"
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $prog RECORDING_DIR [--section.key value ...] (--help for more)" >&2
  exit 2
fi
args=(--replay.path "$@")
read_config  # the flags checked, and paths made absolute from here: the learner runs in the repository
exec "$py" -m learner "${args[@]}"
