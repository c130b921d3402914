"""Recording a live run as a wrapper around its RolloutHub (learner.recording.recording_hub), over real ZeroMQ:
every accepted message is recorded, each step names the records it consumed and their seeds, and a
resumed run answers grants from the interrupted run's recording."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from learner.hub.follower_hub import FollowerHub
from learner.hub.rollout_hub import RolloutHub
from learner.hub.interface import Hub
from learner.recording.store import RecordingReader, RecordingWriter
from learner.recording.recording_hub import RecordedEndpoint, RecordingHub, reusable_batches
from learner.recording.replay import ReplayHub
from protocol import SCHEMA_VERSION, decode, encode
from protocol.messages import Heartbeat, WorkGrant
from protocol.transport import LearnerEndpoint
from tests.unit.batches import answer, training_batches
from tests.unit.test_hub import RUN, TIMEOUT, ScriptedPeer, eventually, make_grant, make_update

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def recording_hub(writer: RecordingWriter, reusable=None):
    """A serving RecordingHub around a RolloutHub, and a connected rollout that has acked version 0."""
    with LearnerEndpoint(RUN) as endpoint:
        wire = RecordedEndpoint(endpoint, writer)
        rollouts = RolloutHub(wire, ack_timeout_s=60.0)
        hub = RecordingHub(rollouts, wire, reusable or {})
        server = asyncio.create_task(rollouts.serve())
        peer = ScriptedPeer(endpoint.address, "r0")
        try:
            await peer.hello()
            await eventually(lambda: b"r0" in rollouts.peers)
            await hub.publish(make_update(0))
            await peer.receive_and_ack()
            await eventually(lambda: rollouts.applied_versions() == {"r0": [0]})
            yield hub, peer
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            peer.close()


def new_recording(path) -> RecordingWriter:
    return RecordingWriter(path, run_config={"run_id": RUN}, protocol_version=SCHEMA_VERSION)


async def test_every_accepted_message_is_recorded_and_each_step_names_what_it_consumed(tmp_path):
    grants = [make_grant(0, step=0), make_grant(1, step=0)]
    with new_recording(tmp_path / "rec") as writer:
        async with recording_hub(writer) as (hub, peer):
            hub.offer(grants)
            collecting = asyncio.create_task(training_batches(hub, 0, 2, TIMEOUT))  # the hub hands out work meanwhile
            received = [await peer.recv_kind(WorkGrant) for _ in grants]
            await peer.send(Heartbeat(state="generating"))
            for grant in reversed(received):  # answered out of grant order
                await peer.send(answer(grant, 0))
            batches = await asyncio.wait_for(collecting, TIMEOUT)
            hub.end_step(0, {"w": "abc"}, {"policy_loss": 0.5})
    records = list(RecordingReader(tmp_path / "rec"))
    kinds = [decode(r.frames).kind if r.kind == "message" else "step" for r in records]
    assert kinds == ["hello", "weight_ack", "heartbeat", "packed_batch", "packed_batch", "step"]
    step = records[-1]
    assert step.step == 0 and step.info["consumed"] == [4, 3]  # in grant order: grant 1 was answered first
    assert [decode(records[n].frames).body for n in step.info["consumed"]] == batches
    assert step.info["seeds"] == {"sampling": [grants[0].request_seed(0), grants[1].request_seed(0)]}
    assert step.info["weight_version"] == 1 and step.info["fingerprint"] == {"w": "abc"}
    assert step.info["metrics"] == {"policy_loss": 0.5}


async def test_a_resumed_run_answers_grants_from_the_interrupted_runs_recording(tmp_path):
    crashed_grant = make_grant(7, step=1)  # the crashed run's grant for step 1's prompts
    with new_recording(tmp_path / "rec") as writer:
        writer.append_message(b"r0", encode(answer(crashed_grant, 0), run_id=RUN, producer_id="r0", seq=5,
                                            weight_version=0))
    reusable = reusable_batches(tmp_path / "rec", after_step=0)
    assert list(reusable) == [(1, (700, 701))]

    same_prompts, new_prompts = make_grant(3, step=1, prompt_ids=(700, 701)), make_grant(4, step=1)
    with RecordingWriter.open_existing(tmp_path / "rec") as writer:
        async with recording_hub(writer, reusable) as (hub, peer):
            hub.offer([same_prompts, new_prompts])
            collecting = asyncio.create_task(training_batches(hub, 1, 2, TIMEOUT))
            live = await peer.recv_kind(WorkGrant)
            assert live.grant_id == 4
            await peer.expect_nothing()  # the other one is answered from the recording
            await peer.send(answer(live, 0))
            batches = await asyncio.wait_for(collecting, TIMEOUT)
            hub.end_step(1, {}, {})
            assert hub.stats()["reused_recorded_batches"] == 1
    reused = answer(crashed_grant, 0)
    assert [b.grant_id for b in batches] == [3, 4] and batches[0].tokens.tolist() == reused.tokens.tolist()
    step = list(RecordingReader(tmp_path / "rec").steps())[-1]
    assert step.info["consumed"][0] == 0  # the crashed run's record
    assert step.info["seeds"]["sampling"] == [same_prompts.request_seed(0, 7), new_prompts.request_seed(0)]


@pytest.mark.parametrize("hub_class", [RolloutHub, RecordingHub, ReplayHub, FollowerHub])
def test_every_hub_has_the_whole_interface(hub_class):
    members = [name for name in vars(Hub) if not name.startswith("_")]
    assert len(members) == 7
    assert all(callable(getattr(hub_class, name, None)) for name in members), hub_class
