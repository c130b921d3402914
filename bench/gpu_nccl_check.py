"""transport.weight_transfer nccl on a real GPU, end to end except for vLLM.

Learner side: the real `RolloutHub` with the real `NcclWeightFanout` built by `learner.hub.factory.nccl_fanout`
(rank 0 makes the NCCL unique id, invites the rollout over ZeroMQ, joins the group with
`torch.cuda.nccl`, broadcasts each bucket from its GPU). Rollout side, in another process: the real
`RolloutWorker` loop in each of `--rollouts` processes (hello, invitation, `join_weight_group`, header over ZeroMQ, acknowledgement with
its fingerprint) whose engine is the real `WeightReloadExtension` worker receiving the buckets into
its GPU memory and loading them into a torch model there. Only vLLM's model runner is replaced (by a
copy into preallocated GPU tensors): the GPU machine these checks run on has no vLLM.

Every version is checked twice: the hub's fingerprint check (as in a run), and a digest of every byte
of every tensor as the rollout's model holds it against the learner's own bytes.

One GPU holds every process. NCCL refuses two ranks on one device of one host, so each process
gets its own NCCL_HOSTID: NCCL then takes them for two hosts and moves the bytes over its socket
transport on loopback (GPU -> host -> socket -> host -> GPU), not GPU to GPU. The throughput printed
is that path's, not NVLink's; what this proves is the protocol: invitation, group formation, bucket
order and layout, loading and acknowledgement.

    python bench/gpu_nccl_check.py [--hidden 2048 --layers 8 --versions 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_weight_fanout import make_update  # noqa: E402

RUN_ID = "gpu-nccl-check"
# Two "hosts" on one GPU, talking over loopback sockets (see the module docstring).
NCCL_ENV = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "NCCL_DEBUG": "WARN"}


def config(args):
    from protocol.config import RunConfig

    cfg = RunConfig()
    cfg.run_id, cfg.transport.weight_transfer, cfg.rollout.num_processes = RUN_ID, "nccl", args.rollouts
    cfg.transport.heartbeat_s, cfg.transport.batch_timeout_s = 1.0, args.timeout_s
    cfg.transport.weight_ack_timeout_s = args.timeout_s
    if args.port:
        cfg.transport.port = args.port
    return cfg


def digest_of_update(update) -> str:
    """SHA-256 over every tensor's bytes, in name order, as the learner sent them."""
    h = hashlib.sha256()
    for meta in sorted(update.tensors, key=lambda m: m.name):
        h.update(memoryview(update.buckets[meta.bucket])[meta.offset:meta.offset + meta.nbytes])
    return h.hexdigest()


class GpuModelEngine:
    """The rollout engine reduced to its NCCL weight path: one in-process worker (the real extension) on cuda:0."""

    busy = False
    ready_for_weights = True

    def __init__(self):
        import torch

        from rollout.worker_extension import WeightReloadExtension

        class Worker(WeightReloadExtension):
            def __init__(self):
                self.rank, self.device, self.model_runner = 0, torch.device("cuda", 0), self
                self.model: dict[str, torch.Tensor] = {}

            def reload_weights(self, weights_iterator) -> None:  # what vLLM's model runner does: copy in place
                for name, tensor in weights_iterator:
                    self.model.setdefault(name, torch.empty_like(tensor)).copy_(tensor)

        self.worker = Worker()
        self.weight_version = -1

    def join_weight_group(self, group_id: bytes, first_rank: int, world_size: int) -> None:
        self.worker.join_weight_group(group_id, first_rank, world_size)

    def apply_weight_broadcast(self, version, fingerprint_names, layout, timeout_s) -> dict[str, str]:
        import torch

        fingerprint = self.worker.apply_weights_nccl(layout, fingerprint_names, timeout_s)
        torch.cuda.synchronize()
        h = hashlib.sha256()
        for name in sorted(self.worker.model):
            h.update(self.worker.model[name].contiguous().view(torch.uint8).cpu().numpy().tobytes())
        print("LOADED " + json.dumps({"version": version, "digest": h.hexdigest()}), flush=True)
        self.weight_version = version
        return fingerprint

    def cancel_all(self) -> int:
        return 0


