"""WeightPublisher: the actor's weights as a versioned, bucketed, fingerprinted WeightUpdate."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from protocol.buffers import tensor_bytes
from protocol.dtypes import float_dtype_name
from protocol.messages import WeightUpdate, pack_weight_buckets
from protocol.weights import fingerprint_names, weight_fingerprint

from learner.models.actor import Actor
from learner.training.trainer import zero3_gather

class WeightPublisher:
    """Builds the update that rollout engines load: full (LoRA-merged) weights in the engine's dtype.

    The weights are read module by module and copied straight into the buckets, so besides the
    buckets only one module is held whole at a time (under ZeRO-3 every rank must call `build`:
    each module's gather is collective; only rank 0 sends).
    """

    def __init__(self, actor: Actor, *, engine_dtype: str, bucket_bytes: int, zero_stage: int):
        self.actor = actor
        self.dtype = getattr(torch, float_dtype_name(engine_dtype))
        self.bucket_bytes = bucket_bytes
        self.gather = zero3_gather if zero_stage == 3 else None

    @torch.no_grad()
    def build(self, version: int) -> WeightUpdate:
        return build_weight_update(version, self.actor.merged_weights(self.gather),
                                   dtype=self.dtype, bucket_bytes=self.bucket_bytes)


def build_weight_update(version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                        dtype: torch.dtype, bucket_bytes: int) -> WeightUpdate:
    """Copy (name, tensor) pairs, floating ones cast to `dtype`, into buckets as one fingerprinted update.

    `named_tensors` is consumed lazily: each tensor may be released once it has been copied.
    """
    def engine_tensors():
        for name, t in named_tensors:
            t = t.to(dtype) if t.is_floating_point() else t
            yield name, str(t.dtype).removeprefix("torch."), tuple(t.shape), tensor_bytes(t)

    metas, buckets = pack_weight_buckets(engine_tensors(), bucket_bytes)
    update = WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint={})
    chosen = set(fingerprint_names([m.name for m in metas]))
    fingerprint = weight_fingerprint({m.name: update.tensor_bytes(m) for m in metas if m.name in chosen})
    return dataclasses.replace(update, fingerprint=fingerprint)
