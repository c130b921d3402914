"""Built-in tasks: each module builds what it needs (model, prompts) with `python -m learner.tasks.NAME prepare`."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

STAMP = "prepared.json"  # in a task's directory: the settings of its last finished build


def already_prepared(out: Path, settings: dict, model: Path) -> bool:
    """Whether `out` holds a finished build with these settings (and its model directory)."""
    stamp = out / STAMP
    return stamp.exists() and json.loads(stamp.read_text()) == settings and (model / "config.json").exists()


@contextlib.contextmanager
def preparing(out: Path, settings: dict) -> Iterator[None]:
    """Around a task's build in `out`: the stamp goes first, so that a build that stops half way
    does not look done, and is written with `settings` once the build has finished."""
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    yield
    (out / STAMP).write_text(json.dumps(settings))


def prepare_parser(task: str, description: str, prepare_help: str) -> tuple[argparse.ArgumentParser,
                                                                           argparse.ArgumentParser]:
    """The command line of `python -m learner.tasks.<task> prepare --out DIR --seed N` (default out:
    runs/<task>): (the parser, its `prepare` subcommand, for the task's own options)."""
    default_out = f"runs/{task}"
    parser = argparse.ArgumentParser(prog=f"python -m learner.tasks.{task}", description=description)
    prepare = parser.add_subparsers(dest="command", required=True).add_parser("prepare", help=prepare_help)
    prepare.add_argument("--out", default=default_out, help=f"Output directory (default: {default_out}).")
    prepare.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    return parser, prepare


def add_size_argument(prepare: argparse.ArgumentParser) -> None:
    """`--size` of the tasks built on learner.tiny.model's sized models."""
    prepare.add_argument("--size", default="tiny", help="Model size: tiny, small or medium (default: tiny).")
