"""Credit flow control of streamed weight buckets: the credit message, the sender's window, the learner's
per-rollout stream, and when a rollout lets go of (and credits) a bucket. Real-socket tests of the whole
relay are in test_weight_fanout.py."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import numpy as np
import pytest

from learner.hub.rollout_stream import RolloutStream
from learner.hub.weight_fanout import plan_relay
from protocol.codec import decode, encode
from protocol.credit import CreditWindow
from protocol.errors import ProtocolError
from protocol.messages import (RelayTarget, TensorMeta, WeightBucket, WeightCredit, WeightUpdate, pack_weight_buckets,
                               relay_children, relay_height)
from protocol.weights import weight_fingerprint
from rollout.relay import relay_patience_s
from rollout.weight_stream import IncomingUpdate, WeightStreams, copied_from

pytestmark = pytest.mark.timeout(30)

HDR = dict(run_id="credit-test", producer_id="rollout-1", seq=3, weight_version=2)


def layered_update(version: int, layers: int = 3, bucket_bytes: int = 320) -> WeightUpdate:
    """A float32 update named like a Llama checkpoint (hidden 4, MLP 8): small buckets of several tensors
    whose boundaries fall inside modules (q/k/v, gate/up)."""
    rng = np.random.default_rng(version)
    shapes = {"model.embed_tokens.weight": (6, 4)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (4,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{name}.weight"] = (4, 4)
        for name, shape in (("gate_proj", (8, 4)), ("up_proj", (8, 4)), ("down_proj", (4, 8))):
            shapes[f"model.layers.{i}.mlp.{name}.weight"] = shape
    arrays = [(name, "float32", shape, rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()]
    metas, buckets = pack_weight_buckets(arrays, bucket_bytes=bucket_bytes)
    fingerprint = weight_fingerprint({m.name: buckets[m.bucket][m.offset: m.offset + m.nbytes] for m in metas})
    return WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint=fingerprint)


async def settle() -> None:
    """Let the callbacks and tasks scheduled so far run."""
    for _ in range(5):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- the credit message


def test_a_credit_round_trips():
    credit = WeightCredit(version=4, index=2)
    assert decode(encode(credit, **HDR)).body == credit


@pytest.mark.parametrize("body, reason, where", [
    ({"version": 1, "index": -1}, "bad_value", "weight_credit.index"),
    ({"version": -3, "index": 0}, "bad_value", "weight_credit.version"),
    ({"version": 1, "index": 1 << 20}, "bad_value", "weight_credit.index"),  # beyond max_buckets
    ({"version": 1, "index": "0"}, "bad_type", "weight_credit.index"),
    ({"version": 1}, "missing_field", "weight_credit.body.index"),
    ({"version": 1, "index": 0, "bucket": 0}, "unknown_field", "weight_credit"),
])
def test_a_malformed_credit_is_refused_naming_the_field(body, reason, where):
    header = msgpack.unpackb(bytes(encode(WeightCredit(version=1, index=0), **HDR)[0]), raw=False)
    header["body"] = body
    with pytest.raises(ProtocolError) as exc:
        decode([msgpack.packb(header, use_bin_type=True)])
    assert exc.value.reason_code == reason and where in str(exc.value)


# --------------------------------------------------------------------------- the sender's window


async def test_the_window_opens_only_for_the_credit_of_the_bucket_awaiting_it():
    window = CreditWindow("rollout-1")
    await window.acquire(0)  # nothing sent: open
    window.sent(3, 0)
    with pytest.raises(TimeoutError):
        await window.acquire(0.01)
    for wrong in (WeightCredit(version=3, index=1), WeightCredit(version=2, index=0)):
        with pytest.raises(ProtocolError, match="the bucket awaiting credit is bucket 0 of version 3") as exc:
            window.credit(wrong)
        assert exc.value.reason_code == "bad_credit" and "rollout-1" in str(exc.value)
    window.credit(WeightCredit(version=3, index=0))
    await window.acquire(0)
    with pytest.raises(ProtocolError, match="no bucket awaits credit"):  # a second credit for it
        window.credit(WeightCredit(version=3, index=0))


async def test_the_learner_streams_one_bucket_per_credit_and_goes_on_with_the_newest_waiting_version():
    sent = []

    async def send(message):
        sent.append((message.KIND, message.version, getattr(message, "index", None)))

    stream = RolloutStream("rollout-0", send)
    v1, v2, v3 = (layered_update(v) for v in (1, 2, 3))
    try:
        stream.enqueue(v1, [], 1)
        await settle()
        assert sent == [("weight_header", 1, None), ("weight_bucket", 1, 0)]
        stream.enqueue(v2, [], 1)
        stream.enqueue(v3, [], 1)  # replaces version 2, which never went out
        stream.enqueue(v1, [], 1)  # not newer than the one going out: not sent again
        for update in (v1, v3):
            for index in range(len(update.buckets)):
                await settle()
                buckets = [m for m in sent if m[0] == "weight_bucket"]
                assert buckets[-1] == ("weight_bucket", update.version, index), "one bucket awaiting credit at a time"
                stream.window.credit(WeightCredit(version=update.version, index=index))
        await settle()
    finally:
        stream.close()
    expected = [(u.version, [("weight_header", u.version, None)]
                 + [("weight_bucket", u.version, k) for k in range(len(u.buckets))]) for u in (v1, v3)]
    assert sent == [m for _, messages in expected for m in messages]


# --------------------------------------------------------------------------- trees


def targets(n: int) -> list[RelayTarget]:
    return [RelayTarget(f"tcp://127.0.0.1:{5000 + i}", f"rollout-{i}") for i in range(n)]



def test_relay_height_is_the_depth_of_the_tree_the_learner_plans():
    assert [relay_height(n, 2) for n in range(8)] == [0, 1, 1, 2, 2, 2, 2, 3]
    assert relay_height(5, 1) == 5 and relay_height(3, 4) == 1
    for fanout in (1, 2, 3):
        for count in range(1, 20):
            ids = [bytes([i]) for i in range(count)]
            plan, _, _ = plan_relay(0, {i: RelayTarget(f"tcp://127.0.0.1:{i[0] + 1}", "r") for i in ids}, fanout)
            depth = max(len(plan.ancestors(i)) for i in ids)
            assert relay_height(count - 1, fanout) == depth, (fanout, count)


def test_a_relay_parent_is_more_patient_with_a_child_than_the_child_with_its_own():
    assert relay_patience_s(120, 0, 2) == 10 and relay_patience_s(8, 0, 2) == 1  # a leaf: min(10 s, ack / 8)
    assert relay_patience_s(8, 2, 1) == 3  # two below it in a chain
    for fanout in (1, 2, 3):
        for count in range(1, 40):
            kids = relay_children(targets(count), fanout)
            for child, below in kids:
                own = [relay_patience_s(8, len(b), fanout) for _, b in relay_children(below, fanout)]
                assert max(own, default=0) < relay_patience_s(8, len(below), fanout), (fanout, count)


# --------------------------------------------------------------------------- what a rollout holds


def meta(name: str, bucket: int) -> TensorMeta:
    return TensorMeta(name, "float32", (1,), bucket, 0, 4)


def test_the_tail_an_engine_may_keep_across_a_bucket_boundary_is_copied():
    buckets = [[meta("model.layers.0.input_layernorm.weight", 0), meta("model.layers.0.self_attn.q_proj.weight", 0),
                meta("model.layers.0.self_attn.k_proj.weight", 0)],
               [meta("model.layers.0.self_attn.v_proj.weight", 1), meta("model.layers.0.self_attn.o_proj.weight", 1),
                meta("model.layers.0.mlp.gate_proj.weight", 1)],
               [meta("model.layers.0.mlp.up_proj.weight", 2)],
               [meta("model.layers.0.mlp.down_proj.weight", 3), meta("model.norm.weight", 3)]]
    # q and k wait for v (one qkv module); gate waits for up; a one-tensor bucket is not copied whole;
    # nothing comes after the last bucket
    assert copied_from(buckets) == [1, 2, 1, 2]


def test_an_engine_gets_views_of_a_bucket_and_copies_of_its_tail():
    update = layered_update(5)
    incoming = IncomingUpdate(update.header())
    for bucket in update.bucket_messages():
        incoming.add(bucket)
    copies = 0
    for tensor, data in incoming.tensors(timeout_s=1):
        assert bytes(data) == bytes(update.tensor_bytes(tensor))
        position = incoming.metas[tensor.bucket].index(tensor)
        copied = position >= incoming.copy_from[tensor.bucket]
        assert isinstance(data.obj, bytearray if copied else np.ndarray)
        copies += copied
    assert copies > 0


async def test_a_bucket_is_credited_once_loaded_and_a_copy_of_one_already_taken_at_once():
    update = layered_update(1)
    buckets = update.bucket_messages()
    credited = []

    async def credit(message: WeightCredit) -> None:
        credited.append((message.version, message.index))

    streams = WeightStreams()
    streams.on_header(update.header(), -1)
    streams.on_bucket(buckets[0], credit)
    await settle()
    assert credited == [], "not loaded yet"
    streams.on_bucket(buckets[0], credit)  # the same bucket from a second sender
    await settle()
    assert credited == [(1, 0)]
    tensors = streams.next_update(-1).tensors(timeout_s=1)
    for _ in streams.incoming[1].metas[0]:
        next(tensors)
    await settle()
    assert credited == [(1, 0)], "its last tensor is being loaded"
    streams.on_bucket(buckets[1], credit)
    next(tensors)  # the engine asks for the tensor after bucket 0's last one
    await settle()
    assert credited == [(1, 0), (1, 0)]


async def test_a_version_set_aside_is_credited_as_it_comes_a_forgotten_one_too_an_abandoned_one_not():
    update = layered_update(1)
    buckets = update.bucket_messages()
    credited = []

    async def credit(message: WeightCredit) -> None:
        credited.append((message.version, message.index))

    parked = WeightStreams(parked=lambda: True)  # the engine may not load now: the version waits whole
    parked.on_header(update.header(), -1)
    for bucket in buckets:
        parked.on_bucket(bucket, credit)
    await settle()
    assert credited == [(1, k) for k in range(len(buckets))]

    credited.clear()
    streams = WeightStreams()
    streams.on_header(update.header(), -1)
    streams.on_bucket(buckets[0], credit)
    streams.next_update(applied_version=1)  # version 1 was applied meanwhile: dropped, and let go
    await settle()
    assert credited == [(1, 0)]

    credited.clear()
    streams.on_header(dataclasses.replace(update.header(), version=2), -1)
    streams.on_bucket(WeightBucket(version=2, index=0, data=buckets[0].data), credit)
    streams.abandon_all()  # rejoining: the senders start again from the hello
    await settle()
    assert credited == []
