"""Benchmark: weight fan-out to 1, 2, 4 and 8 rollouts, unicast (old) vs relay tree (new), in one run.

    python bench/bench_weight_fanout.py [--rollouts 1,2,4,8 --fanout 2 --hidden 1024 --vocab 16384
                                         --layers 4 --bucket-mb 32 --versions 3]

The learner side is the real `learner.hub.rollout_hub.RolloutHub` on a real ZeroMQ socket; each rollout is a
real `rollout.main.RolloutWorker` process (its receive loop, `rollout.weight_stream` relay and
streaming, acknowledgements) whose vLLM engine is replaced by `CopyEngine`: it copies every tensor
it is fed into a preallocated model (a plain torch copy) and fingerprints what it received, as the
worker extension does. Eight real vLLM engines do not fit a 2-core, 24 GiB machine; an engine's own
load time comes on top of the numbers here and does not depend on the fan-out.

An update is a bf16 Llama-like set of tensors (embedding, head, `--layers` decoder layers; 85M
parameters by default) in `--bucket-mb` buckets. For each mode and rollout count, fresh rollout
processes connect, version 0 warms up (allocates the copy), then `--versions` versions are timed:

* send-to-ack latency: from `publish` until the last rollout acknowledged the version (with the
  learner's fingerprint: a mismatch fails the run);
* rank-0 bytes: what the learner sent per version, in copies of the update;
* peak extra memory of a rollout during a version (VmHWM above VmRSS before it, the highest of the
  rollouts), against the largest bucket plus the largest tensor.

On one machine every copy crosses the same memory bus and the same few cores, so relaying moves the
copies from rank 0 to the rollouts without making them free: the latency ratio here says more about
those cores than about a cluster, where each rollout has a network link of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import FIXED_MMAP_THRESHOLD, reset_peak_rss, status_kib, trim_heap  # noqa: E402

RUN_ID = "bench-fanout"


def make_update(version: int, args):
    """A bf16 Llama-like update (random weights, a different seed per version)."""
    import torch

    from learner.training.weight_sync import build_weight_update

    h, v, ff = args.hidden, args.vocab, int(args.hidden * 2.75)
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h)}
    for layer in range(args.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{layer}.self_attn.{name}.weight"] = (h, h)
        for name, shape in (("gate_proj", (ff, h)), ("up_proj", (ff, h)), ("down_proj", (h, ff))):
            shapes[f"model.layers.{layer}.mlp.{name}.weight"] = shape
    generator = torch.Generator().manual_seed(version)
    tensors = ((name, torch.randn(shape, generator=generator)) for name, shape in shapes.items())
    return build_weight_update(version, tensors, dtype=torch.bfloat16, bucket_bytes=args.bucket_mb << 20)


class CopyEngine:
    """Stands in for the vLLM engine: loads each tensor with a torch copy into a preallocated model."""

    busy = False
    ready_for_weights = True

    def __init__(self):
        self.weight_version = -1
        self.model: dict = {}

    def apply_weight_stream(self, version, fingerprint_names, tensors, staging_dir, timeout_s):
        import torch

        from protocol.weights import weight_fingerprint
        from rollout.engine import _as_torch

        wanted, fingerprint = set(fingerprint_names), {}
        for name, tensor in _as_torch(tensors):
            if name in wanted:
                fingerprint.update(weight_fingerprint({name: memoryview(tensor.view(torch.uint8).numpy())}))
            self.model.setdefault(name, torch.empty_like(tensor)).copy_(tensor)
        self.weight_version = version
        return dict(sorted(fingerprint.items()))

    def cancel_all(self) -> int:
        return 0


def rollout_process(args) -> None:
    """One rollout: the real RolloutWorker loop on a CopyEngine; prints its peak extra memory per version."""
    from protocol.config import RunConfig
    from rollout.main import RolloutWorker

    cfg = RunConfig()
    cfg.run_id, cfg.transport.port, cfg.transport.weight_relay_fanout = RUN_ID, args.port, args.fanout
    cfg.transport.heartbeat_s = 1.0
    worker = RolloutWorker(cfg, args.rollout_index, "copy-engine")
    worker.engine = CopyEngine()
    applied = worker.engine.apply_weight_stream

    def measured(version, *rest):
        result = applied(version, *rest)
        peak = (status_kib("VmHWM") - measured.base_kib) / 1024
        print("PEAK " + json.dumps({"version": version, "peak_extra_mib": peak}), flush=True)
        trim_heap()
        measured.base_kib = status_kib("VmRSS")  # the next version's memory counts from here
        reset_peak_rss()
        return result

    trim_heap()
    measured.base_kib = status_kib("VmRSS")
    reset_peak_rss()
    worker.engine.apply_weight_stream = measured
    asyncio.run(worker.serve())


async def measure(mode_fanout: int, count: int, updates, args) -> dict:
    """Publish every update to `count` fresh rollouts; latency and bytes of each but the first."""
    from learner.hub.rollout_hub import RolloutHub
    from protocol.transport import LearnerEndpoint

    with LearnerEndpoint(RUN_ID) as endpoint:
        port = int(endpoint.address.rsplit(":", 1)[1])
        hub = RolloutHub(endpoint, ack_timeout_s=600, weight_relay_fanout=mode_fanout)
        server = asyncio.create_task(hub.serve())
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rollout-index", str(i),
                                   "--port", str(port), "--fanout", str(mode_fanout)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **FIXED_MMAP_THRESHOLD})
                 for i in range(count)]
        try:
            await hub.wait_for_rollouts(count, 120)
            latencies, sent = [], []
            for update in updates:
                before, started = hub.fanout.bytes_sent, time.monotonic()
                await hub.publish(update)
                while not all(p.applied_version >= update.version for p in hub.peers.values()):
                    hub._raise_if_failed()  # a wrong fingerprint fails here
                    await asyncio.sleep(0.002)
                latencies.append(time.monotonic() - started)
                sent.append((hub.fanout.bytes_sent - before) / update.total_bytes)
            await hub.shutdown_rollouts("benchmark done")
        finally:
            server.cancel()
        peaks: dict[int, float] = {}
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            for line in out.splitlines():
                if line.startswith("PEAK "):
                    record = json.loads(line.removeprefix("PEAK "))
                    if record["version"] > 0:  # version 0 allocates the model copy
                        peaks[record["version"]] = max(peaks.get(record["version"], 0.0), record["peak_extra_mib"])
    timed = latencies[1:]
    return {"latency_s": sum(timed) / len(timed), "rank0_copies": sum(sent[1:]) / len(timed),
            "peak_extra_mib": max(peaks.values()) if peaks else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", default="1,2,4,8", help="Rollout counts, comma-separated.")
    parser.add_argument("--fanout", type=int, default=2, help="transport.weight_relay_fanout of the relay mode.")
    parser.add_argument("--hidden", type=int, default=1024, help="Hidden size of the synthetic model.")
    parser.add_argument("--vocab", type=int, default=16384, help="Vocabulary size.")
    parser.add_argument("--layers", type=int, default=4, help="Decoder layers.")
    parser.add_argument("--bucket-mb", type=int, default=32, help="transport.weight_bucket_mb.")
    parser.add_argument("--versions", type=int, default=3, help="Timed versions after the warm-up one.")
    parser.add_argument("--rollout-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rollout_index is not None:
        rollout_process(args)
        return

    updates = [make_update(v, args) for v in range(args.versions + 1)]
    first = updates[0]
    params = sum(m.numel for m in first.tensors)
    bucket_mib = max(memoryview(b).nbytes for b in first.buckets) / 2**20
    tensor_mib = max(m.nbytes for m in first.tensors) / 2**20
    counts = [int(c) for c in args.rollouts.split(",")]
    results = {(mode, n): asyncio.run(measure(mode, n, updates, args)) for mode in (0, args.fanout) for n in counts}

    print(f"{params / 1e6:.0f}M-parameter bf16 update of {first.total_bytes / 2**20:.0f} MiB in {len(first.buckets)} "
          f"buckets (largest {bucket_mib:.0f} MiB, largest tensor {tensor_mib:.0f} MiB); mean of {args.versions} "
          f"versions; relay fanout {args.fanout}\n")
    print("| rollouts | unicast latency (s) | relay latency (s) | relay / unicast | relay latency / 1 rollout | "
          "rank-0 copies unicast | rank-0 copies relay | peak extra MiB unicast | relay peak extra / (bucket + tensor) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = results[(args.fanout, counts[0])]["latency_s"]
    for n in counts:
        old, new = results[(0, n)], results[(args.fanout, n)]
        print(f"| {n} | {old['latency_s']:.3f} | {new['latency_s']:.3f} | {new['latency_s'] / old['latency_s']:.2f}x | "
              f"{new['latency_s'] / base:.2f}x | {old['rank0_copies']:.2f} | {new['rank0_copies']:.2f} | "
              f"{old['peak_extra_mib']:.0f} | "
              f"{new['peak_extra_mib']:.0f} / {bucket_mib + tensor_mib:.0f} = "
              f"{new['peak_extra_mib'] / (bucket_mib + tensor_mib):.2f}x |")


if __name__ == "__main__":
    main()
