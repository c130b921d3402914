"""PPO-family loss terms over padded ``[B, A]`` per-token tensors.

Every loss reduces its per-token values with :func:`aggregate_loss`, so all of
them share the same aggregation modes and the same ``normalizer`` contract for
exactness across gradient accumulation and data parallelism.

Choosing ``normalizer`` (all losses): let one optimizer step consume M
micro-batches per rank (``grad_accum_steps``) on W data-parallel ranks, and let
N be the GLOBAL count the mode divides by, summed over all those micro-batches
and ranks: valid action tokens for ``"token_mean"``, sequences with at least one
valid token for the two ``"seq_mean_*"`` modes. DeepSpeed scales each
micro-batch loss by 1/M before backward and averages gradients over the W ranks,
so pass

    normalizer = N / (grad_accum_steps * world_size)

Each micro-batch loss is then ``local_sum / N * M * W``; DeepSpeed's 1/(M*W)
turns the accumulated gradient into exactly the gradient of ``global_sum / N``,
the full-batch loss. (For an engine that neither scales nor averages, pass N.)
For ``"seq_mean_token_sum_norm"`` also pass ``max_len`` (the configured maximum
response length), because the padded width ``A`` of a micro-batch varies.
"""

from __future__ import annotations

import torch

from protocol.config import AGGREGATION_MODES, IS_LEVELS, IS_MODES

from .kl import LOG_RATIO_BOUND, approx_kl
from .masked import as_bool_mask, masked_mean, masked_sum, require_same_shape

__all__ = [
    "AGGREGATION_MODES",
    "IS_LEVELS",
    "IS_MODES",
    "POLICY_RATIO_LEVELS",
    "aggregate_loss",
    "gspo_ratios",
    "policy_loss",
    "truncated_importance_weights",
    "value_loss",
    "entropy_bonus",
    "kl_loss",
]

POLICY_RATIO_LEVELS = ("token", "sequence")

Normalizer = float | int | torch.Tensor | None


def _check_token_tensor(name: str, tensor: torch.Tensor, action_mask: torch.Tensor) -> None:
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, A], got shape {tuple(action_mask.shape)}")
    require_same_shape(name, tensor, "action_mask", action_mask)


def _zero_masked(x: torch.Tensor, bool_mask: torch.Tensor) -> torch.Tensor:
    # Replace padding before any arithmetic: 0 * inf in a backward pass is NaN.
    return torch.where(bool_mask, x, torch.zeros_like(x))


