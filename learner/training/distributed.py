"""Data parallelism across learner ranks: start-up, sharing a step's samples, splitting groups."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from protocol.buffers import frame_list_parts, split_frame_list
from protocol.codec import decode, encode
from protocol.messages import PackedBatch

from learner.hub.step_samples import StepSamples


def init_distributed() -> None:
    """Join the process group started by torchrun / the DeepSpeed launcher, or make a 1-rank one."""
    import deepspeed  # here, not at import: it announces its accelerator on import (`python -m learner --help`)

    if "RANK" not in os.environ:
        # port 0: the 1-rank store binds a port the OS picks (a port found free beforehand may be
        # taken by another process before the store binds it)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if not torch.cuda.is_available():
        # On the CPU DeepSpeed JIT-compiles a shared-memory all-reduce the first time it starts;
        # a start killed during that compile leaves a lock that hangs every later start. Plain
        # gloo collectives are used instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class StepBroadcaster:
    """Rank 0 sends a step's PackedBatches to every rank in their wire encoding.

    The other ranks decode them with the same validating codec as the network path, so no rank
    ever unpickles anything.
    """

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def share(self, batches: list[PackedBatch] | None) -> list[PackedBatch]:
        if self.world_size == 1:
            return batches
        if is_rank0():
            blobs = [b"".join(frame_list_parts(encode(b, run_id="", producer_id="rank0", seq=i, weight_version=0)))
                     for i, b in enumerate(batches)]
            sizes = torch.tensor([len(blobs)] + [len(b) for b in blobs], dtype=torch.long)
            count = torch.tensor([sizes.numel()], dtype=torch.long)
        else:
            count = torch.zeros(1, dtype=torch.long)
        dist.broadcast(count, 0)
        if not is_rank0():
            sizes = torch.zeros(int(count), dtype=torch.long)
        dist.broadcast(sizes, 0)
        payload = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()) if is_rank0() \
            else torch.zeros(int(sizes[1:].sum()), dtype=torch.uint8)
        dist.broadcast(payload, 0)
        if is_rank0():
            return batches
        out, offset, raw = [], 0, payload.numpy().tobytes()
        for size in sizes[1:].tolist():
            out.append(decode(split_frame_list(raw[offset: offset + size])).body)
            offset += size
        return out


class GroupDealer:
    """Deals the prompt groups of each arriving batch to the learner ranks, balancing tokens over a step.

    Every rank sees the same batches in the same order and computes the same deal (greedy: a
    batch's groups largest first, each to the rank with the fewest tokens so far in the step), so
    each rank can score its groups of a batch as soon as it arrives. Group-based advantages only
    look inside a group, so a rank never needs another rank's samples. The first `world` groups of
    a step go to different ranks: with at least that many groups per step every rank trains.
    """

    def __init__(self, world: int, rank: int, group_size: int):
        self.world, self.rank, self.group_size = world, rank, group_size
        self.load = [0] * world

    def new_step(self) -> None:
        self.load = [0] * self.world

    def deal(self, samples: StepSamples) -> StepSamples:
        """This rank's whole groups of `samples` (contiguous, in batch order; possibly none)."""
        if self.world == 1:
            return samples
        groups = samples.num_sequences // self.group_size
        cu = samples.cu_seqlens
        tokens = [int(cu[(g + 1) * self.group_size] - cu[g * self.group_size]) for g in range(groups)]
        mine = []
        for g in sorted(range(groups), key=lambda g: -tokens[g]):
            owner = min(range(self.world), key=lambda r: self.load[r])
            self.load[owner] += tokens[g]
            if owner == self.rank:
                mine.append(g)
        if not mine:
            return samples.rows(0, 0)
        return StepSamples.concat([samples.rows(g * self.group_size, (g + 1) * self.group_size) for g in sorted(mine)])


def per_rank(value: float) -> list[float]:
    """Every rank's `value`, in rank order (collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    values[dist.get_rank()] = value
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Combine per-rank step metrics: counts are summed, maxima maximised, everything else averaged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    summed, maxed = values.clone(), values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    out = {}
    for i, k in enumerate(keys):
        if k in ("tokens", "sequences"):
            out[k] = float(summed[i])
        elif k.endswith("_max"):
            out[k] = float(maxed[i])
        else:
            out[k] = float(summed[i]) / world
    return out
