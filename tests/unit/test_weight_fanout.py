"""Weight fan-out: relay trees, the streamed wire messages, and relaying over real ZeroMQ sockets.

The relay test runs the real hub (learner.hub.rollout_hub) and the rollouts' real relay code
(rollout.weight_stream over protocol.transport sockets); only the vLLM engine is absent: each
rollout reads the tensors it is fed, as the engine would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import weakref

import numpy as np
import pytest

from learner.hub.rollout_hub import RolloutHub
from learner.hub.weight_fanout import plan_relay
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import (Heartbeat, Hello, RelayTarget, WeightAck, WeightBucket, WeightCredit, WeightHeader,
                               pack_weight_buckets, relay_children)
from protocol.transport import LearnerEndpoint, RolloutClient
from protocol.weights import weight_fingerprint
from rollout.relay import RelayLinks
from rollout.weight_stream import IncomingUpdate, UpdateAbandoned, WeightStreams
from tests.unit.test_hub import make_update, start_collect
from tests.unit.test_weight_credit import layered_update

pytestmark = pytest.mark.timeout(60)

RUN = "fanout-test"


def targets(n: int) -> list[RelayTarget]:
    return [RelayTarget(f"tcp://127.0.0.1:{5000 + i}", f"rollout-{i}") for i in range(n)]


# --------------------------------------------------------------------------- trees


def test_relay_children_splits_descendants_into_contiguous_subtrees():
    t = targets(7)
    assert relay_children(t, 2) == [(t[0], t[1:4]), (t[4], t[5:7])]
    assert relay_children(t[:3], 1) == [(t[0], t[1:3])]  # a chain
    assert relay_children(t[:2], 3) == [(t[0], []), (t[1], [])]
    assert relay_children([], 2) == []
    with pytest.raises(ValueError, match="fanout"):
        relay_children(t, 0)


def test_plan_sends_one_copy_to_the_root_and_every_node_at_most_fanout_copies():
    ids = [f"r{i}".encode() for i in range(8)]
    plan, root, below = plan_relay(3, dict(zip(ids, targets(8))), fanout=2)
    assert root == b"r0" and below == targets(8)[1:]
    # r0 -> r1 (r2, r3, r4) and r5 (r6, r7); r1 -> r2 (r3) and r4; r2 -> r3; r5 -> r6 and r7
    assert plan.parent == {b"r0": None, b"r1": b"r0", b"r2": b"r1", b"r3": b"r2", b"r4": b"r1",
                           b"r5": b"r0", b"r6": b"r5", b"r7": b"r5"}
    assert plan.ancestors(b"r3") == [b"r2", b"r1", b"r0"]
    children = {}
    for node, parent in plan.parent.items():
        children.setdefault(parent, []).append(node)
    assert len(children[None]) == 1 and all(len(c) <= 2 for c in children.values())


# --------------------------------------------------------------------------- wire


def test_header_and_buckets_round_trip_and_carry_the_update():
    update = make_update(4)
    header = update.header(targets(2), fanout=2)
    frames = encode(header, run_id=RUN, producer_id="learner", seq=0, weight_version=4)
    assert decode(frames).body == header
    for bucket in update.bucket_messages():
        got = decode(encode(bucket, run_id=RUN, producer_id="learner", seq=1, weight_version=4)).body
        assert got.index == bucket.index and bytes(got.data) == bytes(update.buckets[bucket.index])


@pytest.mark.parametrize("change, reason", [
    (dict(relay=[RelayTarget("ipc:///tmp/x", "rollout-1")]), "bad_value"),
    (dict(fanout=0), "bad_value"),
    (dict(bucket_sizes=[8]), "out_of_bounds"),  # the tensors do not fit the announced buckets
])
def test_bad_headers_are_refused_naming_the_field(change, reason):
    import dataclasses

    header = dataclasses.replace(make_update(1).header(), **change)
    with pytest.raises(ProtocolError) as exc:
        encode(header, run_id=RUN, producer_id="learner", seq=0, weight_version=1)
    assert exc.value.reason_code == reason and "weight_header" in str(exc.value)


def test_incoming_update_hands_buckets_over_in_order_once_and_refuses_misfits():
    update = make_update(2)
    assert len(update.buckets) >= 2
    incoming = IncomingUpdate(update.header())
    buckets = update.bucket_messages()
    assert incoming.add(buckets[1]) and incoming.next_index == 0  # early: waits for bucket 0
    assert incoming.add(buckets[0]) and incoming.next_index == 2
    assert not incoming.add(buckets[0])  # a second copy (the learner re-sent the version)
    with pytest.raises(ProtocolError, match="announced"):
        incoming.add(WeightBucket(version=2, index=0, data=np.zeros(3, np.uint8)))
    with pytest.raises(ProtocolError, match="announced"):
        incoming.add(WeightBucket(version=2, index=99, data=np.zeros(0, np.uint8)))
    for bucket in buckets[2:]:
        incoming.add(bucket)
    assert incoming.complete
    got = {meta.name: bytes(data) for meta, data in incoming.tensors(timeout_s=1)}
    assert got == {m.name: bytes(update.tensor_bytes(m)) for m in update.tensors}


def test_a_stalled_or_abandoned_stream_raises_instead_of_waiting_forever():
    update = make_update(2)
    with pytest.raises(TimeoutError, match="bucket 0 of weight version 2"):
        list(IncomingUpdate(update.header()).tensors(timeout_s=0.05))
    abandoned = IncomingUpdate(update.header())
    abandoned.abandon()
    with pytest.raises(UpdateAbandoned):
        list(abandoned.tensors(timeout_s=5))


def test_a_rollout_without_a_relay_socket_refuses_to_relay():
    header = make_update(1).header(targets(1))
    with pytest.raises(ProtocolError, match="no relay socket"):
        WeightStreams().on_header(header, -1)


# --------------------------------------------------------------------------- relaying over ZeroMQ


class RelayingRollout:
    """A rollout's weight path without an engine: learner socket, relay socket, streams; a thread reads
    each version's tensors as they come (as the engine thread does) and the rollout acknowledges it.

    It checks the flow control on every bucket it is sent: `overlaps` names each one that came while it
    had not credited, or still held, the one before from the same sender."""

    def __init__(self, learner_address: str, index: int, ack_timeout_s: float = 60.0):
        self.producer_id = f"rollout-{index}@test"
        self.client = RolloutClient(learner_address, RUN, self.producer_id)
        inbox = LearnerEndpoint(RUN, producer_id=self.producer_id)
        self.streams = WeightStreams(RelayLinks(inbox, lambda t: RolloutClient(t.address, RUN, self.producer_id),
                                                ack_timeout_s))
        self.applied = -1
        self.loaded: dict[int, dict[str, bytes]] = {}
        self.tasks: list[asyncio.Task] = []
        self.credits_relay_parent = True
        self.received = 0
        self.uncredited: collections.Counter[str] = collections.Counter()  # sender -> buckets not credited
        self.previous: dict[str, weakref.ref] = {}  # sender -> the bytes of the last bucket it sent
        self.overlaps: list[str] = []

    async def start(self) -> None:
        await self.client.send(Hello(engine_info={"relay_address": self.streams.links.address}), weight_version=-1)
        self.tasks = [asyncio.create_task(self._from_learner()), asyncio.create_task(self._relayed()),
                      asyncio.create_task(self._apply())]

    async def _from_learner(self) -> None:
        while True:
            self._take((await self.client.recv()).body, self._credit_learner, "the learner")

    async def _credit_learner(self, credit) -> None:
        await self.client.send(credit, weight_version=self.applied)

    async def _relayed(self) -> None:
        while True:
            parent, envelope = await self.streams.links.inbox.recv()
            credit = self.streams.links.credit_to(parent) if self.credits_relay_parent else self._no_credit
            self._take(envelope.body, credit, parent.decode())
            del envelope

    @staticmethod
    async def _no_credit(credit) -> None:
        pass

    def _take(self, message, credit, sender: str) -> None:
        if isinstance(message, WeightHeader):
            self.streams.on_header(message, self.applied)
        elif isinstance(message, WeightBucket):
            self._check_flow(message, sender)
            self.streams.on_bucket(message, self._counted(credit, sender))

    def _check_flow(self, bucket: WeightBucket, sender: str) -> None:
        previous = self.previous.get(sender)
        if self.uncredited[sender] or (previous is not None and previous() is not None):
            self.overlaps.append(f"bucket {bucket.index} of version {bucket.version} from {sender}")
        self.received += 1
        self.uncredited[sender] += 1
        self.previous[sender] = weakref.ref(bucket.data)

    def _counted(self, credit, sender: str):
        async def send(message: WeightCredit) -> None:
            self.uncredited[sender] -= 1
            await credit(message)
        return send

    @staticmethod
    def _load(update) -> dict[str, bytes]:
        """The engine thread's part: copies each tensor and lets go of it before asking for the next."""
        tensors = {}
        for meta, data in update.tensors(timeout_s=10):
            tensors[meta.name] = bytes(data)
            del data
        return tensors

    async def _apply(self) -> None:
        while True:
            update = self.streams.next_update(self.applied)
            if update is None:
                await asyncio.sleep(0.005)
                continue
            tensors = await asyncio.to_thread(self._load, update)
            names = sorted(update.header.fingerprint)
            self.loaded[update.version] = tensors
            self.applied = update.version
            self.streams.done(update.version)
            await self.client.send(WeightAck(version=update.version, apply_seconds=0.0,
                                             fingerprint=weight_fingerprint({n: tensors[n] for n in names})),
                                   weight_version=update.version)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.streams.links.close()
        self.client.close()


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def relay_setup(count: int, fanout: int, ack_timeout_s: float = 60.0):
    endpoint = LearnerEndpoint(RUN)
    hub = RolloutHub(endpoint, ack_timeout_s=ack_timeout_s, weight_relay_fanout=fanout)
    server = asyncio.create_task(hub.serve())
    rollouts = [RelayingRollout(endpoint.address, i, ack_timeout_s) for i in range(count)]
    try:
        for n, rollout in enumerate(rollouts, 1):  # one by one: the tree follows the connection order
            await rollout.start()
            await wait_until(lambda: len(hub.peers) == n)
        yield hub, rollouts
        assert not server.done(), f"serve() stopped: {server.exception()!r}"
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        for rollout in rollouts:
            await rollout.close()
        endpoint.close()


