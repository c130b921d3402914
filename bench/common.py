"""Helpers shared by the end-to-end benchmarks (bench_pipeline.py, bench_trl.py); standard library only.

`run_steps` runs a training command and stamps every step it reports (one JSON object with a
"step" key per line on its stdout) with the seconds since launch, so that two systems are timed
by the same clock, from the same moment; `run_local` does that for this project's launcher
(launch/local.sh with `--output.jsonl_stdout true`). `steady_rate` and `mean_of` turn the step
records into the numbers the benchmarks print. `status_kib`, `reset_peak_rss` and `trim_heap`
measure a process's own peak memory (bench_weight_push.py, bench_learner_step.py), under
`FIXED_MMAP_THRESHOLD` in its environment.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PYTHON = Path(os.environ.get("STREAMRLHF_VENV", ROOT / ".venv")) / "bin" / "python"

# With a fixed mmap threshold glibc returns every freed buffer of 1 MiB or more at once; with its
# default (dynamic) threshold freed buffers stay in the heap, and RSS shows the allocator's
# retention rather than the live memory of what is measured.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status: VmRSS (resident now), VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim_heap() -> None:
    """Give the heap's free memory back to the system, so that RSS is live memory."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Run:
    """One training process: its step records (each with `arrival_s`) and its timings."""

    steps: list[dict] = field(default_factory=list)
    info: list[dict] = field(default_factory=list)  # other JSON objects it printed
    wall_s: float = 0.0  # launch to the end of the process (start-up and shutdown included)
    log: Path | None = None
    returncode: int = 0

    @property
    def first_step_s(self) -> float:
        """Seconds from launch to the end of the first trained step."""
        return self.steps[0]["arrival_s"] if self.steps else float("nan")


def run_steps(cmd: list[str], log: Path, *, env: dict[str, str] | None = None) -> Run:
    """Run `cmd` from the repository root; stderr and every non-step stdout line go to `log`.

    A step is a stdout line holding a JSON object with a "step" key; it is kept with `arrival_s`,
    the seconds from launch to the moment the line was read. Other JSON objects go to `info`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    run = Run(log=log)
    with log.open("w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            arrival = time.perf_counter() - started
            record = _json_object(line)
            if record is not None and "step" in record:
                run.steps.append({**record, "arrival_s": round(arrival, 3)})
            elif record is not None:
                run.info.append(record)
            else:
                log_file.write(line)
                log_file.flush()
        run.returncode = proc.wait()
        run.wall_s = time.perf_counter() - started
    return run


def _json_object(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# The default job's task (learner.tasks.arithmetic) prints only model and prompts.
ARITHMETIC_DEFAULTS = {"reward": "learner.tasks.arithmetic:arithmetic_reward", "max_new_tokens": 4,
                       "max_model_len": 64}


def prepare_task(task: str, size: str, out_root: Path) -> dict:
    """Build the task (idempotent) and return its description with absolute paths."""
    out = out_root / (task if task == "arithmetic" else f"{task}-{size}")
    cmd = [str(PROJECT_PYTHON), "-m", f"learner.tasks.{task}", "prepare", "--out", str(out)]
    if task != "arithmetic":
        cmd += ["--size", size]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    info = json.loads(lines[-1])
    if task == "arithmetic":
        info = {**ARITHMETIC_DEFAULTS, **info}
    missing = {"model", "prompts", "reward", "max_new_tokens"} - set(info)
    if missing:
        sys.exit(f"{' '.join(cmd)} printed no {sorted(missing)}: {lines[-1]}")
    for key in ("model", "prompts"):
        info[key] = str((ROOT / info[key]).resolve())
    return info


def task_flags(task: dict) -> list[str]:
    """The config flags that run this project's pipeline on a prepared task."""
    flags = ["--model.path", task["model"], "--data.path", task["prompts"], "--reward.function", task["reward"],
             "--rollout.max_new_tokens", str(task["max_new_tokens"])]
    if task.get("max_model_len"):
        flags += ["--rollout.max_model_len", str(task["max_model_len"])]
    return flags


def run_local(flags: list[str], run_dir: Path) -> tuple[Run, dict]:
    """This project's pipeline (launch/local.sh) with `flags`, writing to `run_dir`: (run, summary.json).

    Exits with the tail of the log when the run fails. The step records are the lines of
    `<run_dir>/metrics.jsonl` (non-finite values as null).
    """
    cmd = ["bash", str(ROOT / "launch" / "local.sh"), *flags, "--output.dir", str(run_dir),
           "--output.progress", "false", "--output.save_final", "false", "--output.jsonl_stdout", "true"]
    run = run_steps(cmd, run_dir / "bench.log")
    if run.returncode != 0 or not run.steps:
        fail(f"launch/local.sh {' '.join(flags)}", run)
    summary_path = run_dir / "summary.json"
    return run, json.loads(summary_path.read_text()) if summary_path.exists() else {}


def fail(what: str, run: Run) -> None:
    tail = run.log.read_text()[-4000:] if run.log and run.log.exists() else ""
    sys.exit(f"{what} failed (exit {run.returncode}, {len(run.steps)} steps); log {run.log}:\n{tail}")


def steady_rate(run: Run, key: str, skip: int) -> float:
    """Sum of `key` over the steps after the first `skip`, per second from the end of step `skip` to
    the end of the last step (start-up and warm-up excluded). NaN with fewer than skip + 1 steps."""
    skip = max(1, skip)
    if len(run.steps) <= skip:
        return float("nan")
    span = run.steps[-1]["arrival_s"] - run.steps[skip - 1]["arrival_s"]
    return sum(s[key] for s in run.steps[skip:]) / span if span > 0 else float("nan")


def mean_of(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")
