"""Benchmark: one learner step at a realistic vocabulary, log-probs from the logits vs from hidden
states, with and without gradient checkpointing.

    python bench/bench_learner_step.py [--vocab 151936 --hidden 256 --layers 2 --samples 8
                                        --min-len 1024 --max-len 4096 --prompt-len 64
                                        --micro-batch-tokens 4096 --kl-coef 0.01 --threads 2 --repeats 1]

Builds (once, under runs/bench_learner_step) a randomly initialised fp32 Llama with Qwen2.5's
vocabulary and a small body, so that it fits this machine, and runs the learner's own step on it:
`PPOTrainer` on one DeepSpeed rank (ZeRO-2), `score` (the reward function and, with --kl-coef > 0,
the policy's and the reference's no-grad passes) and `train_step` (forward, losses and backward
per micro-batch of at most --micro-batch-tokens tokens, one optimizer step) over --samples
responses of lengths spread evenly from --min-len to --max-len tokens (groups of 4). Variants:

* logits: model.logprobs_from_hidden false, no checkpointing (the path before issue #15);
* hidden: model.logprobs_from_hidden true (the default);
* hidden+checkpointing: and model.gradient_checkpointing true.

Each variant runs in its own process, after a warm-up step on one short group (so that the
optimizer state and DeepSpeed's buffers exist), with glibc's mmap threshold fixed (RSS is live
memory). Memory is the peak RSS of each pass above the RSS before it, and the process's peak RSS;
time is per token of the step (scoring plus training). With --repeats > 1 the variants alternate
and medians are printed. Prints a markdown table with the ratios to the first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import FIXED_MMAP_THRESHOLD, reset_peak_rss, status_kib, trim_heap  # noqa: E402

VARIANTS = {
    "logits": {"model.logprobs_from_hidden": "false"},
    "hidden": {"model.logprobs_from_hidden": "true"},
    "hidden+checkpointing": {"model.logprobs_from_hidden": "true", "model.gradient_checkpointing": "true"},
}
GROUP = 4  # samples per prompt
TOKEN_IDS = (3, 512)  # ids the built-in BPE tokenizer decodes for the reward function (cost does not depend on them)


def build_model(args) -> Path:
    """The benchmark's model directory (built once per shape): a Llama with head_dim 64 and the
    built-in BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tiny.model import build_bpe_tokenizer

    out = REPO / "runs" / "bench_learner_step" / f"llama-v{args.vocab}-h{args.hidden}-l{args.layers}"
    if (out / "config.json").exists():
        return out
    heads = args.hidden // 64
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=8192,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    build_bpe_tokenizer().save_pretrained(out)
    return out


def response_lengths(args) -> list[int]:
    """--samples lengths spread evenly over [--min-len, --max-len], in a fixed shuffled order."""
    import numpy as np

    lengths = np.linspace(args.min_len, args.max_len, args.samples).round().astype(int)
    return np.random.default_rng(0).permutation(lengths).tolist()


def packed_batch(lengths: list[int], prompt_len: int, vocab: int, seed: int = 0):
    """One PackedBatch of len(lengths) sequences (groups of GROUP) with `prompt_len`-token prompts and
    behaviour log-probs near a uniform policy's."""
    import numpy as np

    from protocol.messages import PackedBatch

    rng = np.random.default_rng(seed)
    b = len(lengths)
    seq = [prompt_len + n for n in lengths]
    mask = np.concatenate([np.r_[np.zeros(prompt_len), np.ones(n)] for n in lengths]).astype(np.int64)
    behaviour = np.where(mask == 1, -np.log(vocab) + rng.normal(0, 0.3, mask.size), 0.0)
    return PackedBatch(grant_id=0, step=0, tokens=rng.integers(*TOKEN_IDS, sum(seq)),
                       cu_seqlens=np.r_[0, np.cumsum(seq)], prompt_lens=np.full(b, prompt_len), loss_mask=mask,
                       behaviour_logprobs=np.minimum(behaviour, 0), prompt_ids=np.arange(b) // GROUP,
                       sample_indices=(np.arange(b) % GROUP).astype(np.int32),
                       weight_versions=np.zeros(b, np.int32), last_weight_versions=np.zeros(b, np.int32),
                       finish_reasons=["stop"] * b, labels=[None] * b, gen_seconds=0.0)


def length_reward(prompts, completions, labels):
    """Differs between samples, so that the advantages (and gradients) are not zero."""
    return [len(c) % 7 / 7 for c in completions]


def measured(fn):
    """(result, seconds, peak RSS above the RSS before in MiB, peak RSS in MiB) of fn()."""
    trim_heap()
    before = status_kib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    return result, seconds, (peak - before) / 1024, peak / 1024