def expected_tensors(update) -> dict[str, bytes]:
    return {m.name: bytes(update.tensor_bytes(m)) for m in update.tensors}


@pytest.mark.parametrize("fanout", [1, 2])
async def test_every_rollout_gets_every_version_while_the_learner_sends_one_copy(fanout):
    async with relay_setup(5, fanout) as (hub, rollouts):
        for version in range(3):
            update = make_update(version)
            before = hub.fanout.bytes_sent
            await hub.publish(update)
            await wait_until(lambda: all(p.applied_version == version for p in hub.peers.values()))
            hub._raise_if_failed()  # every fingerprint matched the learner's
            assert hub.fanout.bytes_sent - before == update.total_bytes, "rank 0 sends the update once"
            assert all(r.loaded[version] == expected_tensors(update) for r in rollouts)


async def test_a_late_joiner_gets_the_latest_version_straight_from_the_learner():
    async with relay_setup(2, 1) as (hub, rollouts):
        update = make_update(0)
        await hub.publish(update)
        await wait_until(lambda: all(r.applied == 0 for r in rollouts))
        late = RelayingRollout(hub.endpoint.address, 9)
        rollouts.append(late)
        await late.start()
        await wait_until(lambda: late.applied == 0)
        assert late.loaded[0] == expected_tensors(update)


