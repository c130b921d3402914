"""Which CPU cores the learner and each rollout process of one machine run on.

On a CPU machine the learner and the rollout engines share the cores. Training costs about three
times the arithmetic of generation (forward and backward over every token, against one forward
with a KV cache), so a learner confined to half the cores sets the pace while the rollout cores
idle. `launch/local.sh` therefore runs the learner on every core (`train.cpu_cores`, default: all
cores this process may use; one torch thread per core and rank) with passive OpenMP waits, and
the rollouts on the second half (`rollout.cpu_cores`; with more rollouts than that, one core
each from the last core down), split evenly among them. Where the two
overlap, the learner's threads sleep instead of spinning when a rollout holds their core, so the
learner gets the rollout cores whenever the engines idle. Disjoint lists give each side its own
cores, as separate accelerators would be.

    python -m protocol.placement [--config run.yaml] [--section.key value ...]

prints one line per process for the launcher: `learner CORES THREADS WAIT` (WAIT is `passive`
where the learner's cores overlap a rollout's, else `active`: OpenMP's wait policy for the
learner) then `rollout I CORES`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

from protocol.config import ConfigArgumentParser, ConfigError, RunConfig, config_from_args


@dataclass(frozen=True)
class Placement:
    learner: list[int]  # cores of the learner (all its ranks)
    learner_threads: int  # torch threads per learner rank: its share of the learner's cores
    learner_waits_passively: bool  # the learner shares cores with a rollout: its idle threads must sleep
    rollouts: list[list[int]]  # cores of rollout i


def parse_cores(text: str, key: str) -> list[int]:
    """A core list such as "0-3,8" -> [0, 1, 2, 3, 8]; `key` names the option in errors."""
    cores: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None:
            raise ConfigError(f"{key}: expected a core list such as '0-3,8', got {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        cores.extend(range(first, last + 1))
    if not cores or len(set(cores)) != len(cores):
        raise ConfigError(f"{key}: expected distinct cores such as '0-3,8', got {text!r}")
    return cores


def format_cores(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def plan(cfg: RunConfig, available: list[int]) -> Placement:
    """The learner on every available core, the rollouts on the second half (see the module doc).

    Rollout i gets an even share of the rollout cores (consecutive ones); with more rollouts than
    cores they take turns on them.
    """
    ranks, count = cfg.train.learner_ranks, cfg.rollout.num_processes
    learner = parse_cores(cfg.train.cpu_cores, "train.cpu_cores") if cfg.train.cpu_cores else available
    if cfg.rollout.cpu_cores:
        rollout = parse_cores(cfg.rollout.cpu_cores, "rollout.cpu_cores")
    else:  # the second half, or as many of the last cores as there are rollouts
        rollout = available[max(0, min(len(available) // 2, len(available) - count)):]
    for key, cores in (("train.cpu_cores", learner), ("rollout.cpu_cores", rollout)):
        outside = sorted(set(cores) - set(available))
        if outside:
            raise ConfigError(f"{key}: cores {outside} are not available to this process (it may use {available})")
    share = max(1, len(rollout) // count)
    rollouts = [[rollout[(i * share + k) % len(rollout)] for k in range(share)] for i in range(count)]
    return Placement(learner, max(1, len(learner) // ranks), bool(set(learner) & set(rollout)), rollouts)


def main(argv: list[str] | None = None) -> int:
    parser = ConfigArgumentParser(prog="python -m protocol.placement", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        placement = plan(config_from_args(parser.parse_args(argv)), sorted(os.sched_getaffinity(0)))
    except ConfigError as exc:
        sys.exit(f"placement: {exc}")
    wait = "passive" if placement.learner_waits_passively else "active"
    print(f"learner {format_cores(placement.learner)} {placement.learner_threads} {wait}")
    for i, cores in enumerate(placement.rollouts):
        print(f"rollout {i} {format_cores(cores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