def worker(args) -> None:
    """One variant: a warm-up step, then the measured step; prints one RESULT line."""
    import torch

    from learner.training.distributed import init_distributed
    from learner.data.reward_functions import RewardFn, RewardFunctions
    from learner.hub.step_samples import StepSamples
    from learner.tiny.model import build_bpe_tokenizer
    from learner.training.trainer import PPOTrainer
    from protocol.config import load_config

    torch.set_num_threads(args.threads)
    init_distributed()
    model = str(build_model(args))
    lengths = response_lengths(args)
    cfg = load_config(overrides={
        "model.path": model, "rollout.n_samples_per_prompt": str(GROUP), "algo.kl_coef": str(args.kl_coef),
        "train.micro_batch_tokens": str(args.micro_batch_tokens), "train.lr": "1e-5",
        "rollout.max_new_tokens": str(max(lengths)), "rollout.max_model_len": str(max(lengths) + args.prompt_len),
        **VARIANTS[args.variant]})
    torch.manual_seed(0)
    trainer = PPOTrainer(cfg, model, build_bpe_tokenizer(),
                         RewardFunctions([RewardFn(length_reward, "bench:length_reward")], [1.0]))

    def step(step_number: int, batch) -> dict:
        parts, score_s, score_extra, score_peak = measured(
            lambda: trainer.score(StepSamples.from_batches([batch]), order=0))
        metrics, train_s, train_extra, train_peak = measured(lambda: trainer.train_step(step_number, parts))
        return {"score_s": score_s, "train_s": train_s, "score_extra_mib": score_extra,
                "train_extra_mib": train_extra, "step_peak_mib": max(score_peak, train_peak),
                "policy_loss": metrics["policy_loss"], "grad_norm": metrics["grad_norm"]}

    step(0, packed_batch([args.min_len // 8] * GROUP, args.prompt_len, args.vocab, seed=1))  # warm-up
    batch = packed_batch(lengths, args.prompt_len, args.vocab)
    result = step(1, batch)
    print("RESULT " + json.dumps({
        "variant": args.variant, "tokens": batch.num_tokens, **result,
        "params_m": sum(p.numel() for p in trainer.actor_module.parameters()) / 1e6}), flush=True)


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "variants")]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **FIXED_MMAP_THRESHOLD})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936, help="Vocabulary size (Qwen2.5's).")
    p.add_argument("--hidden", type=int, default=256, help="Hidden size (a multiple of 64).")
    p.add_argument("--layers", type=int, default=2, help="Decoder layers.")
    p.add_argument("--samples", type=int, default=8, help="Responses in the step (a multiple of 4).")
    p.add_argument("--min-len", type=int, default=1024, help="Shortest response (tokens).")
    p.add_argument("--max-len", type=int, default=4096, help="Longest response (tokens).")
    p.add_argument("--prompt-len", type=int, default=64, help="Prompt tokens of every sample.")
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="train.micro_batch_tokens.")
    p.add_argument("--kl-coef", type=float, default=0.01,
                   help="algo.kl_coef; > 0 adds the reference model and the policy's no-grad pass to scoring.")
    p.add_argument("--threads", type=int, default=2, help="Torch threads.")
    p.add_argument("--repeats", type=int, default=1, help="Runs of each variant (alternating).")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated, the first is the reference.")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.samples % GROUP:
        p.error(f"--samples must be a multiple of {GROUP}")
    if args.variant:
        worker(args)
        return

    names = args.variants.split(",")
    runs = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            runs[name].append(run_variant(args, name))
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "variant"}
           for name, rs in runs.items()}
    ref = med[names[0]]
    first = runs[names[0]][0]
    print(f"One learner step: {first['params_m']:.1f}M-parameter fp32 Llama (vocab {args.vocab}, hidden "
          f"{args.hidden}, {args.layers} layers), {args.samples} responses of {args.min_len}-{args.max_len} "
          f"tokens ({first['tokens']} tokens), micro-batches of {args.micro_batch_tokens} tokens, kl_coef "
          f"{args.kl_coef}, {args.threads} threads, {args.repeats} run(s) per variant\n")
    print("| variant | peak RSS MiB | scoring: peak above start MiB | training: peak above start MiB | "
          "ms per token | peak RSS vs first | scoring peak vs first | training peak vs first | time vs first | "
          "policy loss | grad norm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def per_token_ms(m: dict) -> float:
        return (m["score_s"] + m["train_s"]) / m["tokens"] * 1e3

    for name in names:
        m = med[name]
        print(f"| {name} | {m['step_peak_mib']:.0f} | {m['score_extra_mib']:.0f} | {m['train_extra_mib']:.0f} | "
              f"{per_token_ms(m):.2f} | {m['step_peak_mib'] / ref['step_peak_mib']:.2f}x | "
              f"{m['score_extra_mib'] / ref['score_extra_mib']:.2f}x | {m['train_extra_mib'] / ref['train_extra_mib']:.2f}x | {per_token_ms(m) / per_token_ms(ref):.2f}x | "
              f"{m['policy_loss']:.6f} | {m['grad_norm']:.4f} |")


if __name__ == "__main__":
    main()
