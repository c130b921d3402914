"""Per-step metrics: one JSON line per step in the run directory, and a progress bar on the console."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

SHOWN = ("reward_mean", "kl_ref", "entropy", "clip_fraction", "staleness_mean", "tokens_per_s")


class MetricsLogger:
    """metrics.jsonl (every metric per step) and steps.jsonl (the prompts and weight versions each
    step trained on). A resumed run keeps the lines of the steps before `first_step` and drops
    those that a crash left after the checkpoint, since those steps are trained again."""

    def __init__(self, run_dir: Path, total_steps: int, progress: bool, first_step: int = 0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = _open_from_step(self.path, first_step)
        self.steps_file = _open_from_step(run_dir / "steps.jsonl", first_step)
        self.bar = tqdm(total=total_steps, initial=first_step, desc="RL steps", unit="step", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)
        self.start = time.time()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time_s": round(time.time() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in SHOWN if k in metrics}, refresh=False)
        self.bar.update(1)

    def log_step_samples(self, step: int, prompt_ids: list[int], weight_versions: list[int]) -> None:
        self.steps_file.write(json.dumps({"step": step, "prompt_ids": prompt_ids,
                                          "weight_versions": weight_versions}) + "\n")
        self.steps_file.flush()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        self.steps_file.close()


def _open_from_step(path: Path, first_step: int):
    kept = []
    if first_step > 0 and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < first_step]
    f = path.open("w")
    f.writelines(line + "\n" for line in kept)
    f.flush()
    return f
