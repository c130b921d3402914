"""Built-in tasks: each module builds what it needs (model, prompts) with `python -m learner.tasks.NAME prepare`."""

from __future__ import annotations

import argparse


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
    """`--size` of the tasks built on learner.tiny's sized models."""
    prepare.add_argument("--size", default="tiny", help="Model size: tiny, small or medium (default: tiny).")
