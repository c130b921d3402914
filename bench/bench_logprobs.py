"""Benchmark: naive log-softmax log-probs vs learner.models.logprobs.log_probs_from_logits
(and log_probs_from_hidden).

    python bench/bench_logprobs.py [--vocab 151936 --tokens 1024 --temperature 1.0
                                    --chunk-sizes 4096,512 --repeats 2]
    python bench/bench_logprobs.py --hidden-size 896 --tokens 2048 --dtypes fp32
                                   [--hidden-chunk-sizes 512,256 --variants naive,chunked,hidden]

For fp32 and bf16 logits ``[tokens, vocab]`` (a leaf with requires_grad) it times forward +
backward of ``sum(w * log_probs)`` for

* naive:   ``log_softmax(logits.float() / t, -1).gather(-1, labels)``
* chunked: ``log_probs_from_logits(logits, labels, t, chunk_size=c)`` for each ``c``

With ``--hidden-size H`` (e.g. 896) the inputs are instead hidden states ``[tokens, H]`` and an
output layer weight ``[vocab, H]`` (both leaves with requires_grad, fp32 or bf16) and the variants are

* naive:   ``log_softmax((hidden @ W.T).float() / t, -1).gather(-1, labels)``
* chunked: ``log_probs_from_logits(hidden @ W.T, labels, t, c)`` (today's Actor: logits materialised)
* hidden:  ``log_probs_from_hidden(hidden, W, None, labels, t, c)`` (no ``[tokens, vocab]`` tensor)

and the peak is above the baseline taken after hidden and W are allocated.

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
    from learner.models.logprobs import log_probs_from_hidden, log_probs_from_logits

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, v, t = args.tokens, args.vocab, args.temperature
    g = torch.Generator(device=dev).manual_seed(0)
    hsz = args.hidden_size
    if hsz:
        hidden = torch.randn(n, hsz, generator=g, device=dev).to(dtype).requires_grad_()
        weight = torch.empty(v, hsz, dtype=dtype, device=dev)
        for s in range(0, v, 4096):
            weight[s : s + 4096] = torch.randn(min(4096, v - s), hsz, generator=g, device=dev) * (3 / hsz**0.5)
        weight.requires_grad_()
        leaves = [hidden, weight]
    else:
        logits = torch.empty(n, v, dtype=dtype, device=dev)
        for s in range(0, n, 64):  # fill in slices: no full-size fp32 temporary before the baseline
            logits[s : s + 64] = torch.randn(min(64, n - s), v, generator=g, device=dev) * 3
        logits.requires_grad_()
        leaves = [logits]
    labels = torch.randint(0, v, (n,), generator=g, device=dev)
    w = torch.randn(n, generator=g, device=dev)

    if args.variant == "hidden":

        def fn():
            return log_probs_from_hidden(hidden, weight, None, labels, t, args.chunk_size)[0]

    elif args.variant == "naive":

        def fn():
            z = hidden @ weight.T if hsz else logits
            return torch.log_softmax(z.float() / t, dim=-1).gather(-1, labels[:, None]).squeeze(-1)

    else:

        def fn():
            z = hidden @ weight.T if hsz else logits
            return log_probs_from_logits(z, labels, temperature=t, chunk_size=args.chunk_size)

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
        for leaf in leaves:
            leaf.grad = None
        del lp

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm = _status_kb("VmHWM") if method.startswith("peak") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm * 1024 - base
    if args.truth:  # exact float64 reference for the first rows, after the measurement
        n_ref = min(n, 256)
        truth = torch.empty(n_ref, dtype=torch.float64)
        with torch.no_grad():
            w64 = weight.double() if hsz else None
            for s in range(0, n_ref, 64):
                z = hidden[s : s + 64].double() @ w64.T if hsz else logits[s : s + 64].double()
                row = torch.log_softmax(z / t, -1)
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


def run_variant(args, dtype: str, variant: str, chunk: int, out_path: str, truth: bool = False) -> dict:
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
        "--hidden-size", str(args.hidden_size),
        "--out", out_path,
    ] + (["--truth"] if truth else [])
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
    p.add_argument("--hidden-size", type=int, default=0,
                   help="0: inputs are logits [tokens, vocab]; H: hidden states [tokens, H] and an output "
                        "layer [vocab, H] (adds the log_probs_from_hidden variant)")
    p.add_argument("--variants", default="",
                   help="comma-separated subset of naive,chunked,hidden (default: all that apply); without "
                        "naive the ratio columns are empty")
    p.add_argument("--hidden-chunk-sizes", default="",
                   help="chunk sizes for log_probs_from_hidden (default: --chunk-sizes)")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--truth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    chunks = [int(c) for c in args.chunk_sizes.split(",") if c]
    hidden_chunks = [int(c) for c in (args.hidden_chunk_sizes or args.chunk_sizes).split(",") if c]
    wanted = args.variants.split(",") if args.variants else ["naive", "chunked"] + (["hidden"] if args.hidden_size else [])
    plan = ([("naive", "naive", 0)] if "naive" in wanted else []) + \
        ([("chunked", "log_probs_from_logits", c) for c in chunks] if "chunked" in wanted else []) + \
        ([("hidden", "log_probs_from_hidden", c) for c in hidden_chunks] if "hidden" in wanted else [])
    rows, info = [], None
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            naive = ref = truth = None
            for i, (variant, label, c) in enumerate(plan):
                path = os.path.join(tmp, f"{dtype}-{variant}-{c}.pt")
                r = run_variant(args, dtype, variant, c, path, truth=(i == 0))
                info = info or r
                got = torch.load(path)
                if i == 0:
                    truth = torch.load(path + ".fp64")
                if variant == "naive":
                    naive, ref = r, got
                diff = (got - ref).abs().max().item() if ref is not None else float("nan")
                err = (got[: len(truth)].double() - truth).abs().max().item()
                rows.append((dtype, label, str(c) if c else "-", r, diff, err, naive))

    mib = 1024 * 1024
    elem = {"fp32": 4, "bf16": 2}
    inputs = f"hidden [tokens, {args.hidden_size}] + head [vocab, {args.hidden_size}]" if args.hidden_size else "logits"
    print(
        f"\nlog-probs fwd+bwd from {inputs}, tokens={args.tokens}, vocab={args.vocab}, temperature={args.temperature}, "
        f"device={info['device']}, torch threads={info['threads']}, memory: {info['method']} "
        f"above the baseline after allocating the inputs; median of {args.repeats} timed run(s) after 1 warm-up; error vs fp64 on the first 256 rows\n"
    )
    print(
        "| dtype | variant | chunk rows | peak extra MiB | fwd+bwd ms | peak vs naive | time vs naive "
        "| max abs diff vs naive | max abs err vs fp64 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype, name, chunk, r, diff, err, naive in rows:
        vs = (f"{r['peak_bytes'] / max(naive['peak_bytes'], 1):.2f}x | {r['time_s'] / naive['time_s']:.2f}x"
              if naive else "- | -")
        print(f"| {dtype} | {name} | {chunk} | {r['peak_bytes'] / mib:.0f} | {r['time_s'] * 1e3:.0f} | {vs} "
              f"| {diff:.1e} | {err:.1e} |")
    if args.hidden_size:
        grads = ", ".join(f"{d}: {(args.tokens + args.vocab) * args.hidden_size * elem[d] / mib:.0f} MiB"
                          for d in args.dtypes.split(","))
        print(f"\nfloor: the gradients w.r.t. hidden and W alone are (tokens+vocab)*hidden elements ({grads}). "
              f"total wall time {time.time() - t_start:.0f} s")
    else:
        grads = ", ".join(f"{d}: {args.tokens * args.vocab * elem[d] / mib:.0f} MiB" for d in args.dtypes.split(","))
        print(f"\nfloor: the gradient w.r.t. the logits alone is tokens*vocab elements ({grads}). "
              f"total wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
