"""Benchmark: naive log-softmax log-probs vs learner.models.logprobs.log_probs_from_logits.

    python bench/bench_logprobs.py [--vocab 151936 --tokens 1024 --temperature 1.0
                                    --chunk-sizes 4096,512 --repeats 2]

For fp32 and bf16 logits ``[tokens, vocab]`` (a leaf with requires_grad) it times forward +
backward of ``sum(w * log_probs)`` for

* naive:   ``log_softmax(logits.float() / t, -1).gather(-1, labels)``
* chunked: ``log_probs_from_logits(logits, labels, t, chunk_size=c)`` for each ``c``

Each variant runs in its own subprocess. Peak memory is the extra memory above the baseline taken
after the logits are allocated: on the CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs; ru_maxrss as a fallback), on a GPU ``torch.cuda.max_memory_allocated``.
Both variants include the unavoidable gradient w.r.t. the logits (``tokens * vocab`` elements in
the logits' dtype). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import torch

    sys.path.insert(0, REPO)
    from learner.models.logprobs import log_probs_from_logits

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, v, t = args.tokens, args.vocab, args.temperature
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.empty(n, v, dtype=dtype, device=dev)
    for s in range(0, n, 64):  # fill in slices: no full-size fp32 temporary before the baseline
        logits[s : s + 64] = torch.randn(min(64, n - s), v, generator=g, device=dev) * 3
    logits.requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=dev)
    w = torch.randn(n, generator=g, device=dev)

    if args.variant == "naive":

        def fn():
            return torch.log_softmax(logits.float() / t, dim=-1).gather(-1, labels[:, None]).squeeze(-1)

    else:

        def fn():
            return log_probs_from_logits(logits, labels, temperature=t, chunk_size=args.chunk_size)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "cuda max_memory_allocated"
    else:
        base_kb = _status_kb("VmRSS")
        if _reset_peak_rss() and _status_kb("VmHWM") is not None:
            method = "peak RSS (VmHWM)"
        else:
            method = "ru_maxrss (may under-report)"
        base = base_kb * 1024

    times, out = [], None
    for i in range(1 + args.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lp = fn()
        (lp * w).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == 0:
            out = lp.detach().float().cpu()
        else:
            times.append(dt)
        logits.grad = None
        del lp

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm = _status_kb("VmHWM") if method.startswith("peak") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm * 1024 - base
    if args.variant == "naive":  # exact float64 reference for the first rows, after the measurement
        n_ref = min(n, 256)
        truth = torch.empty(n_ref, dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, n_ref, 64):
                row = torch.log_softmax(logits[s : s + 64].double() / t, -1)
                truth[s : s + 64] = row.gather(-1, labels[s : s + 64, None])[:, 0].cpu()
        torch.save(truth, args.out + ".fp64")
    torch.save(out, args.out)
    print(
        json.dumps(
            {
                "peak_bytes": max(0, peak),
                "time_s": sorted(times)[len(times) // 2],
                "method": method,
                "device": str(dev),
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_variant(args, dtype: str, variant: str, chunk: int, out_path: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--dtype", dtype,
        "--variant", variant,
        "--chunk-size", str(chunk),
        "--vocab", str(args.vocab),
        "--tokens", str(args.tokens),
        "--temperature", str(args.temperature),
        "--repeats", str(args.repeats),
        "--out", out_path,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed ({dtype} {variant}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-sizes", default="4096,512", help="comma-separated chunk sizes (rows)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=1, help="timed iterations after one warm-up")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    chunks = [int(c) for c in args.chunk_sizes.split(",") if c]
    rows, info = [], None
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            ref_path = os.path.join(tmp, f"{dtype}-naive.pt")
            naive = run_variant(args, dtype, "naive", 0, ref_path)
            info = naive
            ref = torch.load(ref_path)
            truth = torch.load(ref_path + ".fp64")
            err = (ref[: len(truth)].double() - truth).abs().max().item()
            rows.append((dtype, "naive", "-", naive, 0.0, err, naive))
            for c in chunks:
                path = os.path.join(tmp, f"{dtype}-{c}.pt")
                r = run_variant(args, dtype, "chunked", c, path)
                got = torch.load(path)
                diff = (got - ref).abs().max().item()
                err = (got[: len(truth)].double() - truth).abs().max().item()
                rows.append((dtype, "log_probs_from_logits", str(c), r, diff, err, naive))

    mib = 1024 * 1024
    elem = {"fp32": 4, "bf16": 2}
    print(
        f"\nlog-probs fwd+bwd, tokens={args.tokens}, vocab={args.vocab}, temperature={args.temperature}, "
        f"device={info['device']}, torch threads={info['threads']}, memory: {info['method']} "
        f"above the baseline after allocating the logits; median of {args.repeats} timed run(s) after 1 warm-up; error vs fp64 on the first 256 rows\n"
    )
    print(
        "| logits | variant | chunk rows | peak extra MiB | fwd+bwd ms | peak vs naive | time vs naive "
        "| max abs diff vs naive | max abs err vs fp64 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype, name, chunk, r, diff, err, naive in rows:
        print(
            f"| {dtype} | {name} | {chunk} | {r['peak_bytes'] / mib:.0f} | {r['time_s'] * 1e3:.0f} | "
            f"{r['peak_bytes'] / max(naive['peak_bytes'], 1):.2f}x | {r['time_s'] / naive['time_s']:.2f}x "
            f"| {diff:.1e} | {err:.1e} |"
        )
    grads = ", ".join(f"{d}: {args.tokens * args.vocab * elem[d] / mib:.0f} MiB" for d in args.dtypes.split(","))
    print(f"\nfloor: the gradient w.r.t. the logits alone is tokens*vocab elements ({grads}). "
          f"total wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