def rollout_process(args) -> None:
    from rollout.main import RolloutWorker

    worker = RolloutWorker(config(args), args.index, "gpu-model")
    worker.engine = GpuModelEngine()
    asyncio.run(worker.serve())


async def learner(args) -> int:
    import torch

    from learner.hub.factory import connect_rollouts, nccl_fanout
    from learner.hub.rollout_hub import RolloutHub
    from protocol.transport import LearnerEndpoint

    torch.cuda.set_device(0)
    cfg = config(args)
    updates = [make_update(v, args) for v in range(args.versions)]
    expected = {u.version: digest_of_update(u) for u in updates}
    print(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, {torch.cuda.get_device_name(0)}; "
          f"{sum(m.numel for m in updates[0].tensors) / 1e6:.0f}M-parameter bf16 update of "
          f"{updates[0].total_bytes / 2**20:.0f} MiB in {len(updates[0].buckets)} buckets", flush=True)
    with LearnerEndpoint(RUN_ID) as endpoint:
        port = int(endpoint.address.rsplit(":", 1)[1])
        hub = RolloutHub(endpoint, ack_timeout_s=args.timeout_s, fanout=nccl_fanout(cfg))
        server = asyncio.create_task(hub.serve())
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rollout", "--index", str(index),
                                   "--rollouts", str(args.rollouts), "--port", str(port), "--timeout-s",
                                   str(args.timeout_s)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **NCCL_ENV, "NCCL_HOSTID": f"rollout-{index}-host"})
                 for index in range(args.rollouts)]
        try:
            started = time.monotonic()
            await connect_rollouts(cfg, hub)
            print(f"group formed in {time.monotonic() - started:.2f} s: members {sorted(hub.fanout.members)}", flush=True)
            for update in updates:
                started = time.monotonic()
                await hub.publish(update)
                while not all(p.applied_version >= update.version for p in hub.peers.values()):
                    hub._raise_if_failed()  # a fingerprint that does not match fails here
                    await asyncio.sleep(0.002)
                seconds = time.monotonic() - started
                print(f"version {update.version}: acknowledged with a matching fingerprint in {seconds:.2f} s "
                      f"({update.total_bytes / seconds / 1e9:.2f} GB/s)", flush=True)
            await hub.shutdown_rollouts("check done")
        finally:
            server.cancel()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    matched = 0
    for index, out in enumerate(outputs):
        loaded = {r["version"]: r["digest"] for r in (json.loads(line.removeprefix("LOADED "))
                                                      for line in out.splitlines() if line.startswith("LOADED "))}
        matched += sum(loaded.get(v) == digest for v, digest in expected.items())
    print(f"every byte of every tensor as each rollout's GPU model holds it matches the learner's: "
          f"{matched}/{len(expected) * args.rollouts} (rollout, version) pairs; rank 0 sent "
          f"{hub.stats()['weight_bytes_sent'] / sum(u.total_bytes for u in updates):.2f} copies per version", flush=True)
    return 0 if matched == len(expected) * args.rollouts else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="Hidden size of the synthetic model.")
    parser.add_argument("--vocab", type=int, default=32000, help="Vocabulary size.")
    parser.add_argument("--layers", type=int, default=8, help="Decoder layers.")
    parser.add_argument("--bucket-mb", type=int, default=256, help="transport.weight_bucket_mb.")
    parser.add_argument("--versions", type=int, default=3, help="Versions published.")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="Group formation and per-version deadline.")
    parser.add_argument("--rollouts", type=int, default=2, help="Rollout processes (each its own NCCL 'host').")
    parser.add_argument("--rollout", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rollout:
        rollout_process(args)
        return 0
    os.environ.update({**NCCL_ENV, "NCCL_HOSTID": "learner-host"})
    return asyncio.run(learner(args))


if __name__ == "__main__":
    sys.exit(main())
