"""The built-in verifiable task: `A+B=` prompts, exact-answer reward.

`prepare` makes everything the default job needs, deterministically and without downloads:
the tiny model (learner.tiny.model), a prompt dataset (JSONL with `prompt` and `label`), and a policy
warmed up by a short supervised pass on part of the task, so that RL starts sometimes right.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from learner.tasks import already_prepared, prepare_parser, preparing

EXACT_REWARD = 1.0
WELL_FORMED_REWARD = 0.1
_INTEGER = re.compile(r"-?\d+")


def score_answer(answer: str, label: str | None, well_formed_reward: float = WELL_FORMED_REWARD) -> float:
    """EXACT_REWARD if `answer` is the label, `well_formed_reward` if it is another integer, else 0.0."""
    if label is not None and answer == label.strip():
        return EXACT_REWARD
    return well_formed_reward if _INTEGER.fullmatch(answer) else 0.0


def arithmetic_reward(prompts: list[str], completions: list[str], labels: list[str | None]) -> list[float]:
    """1.0 for the exact answer, 0.1 for a well-formed integer that is wrong, 0.0 otherwise."""
    return [score_answer(completion.strip(), label) for completion, label in zip(completions, labels)]


def make_rows(max_operand: int) -> list[dict[str, str]]:
    """Every `a+b=` with 0 <= a, b <= max_operand, labelled with the sum."""
    return [{"prompt": f"{a}+{b}=", "label": str(a + b)}
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def prepare(out_dir: str | Path, *, max_operand: int = 9, sft_steps: int = 100,
            sft_fraction: float = 1.0, seed: int = 0) -> dict[str, str]:
    """Build (once) the tiny model, the prompt file and the warmed-up policy under out_dir.

    The supervised pass is deliberately short: the warmed-up policy's most likely answer is often
    right (about half the prompts) but sampling at temperature 1 is right only about a third of
    the time, which leaves RL a clear signal to sharpen. `sft_fraction` < 1 holds prompts out.
    """
    out = Path(out_dir)
    base, policy, prompts = out / "base", out / "policy", out / "prompts.jsonl"
    settings = {"max_operand": max_operand, "sft_steps": sft_steps, "sft_fraction": sft_fraction, "seed": seed}
    if already_prepared(out, settings, policy):
        return {"model": str(policy), "prompts": str(prompts)}
    # imported only when something must be built: the launcher calls `prepare` on every start
    from learner.tiny.sft import supervised_warmup
    from learner.tiny.model import TinyModelSpec, build_tiny_model

    with preparing(out, settings):
        build_tiny_model(base, TinyModelSpec(seed=seed))
        rows = make_rows(max_operand)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        seen = random.Random(seed).sample(rows, int(len(rows) * sft_fraction))
        supervised_warmup(base, [(r["prompt"], r["label"]) for r in seen], policy, steps=sft_steps, seed=seed)
    return {"model": str(policy), "prompts": str(prompts)}


def main() -> None:
    parser, p = prepare_parser("arithmetic", "Prepare the built-in arithmetic task.",
                               "Build the tiny model, prompts and warmed-up policy (idempotent).")
    p.add_argument("--max-operand", type=int, default=9, help="Largest operand (default: 9).")
    p.add_argument("--sft-steps", type=int, default=100, help="Supervised warm-up steps (default: 100).")
    args = parser.parse_args()
    paths = prepare(args.out, max_operand=args.max_operand, sft_steps=args.sft_steps, seed=args.seed)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
