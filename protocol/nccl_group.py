"""The NCCL weight group (transport.weight_transfer nccl): learner rank 0 and every rollout engine worker.

Every member joins once at start-up (rank 0 the learner, then each rollout's workers at
`RunConfig.nccl_first_rank`); afterwards the group only ever broadcasts from rank 0: the buckets of
each weight version, in order, whose layout every member already has from the version's
`WeightHeader`, sent over ZeroMQ. The rendezvous and the communicator are vLLM's
(`StatelessProcessGroup` + `PyNcclCommunicator`, what TRL and OpenRLHF use to reach vLLM workers),
imported only when a group is joined: this package never imports torch or vLLM itself, and a CPU run
never loads CUDA or NCCL.

NCCL cannot time out on its own: a broadcast whose peer is gone waits forever. Each broadcast is
therefore polled against a deadline (TimeoutError); after that the group is unusable and the run stops.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["join_weight_group", "broadcast_from_rank0"]

POLL_S = 0.001  # how often a broadcast in flight is checked for completion


def join_weight_group(host: str, port: int, rank: int, world_size: int, device: Any) -> Any:
    """Join the group as `rank` of `world_size` (rank 0 opens the rendezvous on `host`:`port`, the others
    connect to it) and return the communicator bound to CUDA `device`. Blocks until every member has joined."""
    from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

    return stateless_init_process_group(host, port, rank, world_size, device)


def broadcast_from_rank0(group: Any, tensor: Any, timeout_s: float, what: str) -> None:
    """Broadcast `tensor` from rank 0 into every member's `tensor` (in place) and wait until it has
    arrived here; TimeoutError naming `what` when it has not within `timeout_s`."""
    torch = sys.modules["torch"]
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

