"""PPO math layer: small pure functions over padded ``[B, A]`` token tensors.

Submodules: :mod:`.masked` (masked reductions), :mod:`.kl` (KL estimators and
controllers), :mod:`.rewards` (reward math: combining, clipping, shaping), :mod:`.advantages` (advantage
estimators and dispatcher), :mod:`.losses` (loss terms and aggregation), :mod:`.schedule` (the learning-rate
schedule), :mod:`.evaluation` (held-out evaluation metrics), :mod:`.filtering` (dynamic sampling's
group selection).
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
)
from .evaluation import pass_at_k
from .filtering import informative_groups, select_groups
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, approx_kl
from .losses import (
    AGGREGATION_MODES,
    aggregate_loss,
    entropy_bonus,
    gspo_ratios,
    kl_loss,
    policy_loss,
    truncated_importance_weights,
    value_loss,
)
from .masked import masked_mean, masked_sum, masked_whiten
from .rewards import clip_rewards, combine_rewards, last_action_index, overlong_penalty, shape_token_rewards
from .schedule import LR_SCHEDULES, lr_at

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "LR_SCHEDULES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "approx_kl",
    "broadcast_to_tokens",
    "clip_rewards",
    "combine_rewards",
    "compute_advantages",
    "discounted_returns",
    "dr_grpo_advantages",
    "entropy_bonus",
    "gae",
    "grpo_advantages",
    "gspo_ratios",
    "informative_groups",
    "kl_loss",
    "last_action_index",
    "lr_at",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "overlong_penalty",
    "pass_at_k",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "select_groups",
    "sequence_to_token_advantages",
    "shape_token_rewards",
    "truncated_importance_weights",
    "value_loss",
]
