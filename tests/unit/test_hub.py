"""RolloutHub over REAL ZeroMQ sockets on 127.0.0.1, driven by scripted rollout peers.

A scripted peer is a RolloutClient that speaks the real protocol (Hello, WeightAck, PackedBatch,
RolloutError) with behaviour chosen by each test: a test double for the vLLM rollout process,
which is fine in a unit test of the hub's own logic.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from learner.hub.rollout_hub import MAX_GRANTS_PER_PEER, RolloutFailure, RolloutHub
from protocol.messages import (Heartbeat, Hello, PromptSpec, RolloutError, SamplingSpec, Shutdown,
                               WeightAck, WeightUpdate, WorkGrant, pack_weight_buckets)
from protocol.transport import LearnerEndpoint, PeerUnreachableError, RolloutClient
from protocol.weights import weight_fingerprint
from tests.unit.batches import answer, training_batches

pytestmark = pytest.mark.timeout(30)

RUN = "hub-test"
TIMEOUT = 5.0
SAMPLING = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4, stop_token_ids=[2], seed=0)


def make_update(version: int) -> WeightUpdate:
    rng = np.random.default_rng(version)
    arrays = [("embed.weight", "float32", (4, 3), rng.standard_normal((4, 3)).astype(np.float32)),
              ("layer.bias", "float32", (5,), rng.standard_normal(5).astype(np.float32)),
              ("head.weight", "int32", (2, 2), np.arange(4, dtype=np.int32) + version)]
    metas, buckets = pack_weight_buckets(arrays, bucket_bytes=64)
    upd = WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint={})
    fp = weight_fingerprint({m.name: upd.tensor_bytes(m) for m in metas})
    return WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint=fp)


def make_grant(grant_id: int, step: int = 0, *, min_version: int = 0, n: int = 2,
               prompt_ids: tuple[int, ...] | None = None, evaluation: bool = False) -> WorkGrant:
    ids = prompt_ids if prompt_ids is not None else (100 * grant_id, 100 * grant_id + 1)
    prompts = [PromptSpec(prompt_id=pid, token_ids=np.array([1, 3 + pid % 50, 4 + k], np.int32), label=str(pid))
               for k, pid in enumerate(ids)]
    return WorkGrant(grant_id=grant_id, step=step, min_weight_version=min_version, n_samples=n,
                     sampling=SAMPLING, prompts=prompts, evaluation=evaluation)


class ScriptedPeer:
    """A rollout process reduced to its protocol: connect, say hello, receive, acknowledge, answer."""

    def __init__(self, address: str, producer_id: str):
        self.producer_id = producer_id
        self.client = RolloutClient(address, RUN, producer_id)
        self.version = -1

    async def send(self, msg) -> None:
        await self.client.send(msg, weight_version=self.version)

    async def hello(self) -> None:
        await self.send(Hello(engine_info={"engine": "scripted", "tp": 1}))

    async def recv(self, timeout: float = TIMEOUT):
        env = await self.client.recv(timeout=timeout)
        assert env.producer_id == "learner" and env.run_id == RUN
        return env.body

    async def recv_kind(self, cls, timeout: float = TIMEOUT):
        msg = await self.recv(timeout)
        assert isinstance(msg, cls), f"{self.producer_id} expected {cls.__name__}, got {type(msg).__name__}"
        return msg

    async def expect_nothing(self, timeout: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            msg = await self.recv(timeout)
            pytest.fail(f"{self.producer_id} unexpectedly received {type(msg).__name__}")

    async def ack(self, update: WeightUpdate, fingerprint: dict | None = None) -> None:
        await self.send(WeightAck(version=update.version,
                                  fingerprint=update.fingerprint if fingerprint is None else fingerprint,
                                  apply_seconds=0.01))
        self.version = update.version

    async def receive_and_ack(self) -> WeightUpdate:
        update = await self.recv_kind(WeightUpdate)
        await self.ack(update)
        return update

    def close(self) -> None:
        self.client.close()


@pytest.fixture
async def env():
    """(endpoint, hub, peers factory); serve() runs as a task; everything closed at the end."""
    endpoint = LearnerEndpoint(RUN)
    hub = RolloutHub(endpoint, ack_timeout_s=60.0)
    server = asyncio.create_task(hub.serve())
    peers: list[ScriptedPeer] = []

    async def connect(producer_id: str, *, hello: bool = True) -> ScriptedPeer:
        peer = ScriptedPeer(endpoint.address, producer_id)
        peers.append(peer)
        if hello:
            await peer.hello()
            await eventually(lambda: peer.producer_id.encode() in hub.peers)
        return peer

    try:
        yield endpoint, hub, connect
        assert not server.done(), f"serve() stopped: {server.exception()!r}"
    finally:
        server.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await server
        finally:
            for peer in peers:
                peer.close()
            endpoint.close()
    assert endpoint.closed and all(p.client.closed for p in peers)


async def eventually(predicate, timeout: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def start_collect(hub: RolloutHub, step: int, expected: int, timeout_s: float = TIMEOUT) -> asyncio.Task:
    return asyncio.create_task(training_batches(hub, step, expected, timeout_s=timeout_s))


async def expect_failure(task: asyncio.Task, *needles: str) -> RolloutFailure:
    with pytest.raises(RolloutFailure) as exc:
        await asyncio.wait_for(task, TIMEOUT + 2)
    for needle in needles:
        assert needle in str(exc.value), f"{needle!r} not in {exc.value}"
    return exc.value


# --------------------------------------------------------------------------- hello and weights


async def test_hello_before_any_publish_gets_no_weights_then_gets_published_ones(env):
    endpoint, hub, connect = env
    peer = await connect("r0")
    await peer.expect_nothing()
    update = make_update(0)
    await hub.publish(update)
    got = await peer.recv_kind(WeightUpdate)
    assert got == update
    assert hub.peers[b"r0"].producer_id == "r0"


async def test_wait_for_rollouts_returns_once_enough_said_hello_and_times_out_otherwise(env):
    endpoint, hub, connect = env
    waiting = asyncio.create_task(hub.wait_for_rollouts(2, timeout_s=TIMEOUT))
    await connect("r0")
    await asyncio.sleep(0.2)
    assert not waiting.done(), "one of two rollouts is not enough"
    await connect("r1")
    await asyncio.wait_for(waiting, TIMEOUT)
    with pytest.raises(TimeoutError, match="2 of 3 rollouts connected within 0 s"):
        await hub.wait_for_rollouts(3, timeout_s=0.3)


async def test_hello_receives_latest_published_update(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    latest = make_update(1)
    await hub.publish(latest)
    peer = await connect("late")
    got = await peer.recv_kind(WeightUpdate)
    assert got.version == 1 and got.fingerprint == latest.fingerprint
    assert [bytes(b) for b in got.buckets] == [bytes(b) for b in latest.buckets]
    # the receiver can check the fingerprint itself
    assert weight_fingerprint({m.name: got.tensor_bytes(m) for m in got.tensors}) == latest.fingerprint
    await peer.expect_nothing()  # only the latest version, once


async def test_applied_versions_reports_acked_versions(env):
    endpoint, hub, connect = env
    a, b = await connect("a"), await connect("b")
    for version in (0, 1):
        await hub.publish(make_update(version))
        await a.receive_and_ack()
        if version == 1:
            await b.receive_and_ack()
        else:
            await b.recv_kind(WeightUpdate)  # received, never acknowledged
    await eventually(lambda: hub.applied_versions() == {"a": [0, 1], "b": [1]})
    assert hub.peers[b"a"].applied_version == 1 and hub.peers[b"b"].applied_version == 1
    stats = hub.stats()
    assert stats["rollouts"] == 2 and stats["discarded_batches"] == 0
    assert set(hub.published[1].ack_latency) == {"a", "b"}


async def test_ack_of_unpublished_version_is_discarded(env):
    endpoint, hub, connect = env
    peer = await connect("r0")
    await peer.send(WeightAck(version=7, fingerprint={}, apply_seconds=0.0))
    await eventually(lambda: hub.discarded["unknown_version"] == 1)
    assert hub.applied_versions() == {"r0": []} and hub.failure is None


async def test_message_before_hello_is_discarded(env):
    endpoint, hub, connect = env
    stranger = await connect("stranger", hello=False)
    await stranger.send(Heartbeat(state="idle"))
    await eventually(lambda: hub.discarded["unknown_peer"] == 1)
    assert hub.peers == {}


# --------------------------------------------------------------------------- work hand-out and collection


async def test_at_most_two_grants_per_peer_and_batches_sorted(env):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    peer = await connect("r0")
    await peer.receive_and_ack()
    grants = [make_grant(i) for i in range(5)]
    hub.offer(grants)
    collecting = start_collect(hub, 0, len(grants))

    held = [await peer.recv_kind(WorkGrant) for _ in range(MAX_GRANTS_PER_PEER)]
    assert [g.grant_id for g in held] == [0, 1] and held == grants[:2]
    await peer.expect_nothing()  # the third waits until a slot frees up
    assert len(hub.peers[b"r0"].grants) == MAX_GRANTS_PER_PEER and len(hub.pending) == 3

    answered = []
    while len(answered) < len(grants):
        # answer the newest held grant first, so batches arrive out of grant order
        grant = held.pop()
        await peer.send(answer(grant, update.version))
        answered.append(grant.grant_id)
        if len(answered) + len(held) < len(grants):
            held.append(await peer.recv_kind(WorkGrant))
        assert len(held) <= MAX_GRANTS_PER_PEER
        await eventually(lambda: len(hub.peers[b"r0"].grants) <= MAX_GRANTS_PER_PEER)
    assert answered != sorted(answered)

    batches = await asyncio.wait_for(collecting, TIMEOUT)
    assert [b.grant_id for b in batches] == [0, 1, 2, 3, 4]
    for batch, grant in zip(batches, grants):
        assert batch == answer(grant, update.version)
    assert hub.peers[b"r0"].grants == {} and not hub.pending and hub.failure is None
    assert 0 not in hub.batches


async def test_two_peers_share_grants_and_results_come_back_in_grant_order(env):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    a, b = await connect("a"), await connect("b")
    await a.receive_and_ack()
    await b.receive_and_ack()
    grants = [make_grant(i, step=3) for i in range(4)]
    hub.offer(grants + [make_grant(9, step=4)])  # a grant of the next step waits in the queue
    collecting = start_collect(hub, 3, 4)
    got_a = [await a.recv_kind(WorkGrant) for _ in range(2)]
    got_b = [await b.recv_kind(WorkGrant) for _ in range(2)]
    assert sorted(g.grant_id for g in got_a + got_b) == [0, 1, 2, 3]
    assert len(hub.pending) == 1
    for peer, held in ((b, got_b[::-1]), (a, got_a[::-1])):
        for grant in held:
            await peer.send(answer(grant, 0))
    batches = await asyncio.wait_for(collecting, TIMEOUT)
    assert [x.grant_id for x in batches] == [0, 1, 2, 3] and all(x.step == 3 for x in batches)
    # the freed slots took the next step's grant
    nxt = await (a if hub.peers[b"a"].grants else b).recv_kind(WorkGrant)
    assert nxt.grant_id == 9


async def test_batch_for_unknown_grant_is_discarded_and_counted(env):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    a, b = await connect("a"), await connect("b")
    await a.receive_and_ack()
    await b.receive_and_ack()
    grant = make_grant(0)
    hub.offer([grant])
    collecting = start_collect(hub, 0, 1)
    held = await a.recv_kind(WorkGrant)  # a connected first: it gets the only grant
    await b.expect_nothing(0.1)
    await b.send(answer(held, 0))  # b answers a grant it does not hold
    await a.send(answer(make_grant(42), 0))  # nobody holds grant 42
    await eventually(lambda: hub.discarded["unknown_grant"] == 2)
    assert not collecting.done() and hub.failure is None
    await a.send(answer(held, 0))
    await a.send(answer(held, 0))  # a duplicate answer: the grant is no longer held
    assert [x.grant_id for x in await asyncio.wait_for(collecting, TIMEOUT)] == [0]
    await eventually(lambda: hub.discarded["unknown_grant"] == 3)
    assert hub.stats()["discarded_batches"] == 3


# --------------------------------------------------------------------------- failures


async def test_weight_ack_with_wrong_fingerprint_fails_collect(env):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    good, bad = await connect("good-0"), await connect("bad-1")
    await good.receive_and_ack()
    # two peers' messages are not ordered with respect to each other: wait until the good ack is in
    await eventually(lambda: hub.applied_versions()["good-0"] == [0])
    got = await bad.recv_kind(WeightUpdate)
    wrong = dict(got.fingerprint)
    wrong[next(iter(wrong))] = "0" * 32
    hub.offer([make_grant(0), make_grant(1), make_grant(2)])
    collecting = start_collect(hub, 0, 3)
    await bad.ack(got, fingerprint=wrong)
    await expect_failure(collecting, "bad-1", "version 0")
    assert hub.applied_versions() == {"good-0": [0], "bad-1": []}


@pytest.mark.parametrize("case", ["never_acked", "below_min_version", "finished_on_unacked"])
async def test_batch_with_unacceptable_weight_version_fails_collect(env, case):
    endpoint, hub, connect = env
    v0, v1 = make_update(0), make_update(1)
    await hub.publish(v0)
    await hub.publish(v1)
    peer = await connect("r0")
    await peer.receive_and_ack()  # v1, the latest
    last = None
    if case == "never_acked":
        grant, version, needle = make_grant(0, min_version=0), 0, "never acknowledged"
    elif case == "below_min_version":
        grant, version, needle = make_grant(0, min_version=2), 1, "< required 2"
    else:  # started on the acknowledged v1, claims to have finished on v2 that it never acknowledged
        grant, version, last, needle = make_grant(0, min_version=1), 1, 2, "version(s) [2] the rollout never acknowledged"
    hub.offer([grant])
    collecting = start_collect(hub, 0, 1)
    held = await peer.recv_kind(WorkGrant)
    await peer.send(answer(held, version, last_version=last))
    await expect_failure(collecting, "r0", "grant 0", needle)
    assert hub.batches[0] == []


@pytest.mark.parametrize("defect", ["wrong_prompt_ids", "too_few_samples", "bad_sample_indices", "wrong_prompt",
                                    "evaluation_flag"])
async def test_batch_not_matching_its_grant_fails_collect(env, defect):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    peer = await connect("r0")
    await peer.receive_and_ack()
    grant = make_grant(0, n=2)
    hub.offer([grant])
    collecting = start_collect(hub, 0, 1)
    held = await peer.recv_kind(WorkGrant)
    if defect == "wrong_prompt_ids":
        batch = answer(held, 0, prompt_ids=[0, 0, 2, 1])
    elif defect == "too_few_samples":
        batch = answer(make_grant(0, n=1), 0)
    elif defect == "bad_sample_indices":
        batch = answer(held, 0, sample_indices=[0, 0, 0, 1])
    elif defect == "evaluation_flag":  # a training grant answered as an evaluation one
        batch = answer(held, 0, evaluation=True)
    else:
        batch = answer(held, 0, first_token=9)
    await peer.send(batch)
    await expect_failure(collecting, "r0", "grant 0")


async def test_fatal_rollout_error_reissues_the_work_to_another_rollout(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    peer = await connect("r7")
    await peer.receive_and_ack()
    hub.offer([make_grant(0)])
    collecting = start_collect(hub, 0, 1)
    await peer.recv_kind(WorkGrant)
    await peer.send(RolloutError(message="engine ran out of memory", fatal=False))
    await peer.send(Heartbeat(state="generating"))
    await peer.send(answer(make_grant(99), 0))  # a marker: processed after the two messages above
    await eventually(lambda: hub.discarded["unknown_grant"] == 1)
    assert hub.failure is None and not collecting.done()  # a non-fatal error is only logged
    await peer.send(RolloutError(message="engine died: CUDA error", fatal=True))
    await eventually(lambda: "r7" not in hub.applied_versions() and hub.dropped_peers == 1)
    assert hub.failure is None and not collecting.done()
    # the grant r7 never answered goes to the next rollout, and the step completes
    other = await connect("r8")
    await other.receive_and_ack()
    grant = await other.recv_kind(WorkGrant)
    assert grant.grant_id == 0
    await other.send(answer(grant, 0))
    batches = await asyncio.wait_for(collecting, TIMEOUT)
    assert [b.grant_id for b in batches] == [0]


async def test_silent_rollout_is_dropped_and_its_work_reissued(env):
    endpoint, hub, connect = env
    hub.peer_timeout_s = 0.3
    await hub.publish(make_update(0))
    silent = await connect("silent")
    await silent.receive_and_ack()
    hub.offer([make_grant(0)])
    collecting = start_collect(hub, 0, 1)
    await silent.recv_kind(WorkGrant)  # takes the work, then says nothing more
    await eventually(lambda: hub.dropped_peers == 1)
    worker = await connect("worker")
    await worker.receive_and_ack()
    grant = await worker.recv_kind(WorkGrant)
    await worker.send(answer(grant, 0))
    assert [b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)] == [0]


async def test_rollout_that_does_not_apply_weights_in_time_is_dropped_and_told_to_rejoin(env):
    endpoint, hub, connect = env
    hub.ack_timeout_s = 0.2
    worker, frozen = await connect("worker"), await connect("frozen")
    await hub.publish(make_update(0))
    await worker.receive_and_ack()
    await frozen.recv_kind(WeightUpdate)  # received, never applied (its engine hangs)
    hub.offer([make_grant(0), make_grant(1), make_grant(2)])
    collecting = start_collect(hub, 0, 3)
    for _ in range(3):  # the worker ends up with all three, the frozen one's after it was dropped
        await worker.send(answer(await worker.recv_kind(WorkGrant), 0))
    assert sorted(b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)) == [0, 1, 2]
    # the learner told the frozen one to rejoin; its heartbeats no longer count until it says hello
    while not isinstance(message := await frozen.recv(), Shutdown):
        assert isinstance(message, WorkGrant)
    assert message.rejoin and "did not apply weight version 0" in message.reason
    assert hub.dropped_peers == 1 and b"frozen" not in hub.peers
    await frozen.hello()
    assert (await frozen.recv_kind(WeightUpdate)).version == 0, "it catches up on the current weights"


async def test_rollout_holding_work_without_progress_is_dropped_despite_heartbeats(env):
    endpoint, hub, connect = env
    hub.progress_timeout_s = 0.4
    await hub.publish(make_update(0))
    stuck = await connect("stuck")
    await stuck.receive_and_ack()
    hub.offer([make_grant(0, min_version=0), make_grant(1, min_version=1)])
    collecting = start_collect(hub, 0, 1)
    assert {(await stuck.recv_kind(WorkGrant)).grant_id for _ in range(2)} == {0, 1}
    for _ in range(8):  # alive, but its engine makes no progress
        await stuck.send(Heartbeat(state="generating"))
        await asyncio.sleep(0.1)
    assert (await stuck.recv_kind(Shutdown)).rejoin
    worker = await connect("worker")
    await worker.receive_and_ack()
    grants = {(g := await worker.recv_kind(WorkGrant)).grant_id: g for _ in range(2)}
    assert set(grants) == {0, 1}, "both of the stuck rollout's grants are re-issued"
    await stuck.send(answer(grants[0], 0))  # too late: no longer a connected rollout
    await worker.send(answer(grants[0], 0))
    assert [b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)] == [0]
    assert hub.discarded["unknown_peer"] >= 1


async def test_rollout_waiting_for_weights_is_not_stuck(env):
    """Work it cannot start yet (its minimum weight version is not out) does not run the clock."""
    endpoint, hub, connect = env
    hub.progress_timeout_s = 0.2
    await hub.publish(make_update(0))
    waiting = await connect("waiting")
    await waiting.receive_and_ack()
    hub.offer([make_grant(0, min_version=1)])
    collecting = start_collect(hub, 0, 1)
    grant = await waiting.recv_kind(WorkGrant)
    await asyncio.sleep(0.6)
    assert b"waiting" in hub.peers
    await hub.publish(make_update(1))
    await waiting.receive_and_ack()
    await waiting.send(answer(grant, 1))
    assert [b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)] == [0]
    assert hub.dropped_peers == 0


async def test_straggler_grant_goes_to_an_idle_rollout_and_is_trained_once(env):
    endpoint, hub, connect = env
    hub.straggler_timeout_s = 0.2
    await hub.publish(make_update(0))
    slow = await connect("slow")
    await slow.receive_and_ack()
    hub.offer([make_grant(0)])
    collecting = start_collect(hub, 0, 1)
    held = await slow.recv_kind(WorkGrant)
    fast = await connect("fast")
    await fast.receive_and_ack()
    await fast.expect_nothing(0.1)  # not yet a straggler
    again = await fast.recv_kind(WorkGrant)
    assert again.grant_id == held.grant_id
    await fast.send(answer(again, 0))
    assert [b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)] == [0]
    await slow.send(answer(held, 0))  # the straggler's late answer
    await eventually(lambda: hub.discarded["duplicate_answer"] == 1)
    assert hub.stats()["duplicate_answers"] == 1 and not hub.batches[0]
    assert not hub.peers[b"slow"].grants, "the straggler is free for new work"


async def test_too_few_rollouts_for_longer_than_peer_timeout_stops_the_run(env):
    endpoint, hub, connect = env
    hub.min_live_rollouts, hub.peer_timeout_s = 2, 0.3
    await hub.publish(make_update(0))
    only = await connect("only")
    await only.receive_and_ack()
    hub.offer([make_grant(0)])
    await expect_failure(start_collect(hub, 0, 1), "rollout(s) connected for 0.3 s", "transport.min_live_rollouts 2")


async def test_collect_timeout_message_gives_counts(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    peer = await connect("r0")
    await peer.receive_and_ack()
    hub.offer([make_grant(i) for i in range(4)])
    collecting = start_collect(hub, 0, 4, timeout_s=1.0)
    first = await peer.recv_kind(WorkGrant)
    await peer.send(answer(first, 0))
    with pytest.raises(TimeoutError) as exc:
        await asyncio.wait_for(collecting, TIMEOUT)
    msg = str(exc.value)
    assert "step 0" in msg and "1/4 batches" in msg
    assert "1 rollout(s) connected" in msg and "1 grant(s) unassigned" in msg


async def test_collect_timeout_without_rollouts(env):
    endpoint, hub, connect = env
    hub.offer([make_grant(0), make_grant(1)])
    with pytest.raises(TimeoutError) as exc:
        await training_batches(hub, 0, 2, timeout_s=0.2)
    msg = str(exc.value)
    assert "0/2 batches" in msg and "0 rollout(s) connected" in msg and "2 grant(s) unassigned" in msg


async def test_reconnecting_peer_gets_its_grants_back(env):
    endpoint, hub, connect = env
    update = make_update(0)
    await hub.publish(update)
    peer = await connect("r0")
    await peer.receive_and_ack()
    hub.offer([make_grant(0), make_grant(1), make_grant(2)])
    collecting = start_collect(hub, 0, 3)
    first = [await peer.recv_kind(WorkGrant) for _ in range(2)]
    assert [g.grant_id for g in first] == [0, 1]
    await peer.hello()  # the process restarted: its grants go back to the front of the queue
    await peer.receive_and_ack()  # the latest weights are sent again on hello
    again = [await peer.recv_kind(WorkGrant) for _ in range(2)]
    assert [g.grant_id for g in again] == [0, 1]
    for grant in again:
        await peer.send(answer(grant, 0))
    last = await peer.recv_kind(WorkGrant)
    await peer.send(answer(last, 0))
    assert [b.grant_id for b in await asyncio.wait_for(collecting, TIMEOUT)] == [0, 1, 2]


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_rollouts_delivers_shutdown(env):
    endpoint, hub, connect = env
    a, b = await connect("a"), await connect("b")
    await hub.shutdown_rollouts("training finished")
    for peer in (a, b):
        msg = await peer.recv_kind(Shutdown)
        assert msg.reason == "training finished"
        await peer.expect_nothing(0.1)


# --------------------------------------------------------------------------- a rollout that went away


async def test_serve_survives_a_disconnected_peer():
    endpoint = LearnerEndpoint(RUN)
    hub = RolloutHub(endpoint, ack_timeout_s=60.0)
    server = asyncio.create_task(hub.serve())
    dead, alive = ScriptedPeer(endpoint.address, "dead"), ScriptedPeer(endpoint.address, "alive")
    try:
        update = make_update(0)
        await hub.publish(update)
        for peer in (dead, alive):
            await peer.hello()
            await eventually(lambda: peer.producer_id.encode() in hub.peers)
            await peer.receive_and_ack()
        await eventually(lambda: hub.applied_versions() == {"dead": [0], "alive": [0]})
        dead.close()  # the rollout process died
        # wait until the ROUTER has noticed (a send to the dead identity is then refused)
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:
            try:
                await endpoint.send(b"dead", Heartbeat(state="probe"), weight_version=0)
            except PeerUnreachableError:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        grant = make_grant(0)
        hub.offer([grant])
        await alive.send(Heartbeat(state="idle"))  # serve() handles it, then dispatches the grant
        received = await alive.recv_kind(WorkGrant)
        assert received.grant_id == grant.grant_id, "the grant must reach the rollout that is still alive"
        assert not server.done(), f"serve() stopped: {server.exception()!r}"
        assert "dead" not in hub.applied_versions()
    finally:
        server.cancel()
        with contextlib.suppress(BaseException):
            await server
        dead.close()
        alive.close()
        endpoint.close()


# --------------------------------------------------------------------------- evaluation grants


def evaluation_grant(grant_id: int, version: int = 0, prompts: int = 1) -> WorkGrant:
    ids = tuple(1000 * grant_id + k for k in range(prompts))
    return make_grant(grant_id, step=version, min_version=version, n=1, prompt_ids=ids, evaluation=True)


async def test_evaluation_grants_go_out_at_once_evenly_and_never_take_a_training_slot(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    a, b = await connect("a"), await connect("b")
    await a.receive_and_ack()
    await b.receive_and_ack()
    async with driver_waiting(hub):
        hub.offer([make_grant(i) for i in range(5)] + [evaluation_grant(10 + i, prompts=1 + i % 2) for i in range(5)])
        got = {peer: [await peer.recv_kind(WorkGrant) for _ in range(2 + 3 * (peer is a) + 2 * (peer is b))]
               for peer in (a, b)}
        await a.expect_nothing()
        await b.expect_nothing()
    for peer, grants in got.items():
        assert len([g for g in grants if not g.evaluation]) == MAX_GRANTS_PER_PEER  # the training slots, no more
    # the evaluation prompts (1, 2, 1, 2, 1) each to the rollout holding the fewest: 4 and 3
    assert sorted(sum(len(g.prompts) for g in grants if g.evaluation) for grants in got.values()) == [3, 4]
    assert [g.grant_id for g in hub.pending] == [4] and not hub.eval_pending


async def test_arrivals_hand_out_evaluation_batches_as_they_come(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    peer = await connect("r0")
    await peer.receive_and_ack()
    hub.offer([make_grant(0, step=0), evaluation_grant(5)])
    held = {g.grant_id: g for g in [await peer.recv_kind(WorkGrant) for _ in range(2)]}
    await peer.send(answer(held[5], 0))
    arrivals = hub.arrivals(0, 1, TIMEOUT)
    first = await asyncio.wait_for(anext(arrivals), TIMEOUT)
    assert first.evaluation and first.grant_id == 5  # before the step's own batch has come
    await peer.send(answer(held[0], 0))
    assert [b.grant_id async for b in arrivals] == [0]
    assert hub.eval_batches == [] and 0 not in hub.batches


async def test_evaluation_arrivals_yield_evaluation_batches_and_time_out(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    peer = await connect("r0")
    await peer.receive_and_ack()
    hub.offer([evaluation_grant(3)])
    await peer.send(answer(await peer.recv_kind(WorkGrant), 0))
    arrivals = hub.evaluation_arrivals(TIMEOUT)
    assert (await asyncio.wait_for(anext(arrivals), TIMEOUT)).grant_id == 3
    hub.offer([evaluation_grant(4)])
    waiting = asyncio.create_task(anext(hub.evaluation_arrivals(0.5)))  # (it hands the grant out)
    await peer.recv_kind(WorkGrant)  # never answered
    with pytest.raises(TimeoutError, match="no evaluation batch"):
        await waiting


async def test_a_dropped_rollouts_evaluation_grants_go_to_another_as_evaluation_grants(env):
    endpoint, hub, connect = env
    await hub.publish(make_update(0))
    first = await connect("r0")
    await first.receive_and_ack()
    async with driver_waiting(hub):
        hub.offer([make_grant(0), evaluation_grant(7)])
        assert sorted([(await first.recv_kind(WorkGrant)).grant_id for _ in range(2)]) == [0, 7]
        await first.send(RolloutError(message="gone", fatal=True))
        await eventually(lambda: hub.dropped_peers == 1)
        assert [g.grant_id for g in hub.pending] == [0] and [g.grant_id for g in hub.eval_pending] == [7]
        second = await connect("r1")
        await second.receive_and_ack()
        again = {g.grant_id: g for g in [await second.recv_kind(WorkGrant) for _ in range(2)]}
        assert again[7].evaluation and not again[0].evaluation


async def test_an_evaluation_grant_held_long_is_no_straggler(env):
    """Engines run evaluation requests after training ones, so one may wait long: that is no reason
    to generate it twice."""
    endpoint, hub, connect = env
    hub.straggler_timeout_s = 0.1
    await hub.publish(make_update(0))
    busy = await connect("busy")
    await busy.receive_and_ack()
    async with driver_waiting(hub):
        hub.offer([evaluation_grant(3)])
        await busy.recv_kind(WorkGrant)
        idle = await connect("idle")
        await idle.receive_and_ack()
        await idle.expect_nothing(0.5)
    assert not hub.duplicated


def received_grant(grants: list[WorkGrant], grant_id: int) -> WorkGrant:
    return next(g for g in grants if g.grant_id == grant_id)


@contextlib.asynccontextmanager
async def driver_waiting(hub: RolloutHub):
    """A driver waiting for a step that never comes, as the learner's does between steps: the hub
    hands out work while it waits."""
    waiting = start_collect(hub, 99, 1, timeout_s=60.0)
    try:
        yield
    finally:
        while not waiting.done():  # Python 3.11's wait_for may swallow a cancellation that meets a wake-up
            waiting.cancel()
            await asyncio.wait([waiting], timeout=0.1)
