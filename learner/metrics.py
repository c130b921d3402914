"""Per-step metrics: one JSON line per step in the run directory, and a progress bar on the console."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

SHOWN = ("reward_mean", "kl_ref", "entropy", "clip_fraction", "staleness_mean", "tokens_per_s")


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, progress: bool):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("w")
        # Which prompts each step trained on, and with which weight versions they were sampled.
        self.steps_file = (run_dir / "steps.jsonl").open("w")
        self.bar = tqdm(total=total_steps, desc="RL steps", unit="step", file=sys.stderr, disable=not progress,
                        dynamic_ncols=True)
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
