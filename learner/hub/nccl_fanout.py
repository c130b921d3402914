"""Weight versions over NCCL (transport.weight_transfer nccl): GPU to GPU, the ZeroMQ side keeping control.

At start-up learner rank 0 and every engine worker of the `rollout.num_processes` rollouts form one
NCCL group (protocol.nccl_group): rank 0 makes the group's NCCL unique id and answers each rollout's
hello with a `WeightGroupInvite` carrying it (over ZeroMQ: the only rendezvous), and the rollout's
workers join at `RunConfig.nccl_first_rank(index)`. Each version then goes out as

1. its `WeightHeader` over ZeroMQ to every rollout (version, tensor layout, bucket sizes, the learner's
   fingerprint; no relay), which tells the rollout to receive it between two engine steps, then
2. each bucket broadcast from rank 0's GPU over NCCL, in index order, received by the workers straight
   into GPU memory and loaded there (rollout.worker_extension.apply_weights_nccl);

the acknowledgement and its fingerprint check are the ZeroMQ path's. Rank 0 sends one copy per version.

An NCCL group's members are fixed when it forms, and a broadcast waits for all of them. So the group is
the rollouts that said hello when it formed, each with its own index in 0..num_processes-1; a rollout
that leaves (dropped, dead, or saying hello again) stops the run, and one that connects later is turned
away. Restart the whole run (train.resume) to form a new group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Callable

import numpy as np

from protocol.messages import WeightGroupInvite, WeightUpdate
from protocol.nccl_group import broadcast_from_rank0

from learner.hub.weight_fanout import MembershipError, WeightFanout

log = logging.getLogger("learner.hub.nccl_fanout")

RESTART = "an NCCL group cannot change its members: restart the run (--train.resume) to form a new one"


class NcclWeightFanout(WeightFanout):
    """The learner's side of the NCCL weight group `group_id` (an NCCL unique id) of `world_size` members.
    `join()` joins it as rank 0 and returns the communicator (blocking until every member has joined);
    `first_rank(index)` is rollout `index`'s first rank in it; `device` is rank 0's CUDA device."""

    def __init__(self, send, *, group_id: bytes, world_size: int, first_rank: Callable[[int], int],
                 join: Callable[[], Any], device: Any, rollouts: int, timeout_s: float):
        super().__init__(0, send)
        self.group_id, self.world_size, self.first_rank = group_id, world_size, first_rank
        self.join = join
        self.device = device
        self.rollouts = rollouts  # rollout.num_processes: the group's rollouts have indexes 0..rollouts-1
        self.timeout_s = timeout_s  # per bucket broadcast (transport.weight_ack_timeout_s)
        self.group: Any = None
        self.indexes: dict[bytes, int] = {}  # rollouts that said hello -> their index
        self.members: frozenset[bytes] = frozenset()  # fixed once the group has formed

    async def form(self, timeout_s: float) -> None:
        """Join the group as rank 0; returns once every member has joined (TimeoutError after `timeout_s`)."""
        self.group = await in_daemon_thread(self.join, timeout_s, "the NCCL weight group did not form (a rollout "
                                                                  "never joined: see its log)")

    def freeze(self, identities: list[bytes]) -> None:
        """The group has formed with the rollouts `identities` (every one that said hello)."""
        self.members = frozenset(identities)
        log.info("NCCL weight group formed: learner rank 0 and %d rollout(s)", len(self.members))

    def check_hello(self, identity: bytes, engine_info: dict) -> None:
        if self.members:
            if identity in self.members:
                raise MembershipError(f"said hello again (restarted or rejoined) and so left the NCCL weight "
                                      f"group; {RESTART}", fatal=True)
            raise MembershipError(f"connected after the NCCL weight group formed; {RESTART}", fatal=False)
        index = engine_info.get("index")
        if not isinstance(index, int) or not 0 <= index < self.rollouts:
            raise MembershipError(f"has rollout index {index!r}; the NCCL weight group takes indexes 0.."
                                  f"{self.rollouts - 1} (rollout.num_processes {self.rollouts})", fatal=True)
        if index in [i for other, i in self.indexes.items() if other != identity]:
            raise MembershipError(f"has rollout index {index}, as another connected rollout does: their NCCL "
                                  f"ranks would collide", fatal=True)
        self.indexes[identity] = index

    async def welcome(self, identity: bytes) -> None:
        """Invite a rollout that said hello into the group, at the ranks its index gives it."""
        await self.send(identity, WeightGroupInvite(unique_id=np.frombuffer(self.group_id, dtype=np.uint8),
                                                    first_rank=self.first_rank(self.indexes[identity]),
                                                    world_size=self.world_size))

    def check_departure(self) -> None:
        if self.members:
            raise MembershipError(f"transport.weight_transfer nccl: {RESTART}", fatal=True)

    async def publish(self, update: WeightUpdate, identities: list[bytes]) -> None:
        """The header over ZeroMQ to every rollout, then the buckets over NCCL (off the event loop, which
        keeps taking in acknowledgements and batches)."""
        header = update.header()
        for identity in identities:
            await self.send(identity, header)
        await asyncio.to_thread(self.broadcast, update)
        self.bytes_sent += update.total_bytes

    def broadcast(self, update: WeightUpdate) -> None:
        """Each bucket of `update`, copied to rank 0's GPU, broadcast to every worker; one bucket on the GPU
        at a time."""
        import torch

        for index, bucket in enumerate(update.buckets):
            on_device = torch.frombuffer(bucket, dtype=torch.uint8).to(self.device)
            broadcast_from_rank0(self.group, on_device, self.timeout_s,
                                 f"bucket {index} of weight version {update.version}")
            del on_device


async def in_daemon_thread(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`fn()` run on a daemon thread: a call that never returns (an NCCL rendezvous missing a member)
    raises TimeoutError naming `what` after `timeout_s` here, and cannot keep the process from exiting."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if result.done():  # given up on already
            return
        if error is None:
            result.set_result(value)
        else:
            result.set_exception(error)

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process stopped waiting and is ending
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="nccl-join", daemon=True).start()
    try:
        return await asyncio.wait_for(result, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"{what} within {timeout_s:g} s") from None
