"""Per-token KL estimators and KL-coefficient controllers.

The estimators follow J. Schulman, "Approximating KL Divergence" (2020): with
samples drawn from the current policy pi and ``log_ratio = log pi - log pi_ref``,
each ``k`` is a per-token estimate of KL(pi || pi_ref).
"""

from __future__ import annotations

import torch

from protocol.config import KL_ESTIMATORS

from .masked import as_bool_mask, require_same_shape

__all__ = ["KL_ESTIMATORS", "LOG_RATIO_BOUND", "approx_kl", "FixedKLController", "AdaptiveKLController"]

#: Log-ratios are bounded to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] before exp() (OpenRLHF's value):
#: exp(20) ~ 4.85e8 is finite in float32 and bfloat16, and so is its gradient.
LOG_RATIO_BOUND = 20.0


def approx_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    estimator: str = "k3",
    clamp: float | None = 10.0,
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) for tokens sampled from pi.

    Shapes: ``log_probs``, ``ref_log_probs`` and the optional ``action_mask`` are
    all ``[B, A]`` (any identical shape works); the result has the same shape.

    With ``r = log_probs - ref_log_probs`` and ``r_b = clamp(r, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)``:

        k1 = r                           (unbiased, high variance, can be < 0)
        k2 = r^2 / 2                     (biased, low variance, >= 0)
        k3 = exp(-r_b) - 1 + r_b         (unbiased, low variance, >= 0)
        kl = clamp(k, -clamp, clamp)     (every estimator; ``clamp=None`` skips this)

    The output clamp is OpenRLHF's (default 10). k3 is evaluated at the bounded
    log-ratio so that exp() and its gradient stay finite: clamping only the
    output would give a 0 * inf = NaN gradient at r < -88 in float32. The values
    equal an output-only clamp at any ``clamp`` <= 19, since |r| > 20 already
    gives k3 > 19. Outlier metrics pass ``clamp=None`` to see unclamped estimates.

    When ``action_mask`` is given, masked positions are exactly 0 (their inputs
    are ignored, so padding garbage cannot produce NaN/inf).
    """
    require_same_shape("ref_log_probs", ref_log_probs, "log_probs", log_probs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"clamp must be positive or None, got {clamp}")

    log_ratio = log_probs - ref_log_probs
    if action_mask is not None:
        require_same_shape("action_mask", action_mask, "log_probs", log_probs)
        bool_mask = as_bool_mask(action_mask)
        # Zero the ratio before any arithmetic so padding never reaches exp().
        log_ratio = torch.where(bool_mask, log_ratio, torch.zeros_like(log_ratio))

    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio.square() / 2
    else:
        bounded = log_ratio.clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
        kl = torch.exp(-bounded) - 1 + bounded
    if clamp is not None:
        kl = kl.clamp(min=-clamp, max=clamp)

    if action_mask is not None:
        kl = torch.where(bool_mask, kl, torch.zeros_like(kl))
    return kl


class FixedKLController:
    """Constant KL coefficient. ``value`` is ``coef``; ``update`` is a no-op."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the observation: the coefficient is fixed."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    Drives the observed KL toward ``target``; after each batch of ``n_steps`` samples:

        proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
        value             *= 1 + proportional_error * n_steps / horizon
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one multiplicative update from the observed mean KL of ``n_steps`` samples."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
