"""End-to-end pipeline benchmark: the default job, synchronous vs one-step asynchronous, in one run.

    python bench/bench_pipeline.py [--steps 40] [--rollouts 2] [--repeats 2] [--extra --key value ...]

Each mode runs the real pipeline (launch/local.sh: vLLM rollouts, ZeroMQ, DeepSpeed learner) on
the same config, differing only in train.max_staleness (0 = synchronous on-policy, 1 = one
version off-policy). Start-up and the first step (engine warm-up) are excluded: rates are measured
from the end of step 0 to the end of the last step. The modes alternate (sync, async, sync, ...)
`--repeats` times so that drift in the machine's speed hits both alike; the table gives each
mode's mean and their ratio, and the spread of the completions/s ratio over the pairs (these
machines are noisy: compare within one run, not across runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(max_staleness: int, steps: int, rollouts: int, extra: list[str], run_dir: Path) -> dict[str, float]:
    cmd = ["bash", str(ROOT / "launch" / "local.sh"), "--train.num_steps", str(steps),
           "--train.max_staleness", str(max_staleness), "--rollout.num_processes", str(rollouts),
           "--output.dir", str(run_dir), "--output.progress", "false", "--output.save_final", "false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run with max_staleness={max_staleness} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    window = metrics[1:]
    wall = metrics[-1]["time_s"] - metrics[0]["time_s"]
    sequences = sum(m["sequences"] for m in window)
    generated = sum(m["response_len"] * m["sequences"] for m in window)
    return {
        "completions/s": sequences / wall,
        "generated tokens/s": generated / wall,
        "learner busy fraction": sum(m["train_s"] for m in window) / wall,
        "rollout busy fraction": sum(m["gen_s"] for m in window) / (wall * rollouts),
        "learner wait per step (s)": sum(m["wait_s"] for m in window) / len(window),
        "weight push latency (s)": summary["weight_push_latency_s"],
        "weight apply in engine (s)": summary["weight_apply_s"],
        "mean staleness": sum(m["staleness_mean"] for m in window) / len(window),
        "samples generated across an update": sum(m["update_in_flight_fraction"] * m["sequences"] for m in window)
        / sequences,
        "final reward (last 5 steps)": sum(m["reward_mean"] for m in metrics[-5:]) / 5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="RL steps per mode (default: 40).")
    parser.add_argument("--rollouts", type=int, default=2, help="Rollout processes (default: 2).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each mode, alternating (default: 2).")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More config flags for both runs.")
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for repeat in range(args.repeats):
            for staleness in runs:
                run_dir = Path(tmp) / f"staleness{staleness}-{repeat}"
                runs[staleness].append(run_mode(staleness, args.steps, args.rollouts, args.extra, run_dir))
    sync, asynchronous = ({key: statistics.mean(r[key] for r in runs[s]) for key in runs[s][0]} for s in runs)
    pair_ratios = [a["completions/s"] / s["completions/s"] for s, a in zip(runs[0], runs[1])]
    print(f"\n{args.steps} steps of the default job, {args.rollouts} rollout processes, "
          f"mean of {args.repeats} alternating runs per mode\n")
    print("| metric | sync (max_staleness 0) | async (max_staleness 1) | async / sync |")
    print("|---|---:|---:|---:|")
    for key in sync:
        ratio = f"{asynchronous[key] / sync[key]:.2f}x" if sync[key] else ""
        print(f"| {key} | {sync[key]:.3g} | {asynchronous[key]:.3g} | {ratio} |")
    print(f"\ncompletions/s ratio per pair: {', '.join(f'{r:.2f}x' for r in pair_ratios)}")


if __name__ == "__main__":
    main()
