"""Building the run's hub (learner.hub.interface.Hub): a follower on ranks > 0, a replay of a
recording (replay.path), or the live RolloutHub on its ZeroMQ endpoint, recorded with output.record."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path
from typing import AsyncIterator

from protocol.codec import DecodeLimits
from protocol.config import RunConfig
from protocol.keys import server_keys_from_dir
from protocol.nccl_group import join_weight_group, new_group_id
from protocol.network_policy import check_transport_security
from protocol.transport import LearnerEndpoint

from learner.hub.follower_hub import FollowerHub
from learner.hub.nccl_fanout import NcclWeightFanout
from learner.hub.rollout_hub import RolloutHub
from learner.hub.interface import Hub
from learner.recording.store import RecordingWriter
from learner.recording.recording_hub import RecordedEndpoint, RecordingHub, Reusable
from learner.recording.replay import ReplayHub

log = logging.getLogger("learner.hub.factory")

# How long a closing endpoint keeps trying to deliver what it still holds (a Shutdown just sent).
SHUTDOWN_FLUSH_S = 5.0


@contextlib.asynccontextmanager
async def open_hub(cfg: RunConfig, *, rank0: bool, run_dir: Path, vocab_size: int,
                   recorder: RecordingWriter | None = None, reusable: Reusable | None = None) -> AsyncIterator[Hub]:
    """The hub of this rank. `recorder` (rank 0, live runs): where the run is recorded; `reusable`:
    recorded batches of a crashed run that answer grants again (learner.recording.recording_hub)."""
    if not rank0:
        yield FollowerHub()
    elif cfg.replay.path:
        yield ReplayHub(cfg.replay.path, verify=cfg.replay.verify, dump_step=cfg.replay.stop_after_step,
                        dump_dir=run_dir)
    else:
        async with rollout_hub(cfg, vocab_size=vocab_size, recorder=recorder, reusable=reusable or {}) as hub:
            yield hub


@contextlib.asynccontextmanager
async def rollout_hub(cfg: RunConfig, *, vocab_size: int, recorder: RecordingWriter | None,
                      reusable: Reusable) -> AsyncIterator[Hub]:
    """The live hub on a LearnerEndpoint (transport.*: address, limits, CURVE), serving, once
    transport.min_rollouts rollouts have said hello."""
    t = cfg.transport
    check_transport_security(cfg)
    limits = DecodeLimits(max_frame_bytes=t.max_message_mb << 20, vocab_size=vocab_size)
    curve = server_keys_from_dir(t.curve_dir) if t.curve_dir else None
    with LearnerEndpoint(cfg.run_id, host=t.bind_host, port=t.port, limits=limits, curve=curve,
                         rcvhwm=t.receive_queue) as endpoint:
        log.info("learner listening on %s", endpoint.address)
        wire = endpoint if recorder is None else RecordedEndpoint(endpoint, recorder)
        rollouts = RolloutHub(wire, ack_timeout_s=t.weight_ack_timeout_s, peer_timeout_s=t.peer_timeout_s,
                              progress_timeout_s=t.progress_timeout_s, straggler_timeout_s=t.straggler_timeout_s,
                              min_live_rollouts=t.min_live_rollouts, weight_relay_fanout=t.weight_relay_fanout,
                              fanout=nccl_fanout(cfg) if t.weight_transfer == "nccl" else None)
        tasks = [asyncio.create_task(rollouts.serve()), asyncio.create_task(rollouts.heartbeats(t.heartbeat_s))]
        try:
            await connect_rollouts(cfg, rollouts)
            yield rollouts if recorder is None else RecordingHub(rollouts, wire, reusable)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # linger so that a Shutdown just sent reaches the rollouts (over CURVE on a slow link it
            # may still be queued); otherwise they would wait transport.peer_timeout_s to give up
            endpoint.close(linger_s=SHUTDOWN_FLUSH_S)


async def connect_rollouts(cfg: RunConfig, rollouts: RolloutHub) -> None:
    """Wait for the rollouts the run starts with: transport.min_rollouts of them, or with weight_transfer
    nccl every one of the rollout.num_processes, in the NCCL weight group (which they join after their hello)."""
    t = cfg.transport
    if t.weight_transfer != "nccl":
        await rollouts.wait_for_rollouts(t.min_rollouts, t.batch_timeout_s)
        return
    # Every rollout is invited on its hello; rank 0 joins once all are in (the others wait for it inside
    # NCCL), so the event loop answers every hello before the join may hold this thread up.
    await rollouts.wait_for_rollouts(cfg.rollout.num_processes, t.batch_timeout_s)
    await rollouts.fanout.form(t.batch_timeout_s)
    rollouts.fanout.freeze(list(rollouts.peers))


def nccl_fanout(cfg: RunConfig):
    """Builds the NCCL weight sender of learner rank 0 (learner.hub.nccl_fanout), on this rank's CUDA device."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    group_id, world_size = new_group_id(), cfg.nccl_world_size()
    join = functools.partial(join_weight_group, group_id, 0, world_size, device)
    return functools.partial(NcclWeightFanout, group_id=group_id, world_size=world_size,
                             first_rank=cfg.nccl_first_rank, join=join, device=device,
                             rollouts=cfg.rollout.num_processes, timeout_s=cfg.transport.weight_ack_timeout_s)
