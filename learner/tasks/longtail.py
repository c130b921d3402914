r"""A long-tail response-length task: `repeat cat 40:` is answered by forty numbered lines.

Reasoning-style workloads mix short and very long responses within one step; this task makes
that shape from code. The answer to `repeat <noun> <n>:` counts down, one line per repetition::

    repeat cat 3:  ->  "\n3 cat\n2 cat\n1 cat" + EOS

Each line is three tokens of the built-in BPE tokenizer (newline, number, noun), so a response is
3n + 1 tokens with EOS. n is drawn with weight 1/n from 1..98 (Zipf): the median response is about
22 tokens, one in seven is over 150 and the longest are 295 (prompts are at most 6 tokens, so
MAX_NEW_TOKENS 512 and MAX_MODEL_LEN 640 hold every response). The 2000 prompts repeat: short
ones are few (12 nouns x n) and drawn often.

`prepare` builds a model of one of the sizes of learner.tiny.model.MODEL_SIZES and warms it up on the
task (learner.tiny.sft) until it ends its answers where it should: RL then starts from a policy whose
response lengths follow the prompt, which is what makes the long tail real in a benchmark.

Reward (`longtail_reward`): 1.0 for exactly the expected lines; otherwise PARTIAL_CREDIT (0.5)
times the fraction of expected lines that the completion gets right before its first mistake
(a completion that counts down correctly but does not stop gets 0.5). Lines are compared with
spacing normalised and blank lines ignored.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from learner.tiny.bpe import MAX_NUMBER_TOKEN, NOUNS
from learner.tasks import add_size_argument, already_prepared, prepare_parser, preparing

PARTIAL_CREDIT = 0.5
MAX_REPEATS = MAX_NUMBER_TOKEN  # every count is one token
NUM_PROMPTS = 2000
MAX_NEW_TOKENS = 512
MAX_MODEL_LEN = 640
REWARD = "learner.tasks.longtail:longtail_reward"
MICRO_BATCH_TOKENS = 4096


class Warmup(NamedTuple):
    """The supervised warm-up of one model size (learner.tiny.sft.supervised_warmup arguments)."""

    steps: int
    batch_size: int
    lr: float


# Per model size. Each first learns the format, then, after a plateau (about 100 steps for tiny,
# 150 for small), to count down; the steps leave time to get good at it after that.
WARMUP = {"tiny": Warmup(300, 32, 3e-3), "small": Warmup(500, 16, 2e-3), "medium": Warmup(500, 16, 1e-3)}


def response(noun: str, repeats: int) -> str:
    """The expected answer to `repeat <noun> <repeats>:` (without EOS)."""
    return "".join(f"\n{k} {noun}" for k in range(repeats, 0, -1))


def make_rows(seed: int, count: int = NUM_PROMPTS) -> list[dict[str, str]]:
    """`count` prompts, n drawn with weight 1/n from 1..MAX_REPEATS and a noun uniformly; the
    label is the expected answer."""
    rng = random.Random(seed)
    counts = range(1, MAX_REPEATS + 1)
    rows = []
    for n in rng.choices(counts, weights=[1 / n for n in counts], k=count):
        noun = rng.choice(NOUNS)
        rows.append({"prompt": f"repeat {noun} {n}:", "label": response(noun, n).strip()})
    return rows


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def longtail_reward(prompts: list[str], completions: list[str], labels: list[str | None]) -> list[float]:
    """1.0 for exactly the expected lines, else PARTIAL_CREDIT x the fraction right before the first mistake."""
    scores = []
    for completion, label in zip(completions, labels):
        expected, got = _lines(label or ""), _lines(completion)
        if not expected:
            scores.append(0.0)
        elif got == expected:
            scores.append(1.0)
        else:
            right = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
            scores.append(PARTIAL_CREDIT * right / len(expected))
    return scores


def prepare(out_dir: str | Path, *, size: str = "tiny", seed: int = 0,
            sft_steps: int | None = None) -> dict[str, str | int]:
    """Build (once) the prompts, the `size` model initialised from `seed` and the policy warmed up
    on the prompts for `sft_steps` steps (default: the size's entry in WARMUP) under out_dir."""
    if size not in WARMUP:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(WARMUP)}")
    warmup = WARMUP[size]
    steps = warmup.steps if sft_steps is None else sft_steps
    out = Path(out_dir)
    base, policy, prompts = out / "base", out / "policy", out / "prompts.jsonl"
    info = {"model": str(policy), "prompts": str(prompts), "reward": REWARD,
            "max_new_tokens": MAX_NEW_TOKENS, "max_model_len": MAX_MODEL_LEN}
    settings = {"size": size, "seed": seed, "sft_steps": steps}
    if already_prepared(out, settings, policy):
        return info
    # imported only when something must be built: torch and transformers take seconds to load
    from learner.tiny.sft import supervised_warmup
    from learner.tiny.model import build_tiny_model, sized_spec

    with preparing(out, settings):
        build_tiny_model(base, sized_spec(size, seed))
        rows = make_rows(seed)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        supervised_warmup(base, [(r["prompt"], "\n" + r["label"]) for r in rows], policy, steps=steps,
                          batch_size=warmup.batch_size, lr=warmup.lr, seed=seed,
                          micro_batch_tokens=MICRO_BATCH_TOKENS)
    return info


def main() -> None:
    parser, p = prepare_parser("longtail", "Prepare the long-tail response-length task.",
                               "Build the prompts, the model and the warmed-up policy (idempotent).")
    add_size_argument(p)
    p.add_argument("--sft-steps", type=int, default=None,
                   help="Supervised warm-up steps (default: per size, " +
                        ", ".join(f"{size} {w.steps}" for size, w in WARMUP.items()) + ").")
    args = parser.parse_args()
    print(json.dumps(prepare(args.out, size=args.size, seed=args.seed, sft_steps=args.sft_steps)))


if __name__ == "__main__":
    main()