async def test_rollouts_below_a_dropped_relay_node_still_get_the_version():
    """A chain r0 -> r1 -> r2 -> r3 whose r1 stops relaying (frozen): the learner drops r1 for not
    applying the version, without blaming r2 and r3 for it, and sends them the version directly."""
    async with relay_setup(4, 1, ack_timeout_s=1.0) as (hub, rollouts):
        frozen = rollouts[1]
        for task in frozen.tasks:  # receives nothing more, forwards nothing, applies nothing
            task.cancel()
        update = make_update(0)
        await hub.publish(update)
        deadline = asyncio.get_running_loop().time() + 10
        collect = start_collect(hub, 0, 1, timeout_s=10)  # drives the hub's liveness checks
        try:
            await wait_until(lambda: all(r.applied == 0 for r in rollouts if r is not frozen))
        finally:
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await collect
        assert asyncio.get_running_loop().time() < deadline
        assert frozen.producer_id.encode() not in hub.peers and hub.dropped_peers == 1
        assert all(r.loaded[0] == expected_tensors(update) for r in rollouts if r is not frozen)


# --------------------------------------------------------------------------- configuration


def test_relay_host_without_a_relay_and_an_open_relay_socket_are_refused_at_start_up():
    from protocol.config import ConfigError, RunConfig
    from protocol.network_policy import InsecureTransportError, check_transport_security, relay_bind_host

    cfg = RunConfig()
    cfg.transport.weight_relay_fanout, cfg.transport.relay_host = 0, "10.0.0.2"
    with pytest.raises(ConfigError, match="transport.relay_host .* transport.weight_relay_fanout is 0"):
        cfg.validate()
    cfg.transport.weight_relay_fanout = 2
    with pytest.raises(InsecureTransportError, match="transport.relay_host is '10.0.0.2'"):
        check_transport_security(cfg)
    cfg.transport.relay_host = ""
    assert relay_bind_host(cfg.transport) == "127.0.0.1"  # derived from the loopback learner_host
    assert check_transport_security(cfg) is False


