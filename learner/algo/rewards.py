"""Reward math: combining and clipping sequence scores (reward functions, reward model, penalties)
and turning them into per-token rewards. Scoring itself (calling the user's reward functions) is
:mod:`learner.data.reward_functions`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .masked import as_bool_mask, require_same_shape

__all__ = ["last_action_index", "shape_token_rewards", "combine_rewards", "clip_rewards", "overlong_penalty"]


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid action token of each row.

    Shapes: ``action_mask [B, A]`` -> ``[B]`` (int64). Rows without any valid
    token get -1. Works for any mask layout (it does not assume right padding).
    Formula: ``max{t : action_mask[b, t]}``.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, A], got shape {tuple(action_mask.shape)}")
    bool_mask = as_bool_mask(action_mask)
    positions = torch.arange(bool_mask.shape[1], device=bool_mask.device).expand_as(bool_mask)
    return torch.where(bool_mask, positions, torch.full_like(positions, -1)).amax(dim=1)


def shape_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every action token plus the score on the last one.

    Shapes: ``scores [B]``, ``kl [B, A]`` (per-token KL estimate, e.g. from
    :func:`learner.algo.kl.approx_kl`), ``action_mask [B, A]`` -> ``[B, A]``.

        r[b, t] = -kl_coef * kl[b, t]                      for valid t
        r[b, T_b] += scores[b]      with T_b = last valid action token of row b
        r[b, t] = 0                                        for masked t

    Rows may have different lengths (padding on the right). A row with no valid
    action token has nothing to credit its score to and is all zeros.
    """
    require_same_shape("action_mask", action_mask, "kl", kl)
    if scores.dim() != 1 or scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores must be [B] with B={kl.shape[0]}, got shape {tuple(scores.shape)}")
    bool_mask = as_bool_mask(action_mask)
    rewards = torch.where(bool_mask, -kl_coef * kl, torch.zeros_like(kl))
    last = last_action_index(bool_mask)
    has_action = last >= 0
    rows = torch.arange(kl.shape[0], device=kl.device)[has_action]
    # index_put with accumulate adds the score on top of that token's KL penalty.
    return rewards.index_put((rows, last[has_action]), scores[has_action].to(rewards.dtype), accumulate=True)


def combine_rewards(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of named score components. Shapes: each component ``[B]`` -> ``[B]`` (float64).

        total[b] = sum_k weights[k] * components[k][b]      (k in the order of ``components``)

    Summed in float64, one component after the other, so the result does not depend on how many
    components there are. The two key sets must be equal.
    """
    if set(components) != set(weights):
        raise ValueError(f"reward components {sorted(components)} and weights {sorted(weights)} must have the same keys")
    if not components:
        raise ValueError("combine_rewards needs at least one component")
    shapes = {k: tuple(v.shape) for k, v in components.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"reward components must be [B] with one B, got shapes {shapes}")
    total = torch.zeros(next(iter(shapes.values())), dtype=torch.float64)
    for name, scores in components.items():
        total = total + float(weights[name]) * scores.to(torch.float64)
    return total


def clip_rewards(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip scores to ``[-clip, clip]``. Shapes: any -> same. Formula: ``clamp(s, -clip, clip)``."""
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    return scores.clamp(min=-clip, max=clip)


def overlong_penalty(response_lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), a reward added to each sequence's score.

    Shapes: ``response_lengths [B]`` (generated tokens per sequence) -> ``[B]`` (float32). With L the
    length, M = ``max_new_tokens`` and B = ``buffer`` (0 < B <= M):

        penalty = -factor * min(1, max(0, L - (M - B)) / B)

    0 up to M - B tokens, then falling linearly to -factor at M tokens (and no lower beyond).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"need 0 < buffer <= max_new_tokens, got buffer {buffer}, max_new_tokens {max_new_tokens}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    over = (response_lengths.to(torch.float32) - (max_new_tokens - buffer)).clamp(min=0)
    return -factor * (over / buffer).clamp(max=1)
