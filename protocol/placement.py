"""Which CPU cores the learner and each rollout process of one machine run on.

On a CPU machine the learner and the rollout engines share the cores, and unpinned they fight
over them: OpenMP threads that lose their core spin, and a step that should take one core's time
takes several. `launch/local.sh` therefore gives the learner and the rollouts disjoint cores, the
way separate accelerators would be: the learner `train.cpu_cores` (default: the first half of the
cores this process may use), the rollouts `rollout.cpu_cores` (default: the rest), split evenly
among them. Each side then runs one thread per core it owns.

    python -m protocol.placement [--config run.yaml] [--section.key value ...]

prints one line per process for the launcher: `learner CORES THREADS` then `rollout I CORES`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

from protocol.config import ConfigError, RunConfig, add_config_arguments, config_from_args


@dataclass(frozen=True)
class Placement:
    learner: list[int]  # cores of the learner (all its ranks)
    learner_threads: int  # torch threads per learner rank: its share of the learner's cores
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
    """Disjoint cores for the learner and the rollouts (shared only on a 1-core machine).

    Rollout i gets an even share of the rollout cores (consecutive ones); with more rollouts than
    cores they take turns on them.
    """
    ranks, count = cfg.train.learner_ranks, cfg.rollout.num_processes
    if cfg.train.cpu_cores:
        learner = parse_cores(cfg.train.cpu_cores, "train.cpu_cores")
    else:  # half the cores, and at least one per rank
        learner = available[: max(ranks, len(available) // 2)]
    if cfg.rollout.cpu_cores:
        rollout = parse_cores(cfg.rollout.cpu_cores, "rollout.cpu_cores")
    else:
        rollout = [c for c in available if c not in learner] or available[::-1]
    for key, cores in (("train.cpu_cores", learner), ("rollout.cpu_cores", rollout)):
        outside = sorted(set(cores) - set(available))
        if outside:
            raise ConfigError(f"{key}: cores {outside} are not available to this process (it may use {available})")
    # on cores shared with the learner an engine takes one thread: more would only wait for each other
    share = 1 if set(rollout) & set(learner) else max(1, len(rollout) // count)
    rollouts = [[rollout[(i * share + k) % len(rollout)] for k in range(share)] for i in range(count)]
    return Placement(learner, max(1, len(learner) // ranks), rollouts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    try:
        placement = plan(config_from_args(parser.parse_args(argv)), sorted(os.sched_getaffinity(0)))
    except ConfigError as exc:
        sys.exit(f"placement: {exc}")
    print(f"learner {format_cores(placement.learner)} {placement.learner_threads}")
    for i, cores in enumerate(placement.rollouts):
        print(f"rollout {i} {format_cores(cores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
