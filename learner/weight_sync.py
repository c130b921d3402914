"""WeightPublisher: the actor's weights as a versioned, bucketed, fingerprinted WeightUpdate."""

from __future__ import annotations

import torch

from protocol.messages import WeightUpdate, pack_weight_buckets
from protocol.weights import fingerprint_names, weight_fingerprint

from learner.models.actor import Actor
from learner.trainer import gathered_state_dict

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes (works for bf16, which numpy cannot hold)."""
    return memoryview(t.contiguous().view(torch.uint8).numpy())


class WeightPublisher:
    """Builds the update that rollout engines load: full (LoRA-merged) weights in the engine's dtype.

    Under ZeRO-3 every rank must call `build` (the gather is collective); only rank 0 sends.
    """

    def __init__(self, actor: Actor, *, engine_dtype: str, bucket_bytes: int, zero_stage: int):
        self.actor = actor
        self.dtype = _DTYPES[engine_dtype]
        self.bucket_bytes = bucket_bytes
        self.zero_stage = zero_stage

    @torch.no_grad()
    def build(self, version: int) -> WeightUpdate:
        state = {name: t.to(self.dtype) if t.is_floating_point() else t
                 for name, t in gathered_state_dict(self.actor, self.zero_stage).items()}
        named = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), raw_bytes(t)) for name, t in state.items()]
        metas, buckets = pack_weight_buckets(named, self.bucket_bytes)
        fingerprint = weight_fingerprint({n: raw_bytes(state[n]) for n in fingerprint_names(list(state))})
        return WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint=fingerprint)
