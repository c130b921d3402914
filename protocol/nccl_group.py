"""The NCCL weight group (transport.weight_transfer nccl): learner rank 0 and every rollout engine worker.

Learner rank 0 makes the group's NCCL unique id (`new_group_id`) and hands it to each rollout in a
`WeightGroupInvite`, over the rollouts' ZeroMQ channel (CURVE-authenticated where it must be); each
member then joins with it (`join_weight_group`: rank 0 the learner, then each rollout's workers from
the invite's first rank). That id is the whole rendezvous: no side store, nothing unpickled.

The communicator is NCCL itself, reached through ctypes (`ncclGetUniqueId`, `ncclCommInitRank`,
`ncclBroadcast`), as vLLM's own `pynccl_wrapper` does: the NCCL library that torch's CUDA build loads
(or `STREAMRLHF_NCCL_LIBRARY`). Not `torch.cuda.nccl`: its `init_rank` fails on Python 3.12
("PY_SSIZE_T_CLEAN macro must be defined", seen with torch 2.11 on an H200). Afterwards the group
only ever broadcasts from rank 0: the buckets of each weight version, in order, whose layout every
member already has from the version's `WeightHeader`.

This package never imports torch at module level: torch and NCCL are loaded only when a group is
made or joined, so a CPU run never loads CUDA or NCCL.

NCCL cannot time out on its own: a broadcast whose peer is gone waits forever. Each broadcast is
therefore polled against a deadline (TimeoutError); after that the group is unusable and the run stops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from typing import Any

from .messages import NCCL_UNIQUE_ID_BYTES as UNIQUE_ID_BYTES  # sizeof(ncclUniqueId)

__all__ = ["WeightGroup", "new_group_id", "join_weight_group", "broadcast_from_rank0"]

POLL_S = 0.001  # how often a broadcast in flight is checked for completion
NCCL_UINT8 = 1  # ncclDataType_t ncclUint8


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


@functools.cache
def _nccl() -> ctypes.CDLL:
    """The NCCL library, with the signatures used here; torch is imported first so that its CUDA build's
    own libnccl is the one already loaded (dlopen by soname then returns it)."""
    import torch  # noqa: F401 - loads CUDA and, in CUDA builds, libnccl

    path = os.environ.get("STREAMRLHF_NCCL_LIBRARY") or "libnccl.so.2"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        try:
            import nvidia.nccl  # the pip package torch's CUDA wheels depend on

            lib = ctypes.CDLL(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))
        except (ImportError, OSError) as exc:
            raise RuntimeError(f"transport.weight_transfer nccl: cannot load the NCCL library ({path}: {exc}); "
                               f"set STREAMRLHF_NCCL_LIBRARY to its path") from None
    lib.ncclGetErrorString.restype = ctypes.c_char_p
    lib.ncclGetErrorString.argtypes = [ctypes.c_int]
    lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
    lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]
    lib.ncclBroadcast.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p]
    lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
    return lib


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed: NCCL error {result} ({_nccl().ncclGetErrorString(result).decode()})")


def new_group_id() -> bytes:
    """A fresh NCCL unique id (`UNIQUE_ID_BYTES` bytes) for a new group; made by rank 0, whose process then
    runs the group's bootstrap."""
    unique_id = _UniqueId()
    _check(_nccl().ncclGetUniqueId(ctypes.byref(unique_id)), "ncclGetUniqueId")
    return ctypes.string_at(ctypes.addressof(unique_id), UNIQUE_ID_BYTES)


class WeightGroup:
    """One member's NCCL communicator (rank `rank` of `world_size`), bound to CUDA `device`."""

    def __init__(self, communicator: ctypes.c_void_p, rank: int, world_size: int, device: Any):
        self.communicator, self.rank, self.world_size, self.device = communicator, rank, world_size, device

    def broadcast(self, tensor: Any, src: int = 0, stream: Any = None) -> None:
        """Enqueue the broadcast of the contiguous CUDA `tensor` (its bytes) from rank `src` into every member's
        `tensor`, in place, on `stream` (the current one by default); it runs asynchronously to the caller."""
        import torch

        stream = stream or torch.cuda.current_stream(tensor.device)
        pointer = ctypes.c_void_p(tensor.data_ptr())
        _check(_nccl().ncclBroadcast(pointer, pointer, tensor.numel() * tensor.element_size(), NCCL_UINT8, src,
                                     self.communicator, ctypes.c_void_p(stream.cuda_stream)), "ncclBroadcast")

    def __del__(self) -> None:
        if self.communicator:
            _nccl().ncclCommDestroy(self.communicator)


def join_weight_group(group_id: bytes, rank: int, world_size: int, device: Any) -> WeightGroup:
    """Join the group `group_id` as `rank` of `world_size` on CUDA `device`. Blocks until every member has
    joined (NCCL's own bootstrap, run by the process that made the id)."""
    import torch

    if len(group_id) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(group_id)}")
    unique_id = _UniqueId()
    ctypes.memmove(ctypes.addressof(unique_id), bytes(group_id), UNIQUE_ID_BYTES)
    communicator = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(_nccl().ncclCommInitRank(ctypes.byref(communicator), world_size, unique_id, rank),
               f"ncclCommInitRank (rank {rank} of {world_size})")
    return WeightGroup(communicator, rank, world_size, device)


def broadcast_from_rank0(group: Any, tensor: Any, timeout_s: float, what: str) -> None:
    """Broadcast `tensor` from rank 0 into every member's `tensor` (in place) and wait until it has
    arrived here; TimeoutError naming `what` when it has not within `timeout_s`."""
    import torch

    if tensor.device.type != "cuda":  # a stand-in communicator (the unit tests) is synchronous
        group.broadcast(tensor, src=0)
        return
    stream = torch.cuda.current_stream(tensor.device)
    group.broadcast(tensor, src=0, stream=stream)
    done = torch.cuda.Event()
    done.record(stream)
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the NCCL broadcast did not complete within {timeout_s:g} s "
                               f"(transport.weight_ack_timeout_s): a member of the weight group is gone or stuck, "
                               f"and an NCCL group cannot recover from that")
        time.sleep(POLL_S)
