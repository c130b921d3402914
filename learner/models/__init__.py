"""Learner-side models (actor, critic, reward), packing helpers and memory-bounded log-probs.

Alignment convention: per-token outputs are aligned to tokens -- ``out[i]`` refers to token ``i``
as an action (computed from the model output at ``i - 1``) and is 0 at each sequence's first
token and at pads. See :mod:`learner.models.packing`.
"""

from .actor import Actor, LoraSpec, resolve_dtype
from .logprobs import entropy_from_logits, log_probs_from_logits
from .packing import (
    packed_model_kwargs,
    padded_action_mask,
    padded_position_ids,
    position_ids_from_cu_seqlens,
    sequence_start_mask,
    unpack_to_padded,
    validate_cu_seqlens,
)
from .value_model import CriticModel, RewardModel, ValueModel, build_value_model

__all__ = [
    "Actor",
    "LoraSpec",
    "resolve_dtype",
    "CriticModel",
    "RewardModel",
    "ValueModel",
    "build_value_model",
    "log_probs_from_logits",
    "entropy_from_logits",
    "packed_model_kwargs",
    "padded_action_mask",
    "padded_position_ids",
    "position_ids_from_cu_seqlens",
    "sequence_start_mask",
    "unpack_to_padded",
    "validate_cu_seqlens",
]
