"""Benchmark: building a weight update under ZeRO-3, gather-everything vs module by module.

    python bench/bench_weight_push.py [--ranks 2 --hidden 1024 --layers 8 --vocab 32000
                                       --engine-dtype bfloat16 --repeats 2]

A Llama actor (fp32, built from a config) is wrapped in a DeepSpeed ZeRO-3 engine on `--ranks`
gloo ranks (torchrun), so that every rank holds 1/ranks of the parameters. On rank 0 it then
builds the `WeightUpdate` the rollouts receive (engine dtype, 64 MiB buckets, fingerprint) with

* gather_all: the straightforward way: gather every parameter at once
  (`GatheredParameters(all)`), copy the merged state dict, convert it, then pack the buckets;
* streaming:  `learner.training.weight_sync.WeightPublisher`: gather, convert and copy into the buckets
  one module at a time.

Each variant runs in its own torchrun job. Peak memory is rank 0's peak RSS (VmHWM, reset through
/proc/self/clear_refs) during the first build above its RSS just before it (heap trimmed first,
glibc's mmap threshold fixed at 1 MiB so that freed buffers are returned, not retained); time is
the mean of the `--repeats` builds that follow. Both must produce the same update (fingerprint and every byte). Prints a markdown
table with the streaming/gather_all ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import FIXED_MMAP_THRESHOLD, reset_peak_rss, status_kib, trim_heap  # noqa: E402


def gather_all_update(actor, publisher, version: int):
    """The reference: the whole model gathered and copied first, then converted and packed."""
    import dataclasses

    import deepspeed
    import torch

    from protocol.buffers import tensor_bytes as raw_bytes
    from protocol.messages import WeightUpdate, pack_weight_buckets
    from protocol.weights import fingerprint_names, weight_fingerprint

    with deepspeed.zero.GatheredParameters(list(actor.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in actor.merged_state_dict().items()}
    state = {k: v.to(publisher.dtype) if v.is_floating_point() else v for k, v in state.items()}
    named = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape), raw_bytes(v)) for k, v in state.items()]
    metas, buckets = pack_weight_buckets(named, publisher.bucket_bytes)
    update = WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint={})
    chosen = set(fingerprint_names(list(state)))
    fingerprint = weight_fingerprint({m.name: update.tensor_bytes(m) for m in metas if m.name in chosen})
    del state, named
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dataclasses.replace(update, fingerprint=fingerprint)


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from learner.training.distributed import init_distributed
    from learner.models.actor import Actor
    from learner.training.weight_sync import WeightPublisher

    init_distributed()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # partitioned as it is built, as for a big model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    actor = Actor(model)
    engine, *_ = deepspeed.initialize(model=actor, config=ds_config,
                                      optimizer=torch.optim.SGD(actor.parameters(), lr=0.0))
    publisher = WeightPublisher(engine.module, engine_dtype=args.engine_dtype, bucket_bytes=64 << 20, zero_stage=3)
    build = publisher.build if args.variant == "streaming" else lambda v: gather_all_update(engine.module, publisher, v)

    # memory: the first build, from a trimmed heap (freed memory glibc still holds would hide the peak)
    dist.barrier()
    trim_heap()
    base_kb = status_kib("VmRSS")
    reset_peak_rss()
    update = build(1)
    peak_kb = status_kib("VmHWM") - base_kb
    times = []
    for version in range(2, args.repeats + 2):
        update = None  # the previous update is released before the next is built, as in the learner
        started = time.perf_counter()
        update = build(version)
        times.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        digest = hashlib.blake2b(digest_size=16)
        for bucket in update.buckets:
            digest.update(bucket)
        params = sum(int(p.ds_numel) for p in engine.module.parameters())
        print("RESULT " + json.dumps({
            "variant": args.variant, "params_m": params / 1e6, "update_mb": sum(b.nbytes for b in update.buckets) / 2**20,
            "peak_extra_mb": peak_kb / 1024, "seconds": sum(times) / len(times),
            "fingerprint": update.fingerprint, "digest": digest.hexdigest()}), flush=True)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="ZeRO-3 ranks (gloo on the CPU).")
    parser.add_argument("--hidden", type=int, default=1024, help="Hidden size of the Llama actor.")
    parser.add_argument("--layers", type=int, default=8, help="Decoder layers.")
    parser.add_argument("--vocab", type=int, default=32000, help="Vocabulary size.")
    parser.add_argument("--engine-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="dtype of the update (the rollout engine's).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed builds after one warm-up.")
    parser.add_argument("--variant", choices=["gather_all", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return

    results = {}
    for variant in ("gather_all", "streaming"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
               os.path.abspath(__file__), "--variant", variant, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--engine-dtype", args.engine_dtype,
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **FIXED_MMAP_THRESHOLD})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1].removeprefix("RESULT "))

    full, stream = results["gather_all"], results["streaming"]
    assert full["fingerprint"] == stream["fingerprint"] and full["digest"] == stream["digest"], \
        "the two ways built different updates"
    print(f"ZeRO-3 on {args.ranks} ranks, {full['params_m']:.0f}M-parameter fp32 Llama actor, "
          f"{args.engine_dtype} update of {full['update_mb']:.0f} MiB (identical bytes in both variants)\n")
    print("| variant | rank-0 peak extra memory (MiB) | build time (s) |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_extra_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"| **streaming / gather_all** | **{stream['peak_extra_mb'] / full['peak_extra_mb']:.2f}x** | "
          f"**{stream['seconds'] / full['seconds']:.2f}x** |")


if __name__ == "__main__":
    main()