async def applied_under_liveness_checks(hub, rollouts, version: int) -> None:
    """Wait until every rollout applied `version`, while a step's collection drives the hub's liveness
    checks (late rollouts are sent the version straight, stuck ones dropped)."""
    collect = start_collect(hub, 0, 1, timeout_s=10)
    try:
        await wait_until(lambda: all(r.applied == version for r in rollouts))
    finally:
        collect.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await collect


async def test_a_rollout_whose_relay_parent_applies_but_does_not_forward_gets_the_version_directly():
    """r0 -> r1 -> r2 where r1 loads every version but passes nothing on: r2 is not dropped, the
    learner sends it the version straight once it is late."""
    async with relay_setup(3, 1, ack_timeout_s=1.0) as (hub, rollouts):
        async def forwards_nothing(targets, message, weight_version):
            return list(targets)

        rollouts[1].streams.links.forward = forwards_nothing
        update = make_update(0)
        await hub.publish(update)
        await applied_under_liveness_checks(hub, rollouts, 0)
        assert hub.dropped_peers == 0 and len(hub.peers) == 3
        assert rollouts[2].loaded[0] == expected_tensors(update)


# --------------------------------------------------------------------------- credit flow control


@pytest.mark.parametrize("fanout", [1, 2])
async def test_a_rollout_is_sent_a_bucket_only_once_it_has_let_go_of_the_one_before(fanout):
    """No rollout gets a bucket from its sender (the learner or its relay parent) while it has not
    credited the one before, or still holds its bytes; and every bucket still reaches every rollout."""
    async with relay_setup(4, fanout) as (hub, rollouts):
        for version in range(2):
            update = layered_update(version)
            await hub.publish(update)
            await wait_until(lambda: all(p.applied_version == version for p in hub.peers.values()))
            hub._raise_if_failed()
            assert all(r.loaded[version] == expected_tensors(update) for r in rollouts)
        assert [r.overlaps for r in rollouts] == [[]] * 4
        assert [r.received for r in rollouts] == [2 * len(update.buckets)] * 4


async def test_a_relay_child_that_credits_nothing_is_cut_off_without_holding_up_its_parent_or_sibling():
    """r0 relays to r1 and r2; r1 loads what it gets but never credits r0. r0 cuts it off, r2 gets every
    bucket, r0 applies the version, and the learner sends r1 the version straight once it is late:
    nobody is dropped."""
    async with relay_setup(3, 2, ack_timeout_s=1.0) as (hub, rollouts):
        rollouts[1].credits_relay_parent = False
        update = layered_update(0)
        await hub.publish(update)
        await applied_under_liveness_checks(hub, rollouts, 0)
        assert hub.dropped_peers == 0 and len(hub.peers) == 3
        assert all(r.loaded[0] == expected_tensors(update) for r in rollouts)
        links = {target.key_name: link for target, link in rollouts[0].streams.links.children.items()}
        assert links["rollout-1"].cut_off and not links["rollout-2"].cut_off


