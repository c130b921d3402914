"""WeightPublisher: the actor's weights as the bucketed, fingerprinted update a rollout loads."""

import pytest
import torch

from learner.models import Actor
from learner.training.weight_sync import WeightPublisher
from protocol.buffers import tensor_bytes as raw_bytes
from protocol.weights import fingerprint_names, weight_fingerprint
from tests.unit.test_models import tiny_lm


@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
def test_update_holds_every_tensor_in_the_engine_dtype_within_buckets(engine_dtype):
    actor = Actor(tiny_lm())
    bucket_bytes = 48 << 10
    update = WeightPublisher(actor, engine_dtype=engine_dtype, bucket_bytes=bucket_bytes, zero_stage=2).build(7)
    expected = {n: t.to(getattr(torch, engine_dtype)) for n, t in actor.model.state_dict().items()}

    assert update.version == 7
    assert [m.name for m in update.tensors] == list(expected)
    for meta in update.tensors:
        assert meta.dtype == engine_dtype and meta.shape == tuple(expected[meta.name].shape)
        assert bytes(update.tensor_bytes(meta)) == bytes(raw_bytes(expected[meta.name])), meta.name
    assert len(update.buckets) > 1
    for index, bucket in enumerate(update.buckets):
        inside = [m for m in update.tensors if m.bucket == index]
        assert bucket.nbytes <= bucket_bytes or len(inside) == 1, "only a lone oversized tensor overflows"
        assert bucket.nbytes == max(m.offset + m.nbytes for m in inside)
    chosen = fingerprint_names(list(expected))
    assert update.fingerprint == weight_fingerprint({n: raw_bytes(expected[n]) for n in chosen})


def test_a_changed_weight_changes_the_fingerprint():
    actor = Actor(tiny_lm())
    publisher = WeightPublisher(actor, engine_dtype="float32", bucket_bytes=1 << 20, zero_stage=2)
    before = publisher.build(0)
    fingerprinted = next(iter(before.fingerprint))
    with torch.no_grad():
        actor.model.state_dict()[fingerprinted].add_(1e-3)
    after = publisher.build(1)
    assert after.fingerprint[fingerprinted] != before.fingerprint[fingerprinted]
