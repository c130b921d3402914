"""Advantage estimators, each a pure function, plus one string-keyed dispatcher.

Layout conventions: per-token tensors are ``[B, A]`` with ``action_mask [B, A]``;
sequence tensors are ``[B]``. Group estimators assume the ``group_size`` samples
of one prompt are contiguous, so ``B = num_prompts * group_size``.

Time recursions (GAE, discounted returns) walk the VALID tokens of a row from
the last to the first and skip masked positions, so "the next step" of a token is
the next valid token of its row and everything after the last valid token counts
as terminal (value 0, reward 0). With the usual right padding this is exactly
the position-wise recursion.
"""

from __future__ import annotations

import torch

from protocol.config import ADVANTAGE_ESTIMATORS

from .masked import as_bool_mask, masked_whiten, require_same_shape
from .rewards import shape_token_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "gae",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "discounted_returns",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "broadcast_to_tokens",
    "sequence_to_token_advantages",
    "compute_advantages",
]


def _check_token_tensor(name: str, tensor: torch.Tensor, action_mask: torch.Tensor) -> None:
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, A], got shape {tuple(action_mask.shape)}")
    require_same_shape(name, tensor, "action_mask", action_mask)


def as_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``scores [B]`` as ``[B // group_size, group_size]`` after validating the layout."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {scores.shape[0]} is not a multiple of group_size={group_size}: "
            "every prompt must contribute exactly group_size contiguous samples"
        )
    return scores.view(-1, group_size)


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

    Shapes: ``token_rewards``, ``values``, ``action_mask`` all ``[B, A]`` ->
    ``(advantages [B, A], returns [B, A])``. For valid tokens t (next valid token t+1):

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last valid token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A after the last valid token = 0)
        R_t     = A_t + V_t

    Masked positions are 0 in both outputs. Computed without gradient tracking
    (advantages and returns are regression/weighting targets).
    """
    _check_token_tensor("token_rewards", token_rewards, action_mask)
    _check_token_tensor("values", values, action_mask)
    bool_mask = as_bool_mask(action_mask)
    with torch.no_grad():
        rewards = torch.where(bool_mask, token_rewards, torch.zeros_like(token_rewards))
        values = torch.where(bool_mask, values, torch.zeros_like(values)).to(rewards.dtype)
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(rewards[:, 0])
        next_advantage = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            valid = bool_mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
            # Masked positions are skipped: the carry passes through them untouched.
            next_value = torch.where(valid, values[:, t], next_value)
            next_advantage = torch.where(valid, advantage, next_advantage)
        returns = torch.where(bool_mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024) group-normalised sequence advantages.

    Shapes: ``scores [B]`` -> ``[B]``; ``B`` must be a multiple of ``group_size`` >= 2.

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)

    where g is the group of i and ``std`` is UNBIASED (divides by n - 1), like
    ``torch.std``'s default and OpenRLHF's group_norm (batch whitening,
    :func:`learner.algo.masked.masked_whiten`, divides by n instead). A group of
    identical scores gets all-zero advantages.
    """
    grouped = as_groups(scores, group_size)
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for grpo (unbiased group std needs two samples)")
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025) advantages: the group-mean baseline without std scaling.

    Shapes: ``scores [B]`` -> ``[B]``. Formula: ``A_i = s_i - mean_g(s)``.
    """
    grouped = as_groups(scores, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024) leave-one-out advantages.

    Shapes: ``scores [B]`` -> ``[B]``; ``group_size`` n >= 2.

        A_i = s_i - (sum_{j in g, j != i} s_j) / (n - 1)
    """
    grouped = as_groups(scores, group_size)
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for rloo (the leave-one-out mean needs another sample)")
    leave_one_out_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - leave_one_out_mean).reshape(-1)