def aggregate_loss(
    per_token_loss: torch.Tensor,
    action_mask: torch.Tensor,
    mode: str = "token_mean",
    normalizer: Normalizer = None,
    *,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, A]`` (mask ``[B, A]``) to a scalar.

    With L_bt the loss, m_bt the mask, n_b = sum_t m_bt and S the set of rows with n_b > 0:

        "token_mean"               sum_bt m_bt L_bt / D,            D = sum_b n_b
        "seq_mean_token_mean"      sum_{b in S} (sum_t m_bt L_bt / n_b) / D,     D = |S|
        "seq_mean_token_sum_norm"  sum_{b in S} (sum_t m_bt L_bt / max_len) / D, D = |S|
                                   (Dr. GRPO; max_len defaults to A)

    ``normalizer``, when given, replaces the local count D (see the module
    docstring for how to pick it); an empty batch without one gives 0.
    """
    _check_token_tensor("per_token_loss", per_token_loss, action_mask)
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if isinstance(normalizer, (int, float)) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    if max_len is not None and max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")

    bool_mask = as_bool_mask(action_mask)
    if mode == "token_mean":
        total = masked_sum(per_token_loss, bool_mask)
        local_count = bool_mask.sum()
    else:
        tokens_per_sequence = bool_mask.sum(dim=1)
        sequence_sums = masked_sum(per_token_loss, bool_mask, dim=1)
        if mode == "seq_mean_token_mean":
            per_sequence = sequence_sums / tokens_per_sequence.clamp(min=1).to(sequence_sums.dtype)
        else:
            per_sequence = sequence_sums / float(max_len if max_len is not None else per_token_loss.shape[1])
        total = per_sequence.sum()  # empty rows have a zero sum and add nothing
        local_count = (tokens_per_sequence > 0).sum()

    if normalizer is None:
        return total / local_count.clamp(min=1).to(total.dtype)
    return total / normalizer


def gspo_ratios(log_probs: torch.Tensor, old_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level importance ratio (Zheng et al. 2025) in its token-level gradient form.

    Shapes: ``log_probs`` (with grad), ``old_log_probs``, ``action_mask`` ``[B, A]`` -> ``[B, A]``.
    With n_b the valid tokens of row b and sg() stop-gradient:

        s_b  = exp(clamp(sum_{t valid} (log_probs_bt - old_log_probs_bt) / n_b, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        s_bt = sg(s_b) * exp(log_probs_bt - sg(log_probs_bt))        (valid t; 0 at masked positions)

    Every valid token of a row has the value s_b (the geometric mean of the row's token ratios), and
    d s_bt / d log_probs_bt = s_b: each token's gradient is scaled by its sequence's ratio, which is
    GSPO's gradient when a sequence's advantages are equal (GSPO-token otherwise).
    """
    _check_token_tensor("log_probs", log_probs, action_mask)
    _check_token_tensor("old_log_probs", old_log_probs, action_mask)
    bool_mask = as_bool_mask(action_mask)
    log_ratio = _zero_masked(log_probs.detach() - old_log_probs, bool_mask)
    mean_log_ratio = log_ratio.sum(dim=1) / bool_mask.sum(dim=1).clamp(min=1)
    sequence_ratio = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    own_log_prob = _zero_masked(log_probs, bool_mask)
    return _zero_masked(sequence_ratio[:, None] * torch.exp(own_log_prob - own_log_prob.detach()), bool_mask)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    importance_weights: torch.Tensor | None = None,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    normalizer: Normalizer = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate (Schulman et al. 2017), with asymmetric and dual clipping, or GSPO's.

    Shapes: ``log_probs`` (with grad), ``old_log_probs``, ``advantages``,
    ``action_mask`` and optional ``importance_weights`` all ``[B, A]`` ->
    ``(scalar loss, metrics)``. Per valid token:

        r     = clamp(log_probs - old_log_probs, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)    (20, as OpenRLHF)
        ratio = exp(r)                                        ratio_level "token" (PPO)
        ratio = gspo_ratios(log_probs, old_log_probs, mask)   ratio_level "sequence" (GSPO: every token of
                                                              a sequence has its sequence's ratio and clip)
        surr1 = ratio * A
        surr2 = clamp(ratio, 1 - clip_low, 1 + clip_high) * A
        l     = -min(surr1, surr2)
        l     = min(l, -dual_clip * A)    where A < 0, if dual_clip (Ye et al. 2020; needs dual_clip > 1)
        l     = l * importance_weights    if given (treated as constants: detached here)

    then ``aggregate_loss(l, action_mask, aggregation, normalizer, max_len=max_len)``.

    Metrics (detached 0-d tensors, over this call's valid tokens):
    ``clip_fraction`` (share of tokens where surr2 < surr1, i.e. the clip is active),
    ``approx_kl`` (k3 estimate of KL(old || new): mean of ratio - 1 - log ratio),
    ``ratio_mean``, ``ratio_max`` (of the bounded ratio), and ``dual_clip_fraction`` when
    ``dual_clip`` is set. GSPO is defined with ``aggregation="seq_mean_token_mean"`` and clip ranges
    of a few 1e-4 (the paper's 3e-4 below, 4e-4 above): a sequence ratio is a geometric mean and
    stays much closer to 1 than token ratios do.
    """
    _check_token_tensor("log_probs", log_probs, action_mask)
    _check_token_tensor("old_log_probs", old_log_probs, action_mask)
    _check_token_tensor("advantages", advantages, action_mask)
    if importance_weights is not None:
        _check_token_tensor("importance_weights", importance_weights, action_mask)
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if ratio_level not in POLICY_RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {POLICY_RATIO_LEVELS}, got {ratio_level!r}")

    bool_mask = as_bool_mask(action_mask)
    advantages = _zero_masked(advantages.detach(), bool_mask)
    if ratio_level == "token":
        # Bounded so that exp() stays finite: a runaway token then costs at most exp(20) * |A| and, outside
        # the bound, gives no gradient, instead of an inf/NaN loss.
        log_ratio = _zero_masked(log_probs - old_log_probs, bool_mask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ratio = torch.exp(log_ratio)
    else:
        ratio = gspo_ratios(log_probs, old_log_probs, bool_mask)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.min(surr1, surr2)
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > dual_bound)
        per_token = torch.where(dual_active, dual_bound, per_token)
    if importance_weights is not None:
        per_token = per_token * _zero_masked(importance_weights.detach(), bool_mask)

    loss = aggregate_loss(per_token, bool_mask, aggregation, normalizer, max_len=max_len)

    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((surr2 < surr1).to(ratio.dtype), bool_mask),
            "approx_kl": masked_mean(approx_kl(old_log_probs, log_probs, "k3", None, bool_mask), bool_mask),
            "ratio_mean": masked_mean(ratio, bool_mask),
            # ratio > 0, so zeros at masked positions never win the max (and an empty batch gives 0).
            "ratio_max": _zero_masked(ratio, bool_mask).max(),
        }
        if dual_clip is not None:
            metrics["dual_clip_fraction"] = masked_mean(dual_active.to(ratio.dtype), bool_mask)
    return loss, {name: value.detach() for name, value in metrics.items()}


def truncated_importance_weights(
    learner_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "clamp",
    cap: float = 2.0,
    floor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights correcting for the rollout engine's (behaviour) policy.

    Shapes: ``learner_log_probs`` (the learner's log-probs of the OLD policy, i.e.
    the same weights that generated, recomputed by the training engine),
    ``behaviour_log_probs`` (what the rollout engine reported), ``action_mask``
    all ``[B, A]`` -> ``(weights [B, A] detached, metrics)``. With d_bt = learner_bt - behaviour_bt
    and n_b the valid tokens of row b, each unit of truncation has a statistic w:

        level="token":               w_bt = exp(d_bt)                       unit: a token
        level="sequence":            w_b  = exp(sum_{t valid} d_bt)          unit: a sequence
        level="sequence_geometric":  w_b  = exp(sum_{t valid} d_bt / n_b)    unit: a sequence (geometric
                                                                             mean of its token ratios)

    and a unit is out of band when w < floor or w > cap:

        mode="clamp":  weight = clamp(w, floor, cap)              (truncated IS; token and sequence only)
        mode="mask":   weight = w if floor <= w <= cap else 0     (drop outliers)

    For "token" and "sequence" every valid token of a unit gets the unit's weight. For
    "sequence_geometric" (mask only) w only decides which sequences are dropped; the tokens of a kept
    sequence get their own token ratio exp(d_bt), as OpenRLHF 0.11's sequence-level mask does
    (unbounded per token: the band bounds the sequence's geometric mean). ``floor`` 0 is no lower
    bound. Masked positions get weight 0. Metrics (detached, over the units: valid tokens for "token",
    non-empty sequences otherwise): ``is_weight_mean`` and ``is_weight_max`` of w before truncation,
    and ``is_truncated_fraction`` (share of units out of band).
    """
    _check_token_tensor("learner_log_probs", learner_log_probs, action_mask)
    _check_token_tensor("behaviour_log_probs", behaviour_log_probs, action_mask)
    if level not in IS_LEVELS:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if level == "sequence_geometric" and mode != "mask":
        raise ValueError("level 'sequence_geometric' only masks whole sequences: mode must be 'mask'")
    if not 0 <= floor < cap:
        raise ValueError(f"need 0 <= floor < cap, got floor {floor}, cap {cap}")

    bool_mask = as_bool_mask(action_mask)
    with torch.no_grad():
        log_weights = _zero_masked(learner_log_probs - behaviour_log_probs, bool_mask)
        if level == "token":
            raw = torch.exp(log_weights)
            unit_mask = bool_mask
        else:
            unit_mask = bool_mask.any(dim=1)
            sequence_log_weights = log_weights.sum(dim=1)
            if level == "sequence_geometric":
                sequence_log_weights = sequence_log_weights / bool_mask.sum(dim=1).clamp(min=1)
            raw = torch.exp(sequence_log_weights)
        out_of_band = (raw < floor) | (raw > cap)
        if level == "sequence_geometric":
            weights = torch.where(out_of_band[:, None], torch.zeros_like(log_weights), torch.exp(log_weights))
        else:
            kept = raw.clamp(min=floor, max=cap) if mode == "clamp" else torch.where(out_of_band, 0.0, raw)
            weights = kept if level == "token" else kept[:, None].expand_as(log_weights)
        weights = _zero_masked(weights, bool_mask)
        metrics = {
            "is_weight_mean": masked_mean(raw, unit_mask),
            "is_weight_max": _zero_masked(raw, unit_mask).max(),
            "is_truncated_fraction": masked_mean(out_of_band.to(raw.dtype), unit_mask),
        }
    return weights, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
    aggregation: str = "token_mean",
    normalizer: Normalizer = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic regression loss, optionally with PPO-style value clipping.

    Shapes: ``values`` (with grad), ``old_values``, ``returns``, ``action_mask``
    all ``[B, A]`` -> ``(scalar loss, metrics)``. Per valid token:

        clip_eps None:  l = 0.5 * (V - R)^2
        otherwise:      V_clipped = V_old + clamp(V - V_old, -clip_eps, clip_eps)
                        l = 0.5 * max((V - R)^2, (V_clipped - R)^2)

    reduced with :func:`aggregate_loss`. Metrics (detached): ``value_clip_fraction``
    (share of valid tokens where the clipped term is strictly larger, i.e. chosen;
    0 without clipping) and ``value_mean``.
    """
    _check_token_tensor("values", values, action_mask)
    _check_token_tensor("old_values", old_values, action_mask)
    _check_token_tensor("returns", returns, action_mask)
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive or None, got {clip_eps}")

    bool_mask = as_bool_mask(action_mask)
    values = _zero_masked(values, bool_mask)
    returns = _zero_masked(returns.detach(), bool_mask)
    unclipped = (values - returns).square()
    if clip_eps is None:
        squared_error = unclipped
        clip_active = torch.zeros_like(bool_mask)
    else:
        old_values = _zero_masked(old_values.detach(), bool_mask)
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (clipped_values - returns).square()
        squared_error = torch.max(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate_loss(0.5 * squared_error, bool_mask, aggregation, normalizer, max_len=max_len)
    with torch.no_grad():
        metrics = {
            "value_clip_fraction": masked_mean(clip_active.to(values.dtype), bool_mask),
            "value_mean": masked_mean(values, bool_mask),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


def entropy_bonus(
    entropy: torch.Tensor,
    action_mask: torch.Tensor,
    coef: float,
    *,
    aggregation: str = "token_mean",
    normalizer: Normalizer = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Entropy bonus term, to be SUBTRACTED from the loss: ``loss = pg_loss - entropy_bonus(...)``.

    Shapes: ``entropy [B, A]`` (per-token policy entropy), ``action_mask [B, A]`` -> scalar.
    Formula: ``coef * aggregate_loss(entropy, action_mask, aggregation, normalizer, max_len=max_len)``,
    so a positive ``coef`` rewards higher entropy once subtracted.
    """
    return coef * aggregate_loss(entropy, action_mask, aggregation, normalizer, max_len=max_len)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    estimator: str = "k3",
    clamp: float | None = 10.0,
    aggregation: str = "token_mean",
    normalizer: Normalizer = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term (GRPO style), to be ADDED as ``kl_coef * kl_loss(...)``.

    Shapes: ``log_probs`` (with grad), ``ref_log_probs``, ``action_mask`` ``[B, A]`` -> scalar.
    Formula: ``aggregate_loss(approx_kl(log_probs, ref_log_probs, estimator, clamp, action_mask),
    action_mask, aggregation, normalizer, max_len=max_len)``; with the default
    ``"token_mean"`` and no normalizer this is the masked mean of the estimator.
    Lives here rather than in :mod:`learner.algo.kl` to share the aggregation.
    """
    per_token = approx_kl(log_probs, ref_log_probs.detach(), estimator, clamp, action_mask)
    return aggregate_loss(per_token, action_mask, aggregation, normalizer, max_len=max_len)
