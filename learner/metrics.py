"""Per-step metrics: one JSON line per step in the run directory, a progress bar on the console and,
on request, JSON lines on stdout, TensorBoard scalars, Weights & Biases and a PNG of the run."""

from __future__ import annotations

import importlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

SHOWN = ("reward_mean", "kl_ref", "entropy", "clip_fraction", "staleness_mean", "tokens_per_s")


class MetricsBackendError(RuntimeError):
    """An optional metrics backend was asked for but cannot be used (its package is missing)."""


class MetricsLogger:
    """metrics.jsonl (every metric per step), steps.jsonl (the prompts and weight versions each
    step trained on) and, with `samples`, samples.jsonl (some completions of some steps, decoded).
    A resumed run keeps the lines of the steps before `first_step` and drops those that a crash
    left after the checkpoint, since those steps are trained again.

    Optional outputs: `jsonl_stdout` prints each step's record as one strict-JSON line on stdout;
    `tensorboard` writes scalars to <run_dir>/tensorboard (a resumed run purges the events of the
    steps it trains again); `wandb_project` logs to Weights & Biases (a resumed run is a new W&B
    run whose config has `first_step`); `plot` draws <run_dir>/training.png at `close`. A missing
    package for tensorboard/wandb is a MetricsBackendError here, before any training happens.
    """

    def __init__(self, run_dir: Path, total_steps: int, progress: bool, first_step: int = 0, *,
                 jsonl_stdout: bool = False, tensorboard: bool = False, wandb_project: str = "",
                 run_config: dict[str, Any] | None = None, plot: bool = True, samples: bool = False):
        run_dir = Path(run_dir)
        # Backends first: a missing package fails before any file is touched.
        self.tb_writer = None
        self.wandb = None
        if tensorboard:
            summary_writer = _require("torch.utils.tensorboard", "output.tensorboard", "tensorboard").SummaryWriter
        if wandb_project:
            wandb = _require("wandb", "output.wandb_project", "wandb")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.file = _open_from_step(self.path, first_step)
        self.steps_file = _open_from_step(run_dir / "steps.jsonl", first_step)
        self.samples_file = _open_from_step(run_dir / "samples.jsonl", first_step) if samples else None
        self.jsonl_stdout = jsonl_stdout
        self.plot = plot
        if tensorboard:
            self.tb_writer = summary_writer(log_dir=str(run_dir / "tensorboard"),
                                            purge_step=first_step if first_step > 0 else None)
        if wandb_project:
            wandb.init(project=wandb_project, config={**(run_config or {}), "first_step": first_step},
                       dir=str(run_dir), name=run_dir.name)
            self.wandb = wandb
        self.bar = tqdm(total=total_steps, initial=first_step, desc="RL steps", unit="step", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)
        self.start = time.time()
        self.closed = False

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        """One row of metrics; `advance`: a step was trained (the progress bar moves)."""
        record = {"step": step, "time_s": round(time.time() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.jsonl_stdout:
            # Strict JSON (NaN/Infinity are not JSON), so that any log collector parses every line.
            strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            sys.stdout.write(json.dumps(strict, allow_nan=False) + "\n")
            sys.stdout.flush()
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb_writer is not None:
            for key, value in scalars.items():
                self.tb_writer.add_scalar(key, value, step)
            self.tb_writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if advance:
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in SHOWN if k in metrics}, refresh=False)
            self.bar.update(1)

    def log_step_samples(self, step: int, prompt_ids: list[int], weight_versions: list[int]) -> None:
        self.steps_file.write(json.dumps({"step": step, "prompt_ids": prompt_ids,
                                          "weight_versions": weight_versions}) + "\n")
        self.steps_file.flush()

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """One JSON line per logged completion in samples.jsonl (`samples` must have been set), and
        a `samples` table in Weights & Biases when it is on."""
        self.samples_file.writelines(json.dumps({"step": step, **record}) + "\n" for record in records)
        self.samples_file.flush()
        if self.wandb is not None and records:
            columns = ["step", *records[0]]
            table = self.wandb.Table(columns=columns, data=[[step, *record.values()] for record in records])
            self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        self.file.close()
        self.steps_file.close()
        if self.samples_file is not None:
            self.samples_file.close()
        if self.tb_writer is not None:
            self.tb_writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.plot:
            try:
                from learner.plot import plot_run

                plot_run(self.path, self.run_dir / "training.png")
            except Exception as exc:  # a plot must never fail a finished run
                log.warning("could not draw %s: %s: %s", self.run_dir / "training.png", type(exc).__name__, exc)


def _require(module: str, option: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MetricsBackendError(f"{option} is set but the `{package}` package cannot be imported ({exc}); "
                                  f"install it with `pip install {package}` or turn {option} off") from exc


def _open_from_step(path: Path, first_step: int):
    kept = []
    if first_step > 0 and path.exists():
        steps = ((line, _step_of(line)) for line in path.read_text().splitlines())
        kept = [line for line, step in steps if step is not None and step < first_step]
    f = path.open("w")
    f.writelines(line + "\n" for line in kept)
    f.flush()
    return f


def _step_of(line: str) -> int | None:
    """The step of a JSON line; None for a line a crash left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