@contextlib.asynccontextmanager
async def hub_and_rollout():
    """(hub, client): a relay hub serving on a real endpoint and one rollout (no relay socket) that said hello."""
    endpoint = LearnerEndpoint(RUN)
    hub = RolloutHub(endpoint, ack_timeout_s=60, weight_relay_fanout=1)
    server = asyncio.create_task(hub.serve())
    client = RolloutClient(endpoint.address, RUN, "rollout-0@test")
    try:
        await client.send(Hello(engine_info={}), weight_version=-1)
        await wait_until(lambda: len(hub.peers) == 1)
        yield hub, client
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        client.close()
        endpoint.close()


async def test_the_learner_refuses_a_credit_for_a_bucket_that_does_not_await_one():
    async with hub_and_rollout() as (hub, client):
        await client.send(WeightCredit(version=0, index=0), weight_version=-1)  # nothing streamed to it yet
        await wait_until(lambda: hub.discarded["bad_credit"] == 1)
        await hub.publish(layered_update(0))  # streamed straight to it: it announced no relay socket
        assert isinstance((await client.recv(timeout=5)).body, WeightHeader)
        assert (await client.recv(timeout=5)).body.index == 0
        await client.send(WeightCredit(version=0, index=3), weight_version=-1)  # not the bucket awaiting credit
        await wait_until(lambda: hub.discarded["bad_credit"] == 2)
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.2)  # a refused credit sends nothing
        await client.send(WeightCredit(version=0, index=0), weight_version=-1)
        assert (await client.recv(timeout=5)).body.index == 1
        assert len(hub.peers) == 1 and hub.failure is None  # refused, not dropped


async def test_a_version_still_streaming_at_shutdown_stops_and_drops_no_rollout():
    async with hub_and_rollout() as (hub, client):
        await hub.publish(layered_update(0))
        assert isinstance((await client.recv(timeout=5)).body, WeightHeader)
        assert (await client.recv(timeout=5)).body.index == 0  # bucket 1 waits for this one's credit
        await hub.shutdown_rollouts("training finished")
        assert (await client.recv(timeout=5)).body.reason == "training finished"
        # its credit crossed the shutdown: the stream would send bucket 1 to a rollout on its way out
        # (gone by then, it would be dropped as unreachable, as if it had failed)
        await client.send(WeightCredit(version=0, index=0), weight_version=-1)
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.5)
        assert len(hub.peers) == 1 and hub.dropped_peers == 0


async def test_a_relay_parent_refuses_what_its_child_sends_but_the_credit_awaited():
    child = LearnerEndpoint(RUN, producer_id="rollout-1@test")  # the child's relay socket
    links = RelayLinks(LearnerEndpoint(RUN, producer_id="rollout-0@test"),
                       lambda t: RolloutClient(t.address, RUN, "rollout-0@test"), ack_timeout_s=60)
    try:
        link = links.child(RelayTarget(child.address, "rollout-1"))
        update = layered_update(0)
        link.put(update.header(), None, 5.0)
        for bucket in update.bucket_messages()[:2]:
            link.put(bucket, None, 5.0)
        parent, envelope = await child.recv(timeout=5)
        assert isinstance(envelope.body, WeightHeader)
        assert (await child.recv(timeout=5))[1].body.index == 0
        for bogus in (WeightCredit(version=0, index=1), WeightCredit(version=7, index=0), Heartbeat(state="idle")):
            await child.send(parent, bogus, weight_version=0)
        await wait_until(lambda: link.refused == 3)
        assert link.window.awaiting == (0, 0) and not link.cut_off
        await child.send(parent, WeightCredit(version=0, index=0), weight_version=0)
        assert (await child.recv(timeout=5))[1].body.index == 1
    finally:
        links.close()
        child.close()
