"""Checkpoints for resuming a run: DeepSpeed engine state, a Hugging Face export, the learner's state.

Layout under <output.dir>/checkpoints:
    step-00000012/            one complete checkpoint (after step 12, i.e. weight version 13)
        actor/ critic/        DeepSpeed state (weights, optimizer, ZeRO partitions) for resume
        hf/                   the actor as a Hugging Face model directory, for export
        learner_state.json    step, weight version, dataset position and the prompts handed to steps planned
                              ahead, KL coefficient, grant counter
    latest                    the name of the newest complete checkpoint

A checkpoint is written to a `.tmp-` directory and renamed into place only when complete, and
`latest` is replaced atomically after that, so a checkpoint cut short by a crash is never picked
up. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from learner.training.distributed import is_rank0

log = logging.getLogger("learner.training.checkpoint")

STATE_FILE = "learner_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, step: int, engines: dict, export_actor, state: dict) -> Path:
        """Collective: every rank calls it (DeepSpeed and the ZeRO-3 gather need all of them)."""
        name = f"step-{step:08d}"
        tmp, final = self.directory / f".tmp-{name}", self.directory / name
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        for engine_name, engine in engines.items():
            engine.save_checkpoint(str(tmp / engine_name), tag="state", save_latest=False)
        export_actor(str(tmp / "hf"))
        if is_rank0():
            _write_atomically(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomically(self.directory / "latest", name)
            self._prune()
            log.info("checkpoint saved: %s", final)
        _barrier()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A damaged `latest` falls back to a scan."""
        pointer = self.directory / "latest"
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
            log.warning("%s names %s, which is incomplete; looking for an earlier checkpoint", pointer, candidate)
        complete = sorted(p for p in self.directory.glob("step-*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None

    def load(self, path: Path, engines: dict) -> dict:
        """Restore every engine (collective) and return the learner state saved with them."""
        for engine_name, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path / engine_name), tag="state")
            if loaded is None:
                raise RuntimeError(f"checkpoint {path}: DeepSpeed could not load the {engine_name} state")
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"checkpoint {path}: cannot read {STATE_FILE}: {exc}") from None

    def _prune(self) -> None:
        complete = sorted(p for p in self.directory.glob("step-*") if (p / STATE_FILE).is_file())
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
