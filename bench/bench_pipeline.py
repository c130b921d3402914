"""End-to-end pipeline benchmark: synchronous vs asynchronous on the same work, in one run.

    python bench/bench_pipeline.py [--task arithmetic] [--steps 40] [--repeats 2] [--staleness 0 1]
    python bench/bench_pipeline.py --task longtail --size small --staleness 0 1 2 --placement disjoint
    python bench/bench_pipeline.py --placement shared ...   # every process on every core

Each mode runs the real pipeline (launch/local.sh: vLLM rollouts, ZeroMQ, DeepSpeed learner) on
the same config, differing only in train.max_staleness (0 = synchronous on-policy: a rollout
waits for the weights of the step before it generates, the learner waits for the step's samples;
k = the rollouts generate up to k versions ahead while the learner trains). `--placement disjoint`
(the default here) runs the learner on the first half of the cores and the rollouts on the rest,
as separate accelerators would be, so that in synchronous mode one side idles while the other
works; `local` is launch/local.sh's own placement on a CPU machine (the learner on every core with
passive waits, the rollouts on the second half); `shared` lets every process use every core.

Start-up and the first step (engine warm-up) are excluded: rates are measured from the end of
step 0 to the end of the last step. Busy fractions are per side: the learner's scoring and
training time (score_s + train_s), and the rollouts' engine time (gen_s), over that window; "wait
per step" is the learner waiting for samples. The modes alternate (0, 1, 0, 1, ...) `--repeats`
times so that drift in the machine's speed hits all alike; the table gives each mode's mean and
its ratio to the first mode, and the per-pair completions/s ratios (these machines are noisy:
compare within one run, not across runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import ROOT, prepare_task, run_local, task_flags


def run_mode(max_staleness: int, a: argparse.Namespace, flags: list[str], run_dir: Path) -> dict[str, float]:
    run, summary = run_local([*flags, "--train.num_steps", str(a.steps), "--train.max_staleness", str(max_staleness),
                              "--rollout.num_processes", str(a.rollouts), *a.extra], run_dir)
    metrics = run.steps
    window = metrics[1:]
    wall = metrics[-1]["time_s"] - metrics[0]["time_s"]
    sequences = sum(m["sequences"] for m in window)
    generated = sum(m["response_len"] * m["sequences"] for m in window)
    lengths = [m["response_len"] for m in window]
    return {
        "completions/s": sequences / wall,
        "generated tokens/s": generated / wall,
        "learner busy fraction": sum(m["train_s"] + m["score_s"] for m in window) / wall,
        "rollout busy fraction": sum(m["gen_s"] for m in window) / (wall * a.rollouts),
        "learner wait per step (s)": sum(m["wait_s"] for m in window) / len(window),
        "learner train per step (s)": sum(m["train_s"] for m in window) / len(window),
        "mean response length (tokens)": statistics.mean(lengths),
        "weight push latency (s)": summary["weight_push_latency_s"],
        "weight apply in engine (s)": summary["weight_apply_s"],
        "mean staleness": sum(m["staleness_mean"] for m in window) / len(window),
        "samples generated across an update": sum(m["update_in_flight_fraction"] * m["sequences"] for m in window)
        / sequences,
        "reward, last 5 steps": sum(m["reward_mean"] for m in metrics[-5:]) / 5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arithmetic", choices=("arithmetic", "addition", "longtail"),
                        help="Built-in task (default: arithmetic, the default job's).")
    parser.add_argument("--size", default="tiny", help="Model size of the addition and longtail tasks (default: tiny).")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per mode (default: 40).")
    parser.add_argument("--rollouts", type=int, default=1, help="Rollout processes (default: 1).")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1],
                        help="train.max_staleness of each mode; the first is the baseline (default: 0 1).")
    parser.add_argument("--placement", choices=("disjoint", "local", "shared"), default="disjoint",
                        help="Learner and rollouts on disjoint halves of the cores (as separate accelerators), "
                             "launch/local.sh's default placement, or every process on every core.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each mode, alternating (default: 2).")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More config flags for every run.")
    a = parser.parse_args()
    flags = []
    if a.task != "arithmetic":
        flags += task_flags(prepare_task(a.task, a.size, ROOT / "runs" / "bench_pipeline" / "tasks"))
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    placements = {"disjoint": (cores[:half], cores[half:] or cores), "shared": (cores, cores), "local": None}
    if placements[a.placement]:  # else launch/local.sh chooses
        learner, rollout = placements[a.placement]
        flags += ["--train.cpu_cores", ",".join(map(str, learner)), "--rollout.cpu_cores", ",".join(map(str, rollout))]
    runs: dict[int, list[dict[str, float]]] = {s: [] for s in a.staleness}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for repeat in range(a.repeats):
            for staleness in runs:
                runs[staleness].append(run_mode(staleness, a, flags, Path(tmp) / f"staleness{staleness}-{repeat}"))
    means = {s: {key: statistics.mean(r[key] for r in runs[s]) for key in runs[s][0]} for s in runs}
    base = a.staleness[0]
    print(f"\n{a.steps} steps of the {a.task} task{'' if a.task == 'arithmetic' else f' ({a.size})'}, "
          f"{a.rollouts} rollout process(es), {a.placement} cores, mean of {a.repeats} alternating runs per mode\n")
    print("| metric | " + " | ".join(f"max_staleness {s}" for s in runs)
          + "".join(f" | {s} / {base}" for s in a.staleness[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(runs) - 1))
    for key in means[base]:
        values = " | ".join(f"{means[s][key]:.3g}" for s in runs)
        ratios = "".join(f" | {means[s][key] / means[base][key]:.2f}x" if means[base][key] else " | "
                         for s in a.staleness[1:])
        print(f"| {key} | {values}{ratios} |")
    for s in a.staleness[1:]:
        pairs = [x["completions/s"] / b["completions/s"] for b, x in zip(runs[base], runs[s])]
        print(f"\ncompletions/s ratio {s} / {base} per pair: {', '.join(f'{r:.2f}x' for r in pairs)}")


if __name__ == "__main__":
    main()