def discounted_returns(token_rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo reward-to-go per token (the REINFORCE++ return).

    Shapes: ``token_rewards``, ``action_mask`` ``[B, A]`` -> ``[B, A]``.

        G_t = sum_{k >= t} gamma^(k - t) r_k      (k over the valid tokens of the row)

    computed as ``G_t = r_t + gamma * G_{t+1}``; masked positions are 0.
    """
    _check_token_tensor("token_rewards", token_rewards, action_mask)
    bool_mask = as_bool_mask(action_mask)
    with torch.no_grad():
        rewards = torch.where(bool_mask, token_rewards, torch.zeros_like(token_rewards))
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            valid = bool_mask[:, t]
            running = torch.where(valid, rewards[:, t] + gamma * running, running)
            returns[:, t] = torch.where(valid, running, torch.zeros_like(running))
    return returns


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted returns whitened over the whole batch.

    Shapes: ``token_rewards`` (already KL-shaped, see
    :func:`learner.algo.rewards.shape_token_rewards`), ``action_mask`` ``[B, A]``
    -> ``(advantages [B, A], returns [B, A])``.

        G = discounted_returns(token_rewards, action_mask, gamma)
        A = masked_whiten(G, action_mask)    (mean/population std over all valid tokens of the batch)
    """
    returns = discounted_returns(token_rewards, action_mask, gamma)
    return masked_whiten(returns, action_mask), returns


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    group_size: int,
    kl_coef: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: group-mean baseline on scores, then KL shaping, returns, whitening.

    Shapes: ``scores [B]``, ``kl [B, A]`` (per-token KL estimate), ``action_mask [B, A]``
    -> ``(advantages [B, A], returns [B, A])``.

        s'  = s - mean_g(s)                                       (group baseline, no std)
        r   = shape_token_rewards(s', kl, action_mask, kl_coef)   (-kl_coef*kl per token, s' on the last)
        G   = discounted_returns(r, action_mask, gamma)
        A   = masked_whiten(G, action_mask)

    The baseline must be taken from the raw scores before the KL penalty is mixed
    in, which is why this takes ``scores`` and ``kl`` rather than shaped rewards.
    """
    centered = dr_grpo_advantages(scores, group_size)
    token_rewards = shape_token_rewards(centered, kl, action_mask, kl_coef)
    return reinforce_pp_advantages(token_rewards, action_mask, gamma)


def broadcast_to_tokens(sequence_values: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Copy a per-sequence value onto every valid token of its row.

    Shapes: ``sequence_values [B]``, ``action_mask [B, A]`` -> ``[B, A]``.
    Formula: ``out[b, t] = sequence_values[b] * [action_mask[b, t]]``.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, A], got shape {tuple(action_mask.shape)}")
    if sequence_values.dim() != 1 or sequence_values.shape[0] != action_mask.shape[0]:
        raise ValueError(
            f"scores must be [B] with B={action_mask.shape[0]}, got shape {tuple(sequence_values.shape)}"
        )
    expanded = sequence_values[:, None].expand(action_mask.shape)
    return torch.where(as_bool_mask(action_mask), expanded, torch.zeros_like(expanded))


def sequence_to_token_advantages(
    sequence_advantages: torch.Tensor,
    action_mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token advantages of a group estimator (grpo, dr_grpo, rloo), with the KL penalty in the reward.

    Shapes: ``sequence_advantages [B]``, ``action_mask [B, A]``, optional ``kl [B, A]`` -> ``[B, A]``.
    As OpenRLHF: the sequence advantage is the reward of the row's last valid token, every valid token
    also gets ``-kl_coef * kl``, and the advantage is the undiscounted reward-to-go of these rewards:

        A[b, t] = seq_adv[b] + sum_{k >= t, k valid} -kl_coef * kl[b, k]     for valid t, 0 elsewhere

    Without a penalty (``kl`` None or ``kl_coef`` 0) this is :func:`broadcast_to_tokens`, bit for bit.
    """
    if kl is None or kl_coef == 0:
        return broadcast_to_tokens(sequence_advantages, action_mask)
    token_rewards = shape_token_rewards(sequence_advantages, kl, action_mask, kl_coef)
    # gamma 1: OpenRLHF forces it for the group estimators (their advantage is not a discounted return)
    return discounted_returns(token_rewards, action_mask, 1.0)


def _require(estimator: str, **arguments: object) -> None:
    for name, value in arguments.items():
        if value is None:
            raise ValueError(f"estimator {estimator!r} requires argument {name!r}")


def compute_advantages(
    estimator: str,
    *,
    action_mask: torch.Tensor,
    scores: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten_advantages: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to one estimator of ``ADVANTAGE_ESTIMATORS``; returns ``(advantages [B, A], returns [B, A])``.

    Inputs each estimator reads (others are ignored; a missing one raises ValueError):

    ======================== ==================================================== ======================================
    estimator                inputs                                               advantages / returns
    ======================== ==================================================== ======================================
    ``gae``                  token_rewards (KL-shaped), values, gamma, lam        :func:`gae`; whitened over valid tokens
                                                                                  iff ``whiten_advantages`` (returns are
                                                                                  from the unwhitened advantages)
    ``grpo``                 scores, group_size, eps; optional kl, kl_coef        :func:`grpo_advantages` per token (see
                                                                                  below) / raw score broadcast to tokens
    ``dr_grpo``              scores, group_size; optional kl, kl_coef             :func:`dr_grpo_advantages`, same
    ``rloo``                 scores, group_size; optional kl, kl_coef             :func:`rloo_advantages`, same
    ``reinforce_pp``         token_rewards (KL-shaped), gamma                     :func:`reinforce_pp_advantages`
    ``reinforce_pp_baseline`` scores (raw), kl, kl_coef, group_size, gamma        :func:`reinforce_pp_baseline_advantages`
    ======================== ==================================================== ======================================

    For the sequence-level estimators (grpo, dr_grpo, rloo) a KL penalty in the
    reward (``kl`` with ``kl_coef`` != 0: ``algo.kl_mode reward``) adds its
    reward-to-go to every token's advantage, see :func:`sequence_to_token_advantages`;
    with ``kl_coef`` 0 (KL as a loss term, :func:`learner.algo.losses.kl_loss`, or
    none) the sequence advantage is broadcast. They take no discount (``gamma`` is
    not used), and their "returns" (the raw score on every valid token) are read
    by nothing that trains: no critic uses them.
    ``whiten_advantages`` applies to ``gae`` only; the other estimators define
    their own normalisation, so asking to whiten them raises ValueError.
    Masked positions are 0 in both outputs.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if whiten_advantages and estimator != "gae":
        raise ValueError(f"whiten_advantages only applies to estimator 'gae', not {estimator!r}")

    if estimator == "gae":
        _require(estimator, token_rewards=token_rewards, values=values)
        advantages, returns = gae(token_rewards, values, action_mask, gamma, lam)
        if whiten_advantages:
            advantages = masked_whiten(advantages, action_mask)
        return advantages, returns

    if estimator in ("grpo", "dr_grpo", "rloo"):
        _require(estimator, scores=scores)
        if estimator == "grpo":
            sequence_advantages = grpo_advantages(scores, group_size, eps)
        elif estimator == "dr_grpo":
            sequence_advantages = dr_grpo_advantages(scores, group_size)
        else:
            sequence_advantages = rloo_advantages(scores, group_size)
        return (
            sequence_to_token_advantages(sequence_advantages.detach(), action_mask, kl, kl_coef),
            broadcast_to_tokens(scores.detach(), action_mask),
        )

    if estimator == "reinforce_pp":
        _require(estimator, token_rewards=token_rewards)
        return reinforce_pp_advantages(token_rewards, action_mask, gamma)

    _require(estimator, scores=scores, kl=kl)
    return reinforce_pp_baseline_advantages(scores, kl, action_mask, group_size, kl_coef, gamma)
