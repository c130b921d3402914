"""Benchmark: Actor forward + backward with model.logprobs_from_hidden off (logits) and on.

    python bench/bench_actor_logprobs.py [--sizes tiny,small --seqs 64 --min-len 20 --max-len 120
                                          --repeats 7 --threads 2]

Builds the built-in task models (learner.tiny.model MODEL_SIZES, fp32, sdpa) from their configs, packs
``--seqs`` random sequences of random lengths and times ``Actor(tokens, cu_seqlens, return_entropy=
True)`` + backward of ``sum(log_probs + 0.01 * entropy)``, alternating off / on; prints the median
of ``--repeats`` timed runs each (after one warm-up) and the largest differences between the two.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=120)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.models.actor import Actor
    from learner.tiny.model import MODEL_SIZES

    torch.set_num_threads(args.threads)
    print("| model | tokens | off (logits) ms | on (hidden) ms | on / off | max diff log-probs | max diff grads |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        spec = MODEL_SIZES[size]
        cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                          intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                          num_attention_heads=spec.num_attention_heads,
                          num_key_value_heads=spec.num_key_value_heads,
                          max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False)
        torch.manual_seed(0)
        actor = Actor(LlamaForCausalLM(cfg).float()).train()
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(args.min_len, args.max_len + 1, (args.seqs,), generator=g)
        tokens = torch.randint(0, spec.vocab_size, (int(lens.sum()),), generator=g)
        cu = torch.zeros(args.seqs + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)

        def step(on: bool):
            actor.logprobs_from_hidden = on
            actor.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = actor(tokens, cu_seqlens=cu, return_entropy=True)
            (out["log_probs"].sum() + 0.01 * out["entropy"].sum()).backward()
            dt = time.perf_counter() - t0
            return dt, out["log_probs"].detach(), [q.grad.clone() for q in actor.parameters()]

        step(False), step(True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                times[on].append(step(on)[0])
        _, lp_off, g_off = step(False)
        _, lp_on, g_on = step(True)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        dlp = (lp_on - lp_off).abs().max().item()
        dg = max((a - b).abs().max().item() for a, b in zip(g_on, g_off))
        print(f"| {size} | {tokens.numel()} | {med[False] * 1e3:.1f} | {med[True] * 1e3:.1f} | "
              f"{med[True] / med[False]:.2f}x | {dlp:.1e} | {dg:.1e} |")


if __name__ == "__main__":
    main()
