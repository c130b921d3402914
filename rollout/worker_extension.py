"""Methods added to every vLLM worker (passed as `worker_extension_cls`).

They run inside vLLM's workers and are reached with `LLM.collective_rpc`. A worker in the rollout's
own process (tensor_parallel_size 1) gets the received tensors themselves; workers in other
processes read them one file at a time from a directory in /dev/shm (rollout.engine.TensorFileFeed),
because tensors passed as RPC arguments through vLLM's multiprocess executor arrive as Python lists.
With transport.weight_transfer nccl every worker instead receives the buckets itself, broadcast by
learner rank 0 over the NCCL weight group (protocol.nccl_group), straight into its GPU memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from protocol.buffers import tensor_bytes
from protocol.nccl_group import broadcast_from_rank0, join_weight_group
from protocol.weights import weight_fingerprint

# One bucket of a version as `apply_weights_nccl` takes it (plain values: they may cross processes):
# its size in bytes, then (name, dtype, shape, offset, nbytes) of each tensor in it.
BucketLayout = tuple[int, list[tuple[str, str, list[int], int, int]]]


class WeightReloadExtension:
    def join_weight_group(self, group_id: bytes, first_rank: int, world_size: int) -> None:
        """Join the NCCL weight group `group_id` (its NCCL unique id) as rank `first_rank` + this worker's rank
        in its engine; returns once every member (the learner's rank 0, every worker of every rollout) has joined."""
        self.weight_group = join_weight_group(group_id, first_rank + self.rank, world_size, self.device)

    def apply_weights_nccl(self, layout: list[BucketLayout], fingerprint_names: list[str],
                           timeout_s: float) -> dict[str, str]:
        """Reload the weights from the buckets learner rank 0 broadcasts next over the NCCL weight group,
        laid out as `layout` (from the version's WeightHeader); returns the fingerprint (see apply_weights)."""
        return self.apply_weights(_broadcast_tensors(self.weight_group, layout, self.device, timeout_s),
                                  fingerprint_names, source="the NCCL broadcast")

    def apply_weights_files(self, directory: str, fingerprint_names: list[str], timeout_s: float) -> dict[str, str]:
        """Reload the model's weights in place from the tensor files written into `directory` as they
        come (TensorFileFeed): each is read, loaded, then deleted, so the files never hold the model."""
        return self.apply_weights(_tensor_files(Path(directory), timeout_s), fingerprint_names, source=directory)

    def apply_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], fingerprint_names: list[str],
                      source: str = "the update") -> dict[str, str]:
        """Reload the model's weights in place from (name, tensor) pairs, consumed one at a time.

        Called directly (no copy) when the worker runs in the rollout's own process. Returns the
        fingerprint of the fingerprinted tensors as this worker received them, so the learner can
        check that the bytes it sent are the bytes that reached the engine.
        """
        wanted = set(fingerprint_names)
        fingerprint: dict[str, str] = {}

        def tensors():
            for name, t in named_tensors:
                if name in wanted:  # hashed as received (copied to the host), before the model can transform it
                    fingerprint.update(weight_fingerprint({name: tensor_bytes(t.cpu())}))
                yield name, t

        # `reload_weights` repacks weights for the CPU kernels after loading; calling
        # `model.load_weights` directly leaves the CPU backend's parameters empty.
        self.model_runner.reload_weights(weights_iterator=tensors())
        if set(fingerprint) != wanted:
            raise RuntimeError(f"the model did not read fingerprinted tensors {sorted(wanted - set(fingerprint))} "
                               f"from {source}")
        return dict(sorted(fingerprint.items()))


def _broadcast_tensors(group, layout: list[BucketLayout], device: torch.device,
                       timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a version, as views of its bucket received on `device` from rank 0
    (each bucket is received once the previous one's tensors have been consumed, and released after)."""
    for index, (size, tensors) in enumerate(layout):
        bucket = torch.empty(size, dtype=torch.uint8, device=device)
        broadcast_from_rank0(group, bucket, timeout_s, f"weight bucket {index}")
        for name, dtype, shape, offset, nbytes in tensors:
            yield name, bucket[offset: offset + nbytes].view(getattr(torch, dtype)).view(shape)
        del bucket


def _tensor_files(directory: Path, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from files `<i>.<dtype>.<shape>.<name>` in order until the `end` file; each file is
    deleted once the next tensor is asked for (the model has copied it by then)."""
    index = 0
    while True:
        path = _wait_for_file(directory, index, timeout_s)
        if path is None:
            return
        _, dtype, shape, name = path.name.split(".", 3)
        dims = [] if shape == "scalar" else [int(d) for d in shape.split("x")]
        numel = 1
        for d in dims:
            numel *= d
        tensor = torch.from_file(str(path), shared=False, size=numel, dtype=getattr(torch, dtype)).view(dims)
        yield name, tensor
        del tensor
        path.unlink()
        index += 1


def _wait_for_file(directory: Path, index: int, timeout_s: float) -> Path | None:
    """The file of tensor `index`, None after the last one; TimeoutError when it does not come in time."""
    deadline = time.monotonic() + timeout_s
    prefix = f"{index:06d}."
    while True:
        ended = (directory / "end").exists()  # looked at first: the end file is written after the last tensor's
        found = [name for name in os.listdir(directory) if name.startswith(prefix)]
        if found:
            return directory / found[0]
        if ended:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"weight file {index} did not appear in {directory} within {timeout_s:g} s")
        time.sleep(0.001)
