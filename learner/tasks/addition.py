"""The cold-start task for the side-by-side comparison with TRL's GRPOTrainer: `A+B=` for A, B in 0..49.

`prepare` builds, deterministically and without downloads, a randomly initialised model of one
of the sizes of learner.tiny.model.MODEL_SIZES with the built-in BPE tokenizer (learner.tiny.bpe: every sum,
0..98, is one token) and the 2500 prompts (JSONL with `prompt` and `label`, the sum). There is
no supervised warm-up: both systems start from the same random policy and the same reward, so
any difference in how fast they find it comes from the training, not from the start.

Reward (`addition_reward`): 1.0 if the completion's first whitespace-separated word is the sum,
0.2 if it is another integer, 0.0 otherwise (" 12 foo" scores 1.0 for 12; an empty completion 0.0).
"""

from __future__ import annotations

import json
from pathlib import Path

from learner.tasks import add_size_argument, already_prepared, prepare_parser, preparing
from learner.tasks.arithmetic import make_rows, score_answer

MAX_OPERAND = 49
MAX_NEW_TOKENS = 16
MAX_MODEL_LEN = 128  # a prompt is a few tokens; the models hold 1024 positions (the default 2048 is too many)
INTEGER_REWARD = 0.2
REWARD = "learner.tasks.addition:addition_reward"


def addition_reward(prompts: list[str], completions: list[str], labels: list[str | None]) -> list[float]:
    """1.0 if the first word of the completion is the sum, 0.2 if it is another integer, else 0.0."""
    return [score_answer(next(iter(completion.split()), ""), label, INTEGER_REWARD)
            for completion, label in zip(completions, labels)]


def prepare(out_dir: str | Path, *, size: str = "tiny", seed: int = 0) -> dict[str, str | int]:
    """Build (once) the `size` model initialised from `seed` and the prompt file under out_dir."""
    out = Path(out_dir)
    model, prompts = out / "model", out / "prompts.jsonl"
    info = {"model": str(model), "prompts": str(prompts), "reward": REWARD, "max_new_tokens": MAX_NEW_TOKENS,
            "max_model_len": MAX_MODEL_LEN}
    settings = {"size": size, "seed": seed}
    if already_prepared(out, settings, model):
        return info
    # imported only when something must be built: torch and transformers take seconds to load
    from learner.tiny.model import build_tiny_model, sized_spec

    with preparing(out, settings):
        build_tiny_model(model, sized_spec(size, seed))
        prompts.write_text("".join(json.dumps(r) + "\n" for r in make_rows(MAX_OPERAND)))
    return info


def main() -> None:
    parser, p = prepare_parser("addition", "Prepare the cold-start addition task.",
                               "Build the random model and the prompts (idempotent).")
    add_size_argument(p)
    args = parser.parse_args()
    print(json.dumps(prepare(args.out, size=args.size, seed=args.seed)))


if __name__ == "__main__":
    main()
