"""Hand-computed checks of the PPO math layer (learner.algo).

Expected values are written out from the formulas in each docstring, never
obtained by calling a second implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.algo import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    approx_kl,
    clip_rewards,
    combine_rewards,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    entropy_bonus,
    gae,
    grpo_advantages,
    gspo_ratios,
    kl_loss,
    lr_at,
    masked_mean,
    masked_sum,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    shape_token_rewards,
    truncated_importance_weights,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Shared 2x3 batch: row 0 has 3 action tokens, row 1 has 2 (right padding).
MASK = t([[1, 1, 1], [1, 1, 0]], torch.bool)


# ----------------------------------------------------------------------------- masked


def test_masked_sum_and_mean_ignore_padding_garbage():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    close(masked_sum(x, MASK), 15.0)
    close(masked_mean(x, MASK), 3.0)
    close(masked_sum(x, MASK, dim=1), [6.0, 9.0])
    close(masked_mean(x, MASK, dim=1), [2.0, 4.5])
    close(masked_mean(x, MASK.double(), dim=0), [2.5, 3.5, 3.0])  # float 0/1 mask works too


def test_masked_mean_of_empty_mask_is_zero():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    close(masked_mean(x, empty), 0.0)
    close(masked_mean(x, t([[1, 1], [0, 0]], torch.bool), dim=1), [1.5, 0.0])


def test_masked_whiten_population_variance_and_shift_mean():
    x = t([[1.0, 2.0], [3.0, 100.0]])
    mask = t([[1, 1], [1, 0]], torch.bool)
    # mean 2, population var = (1 + 0 + 1) / 3 = 2/3, so the deviations +-1 become +-sqrt(3/2)
    scaled = math.sqrt(1.5)
    close(masked_whiten(x, mask, eps=0.0), [[-scaled, 0.0], [scaled, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False, eps=0.0), [[2.0 - scaled, 2.0], [2.0 + scaled, 0.0]])
    # one valid element: variance 0, the centered value 0 stays 0 (no division by n - 1 = 0)
    close(masked_whiten(x, t([[1, 0], [0, 0]], torch.bool)), [[0.0, 0.0], [0.0, 0.0]])


def test_masked_shape_mismatch_names_mask():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 2))


# ----------------------------------------------------------------------------- kl


def test_approx_kl_estimators():
    log_probs = t([-1.0, -2.0])
    ref = t([-1.5, -1.0])  # log_ratio = [0.5, -1.0]
    close(approx_kl(log_probs, ref, "k1"), [0.5, -1.0])
    close(approx_kl(log_probs, ref, "k2"), [0.125, 0.5])
    close(approx_kl(log_probs, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])


def test_approx_kl_clamps_every_estimators_output():
    # log_ratio 30: k1 = 30, k2 = 450, k3 = exp(-30) - 1 + 30 ~ 29; log_ratio -10: k3 = exp(10) - 11 ~ 22015.
    for estimator in ("k1", "k2", "k3"):
        close(approx_kl(t([30.0]), t([0.0]), estimator, clamp=10.0), [10.0])
    close(approx_kl(t([-30.0, 0.5]), t([0.0, 0.0]), "k1", clamp=10.0), [-10.0, 0.5])  # k1 < 0 clamps below
    close(approx_kl(t([-10.0, 0.5]), t([0.0, 0.0]), "k3", clamp=10.0), [10.0, math.exp(-0.5) - 0.5])


def test_approx_kl_without_clamp_gives_raw_values_and_k3_bounds_its_log_ratio():
    close(approx_kl(t([30.0, -1.0]), t([0.0, 0.0]), "k1", clamp=None), [30.0, -1.0])
    close(approx_kl(t([30.0]), t([0.0]), "k2", clamp=None), [450.0])
    close(approx_kl(t([-10.0, 19.0]), t([0.0, 0.0]), "k3", clamp=None), [math.exp(10.0) - 11.0, math.exp(-19.0) + 18.0])
    # k3 is evaluated at the log-ratio bounded to [-20, 20], so exp stays finite even in float32.
    k3 = approx_kl(t([-100.0, 30.0], torch.float32), torch.zeros(2), "k3", clamp=None)
    assert k3[0].item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-6)
    assert k3[1].item() == pytest.approx(math.exp(-20.0) + 19.0, rel=1e-6)


def test_approx_kl_k3_gradient_finite_far_outside_the_bounds():
    # float32 exp(100) is inf: clamping only the output would give 0 * inf = NaN in backward.
    log_probs = t([-100.0, 100.0, -0.5], torch.float32).requires_grad_()
    kl = approx_kl(log_probs, torch.zeros(3), "k3", clamp=10.0)
    kl.sum().backward()
    close(kl.detach(), [10.0, 10.0, math.exp(0.5) - 1.5], atol=1e-6)
    close(log_probs.grad, [0.0, 0.0, 1 - math.exp(0.5)], atol=1e-6)  # d k3 / d r = 1 - exp(-r)


def test_approx_kl_masked_positions_are_zero_even_with_garbage():
    log_probs = t([[-1.0, INF], [NAN, -0.5]]).requires_grad_()
    ref = t([[-2.0, 0.0], [0.0, -0.5]])
    mask = t([[1, 0], [0, 1]], torch.bool)
    kl = approx_kl(log_probs, ref, "k3", action_mask=mask)
    close(kl.detach(), [[math.exp(-1.0) - 1 + 1.0, 0.0], [0.0, 0.0]])
    kl.sum().backward()
    assert torch.isfinite(log_probs.grad).all()


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05

    too_high = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    too_high.update(9.0, 256)  # 9/6 - 1 = 0.5 -> clipped to 0.2
    assert too_high.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    on_target = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    on_target.update(6.0, 256)
    assert on_target.value == pytest.approx(0.1)
    slightly_low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    slightly_low.update(5.4, 100)  # 5.4/6 - 1 = -0.1, not clipped
    assert slightly_low.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    too_low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    too_low.update(0.0, 256)  # -1 -> clipped to -0.2
    assert too_low.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))


def test_kl_loss_is_masked_mean_of_estimator():
    log_probs = t([[-1.0, -2.0, 5.0]])
    ref = t([[-1.5, -1.0, 0.0]])
    mask = t([[1, 1, 0]], torch.bool)
    expected = ((math.exp(-0.5) - 0.5) + (math.exp(1.0) - 2.0)) / 2
    close(kl_loss(log_probs, ref, mask), expected)
    close(kl_loss(log_probs, ref, mask, estimator="k2"), (0.125 + 0.5) / 2)


# ----------------------------------------------------------------------------- rewards


def test_shape_token_rewards_ragged_rows():
    scores = t([1.0, -0.5, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0], [0.6, NAN, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]], torch.bool)
    rewards = shape_token_rewards(scores, kl, mask, kl_coef=0.5)
    close(
        rewards,
        [
            [-0.05, -0.1, -0.15 + 1.0],
            [-0.2, 0.1 - 0.5, 0.0],
            [-0.3 + 2.0, 0.0, 0.0],
        ],
    )


def test_shape_token_rewards_empty_row_is_zero_and_shapes_checked():
    rewards = shape_token_rewards(t([1.0, 3.0]), t([[0.0, 0.0], [0.0, 0.0]]), t([[1, 0], [0, 0]], torch.bool), 0.1)
    close(rewards, [[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="scores"):
        shape_token_rewards(t([1.0]), torch.zeros(2, 3, dtype=torch.float64), MASK, 0.1)
    with pytest.raises(ValueError, match="action_mask"):
        shape_token_rewards(t([1.0, 2.0]), torch.zeros(2, 4, dtype=torch.float64), MASK, 0.1)


def test_overlong_penalty_by_hand():
    # M = 10, B = 4: free up to 6 tokens, then -factor * (L - 6) / 4, at most -factor
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    close(overlong_penalty(lengths, max_new_tokens=10, buffer=4, factor=0.5).double(),
          [0.0, 0.0, -0.125, -0.375, -0.5, -0.5])
    # the buffer may be the whole length: the penalty grows from the first token
    close(overlong_penalty(torch.tensor([0, 1, 2]), max_new_tokens=2, buffer=2, factor=1.0).double(), [0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_new_tokens=10, buffer=11, factor=1.0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_new_tokens=10, buffer=0, factor=1.0)
    with pytest.raises(ValueError, match="factor"):
        overlong_penalty(lengths, max_new_tokens=10, buffer=4, factor=-1.0)


def test_clip_rewards():
    close(clip_rewards(t([-7.0, 0.5, 3.0]), 2.0), [-2.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="positive"):
        clip_rewards(t([1.0]), 0.0)


def test_combine_rewards():
    # 1*1 + 0.5*10 = 6, 1*2 + 0.5*0 = 2
    total = combine_rewards({"a": t([1.0, 2.0]), "b": t([10.0, 0.0])}, {"a": 1.0, "b": 0.5})
    assert total.dtype == torch.float64 and total.tolist() == [6.0, 2.0]
    with pytest.raises(ValueError, match="same keys"):
        combine_rewards({"a": t([1.0])}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="one B"):
        combine_rewards({"a": t([1.0]), "b": t([1.0, 2.0])}, {"a": 1.0, "b": 1.0})


# ----------------------------------------------------------------------------- advantages


def test_gae_by_hand():
    rewards = t([[0.1, -0.2, 1.0], [0.0, 2.0, 9.0]])
    values = t([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0: delta2 = 1.0 - 0.3 = 0.7; delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33; delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    #        A2 = 0.7; A1 = -0.33 + 0.72*0.7 = 0.174; A0 = -0.04 + 0.72*0.174 = 0.08528
    # row 1 (padding at t=2 ignored): delta1 = 2.0 - 0.5 = 1.5; delta0 = 0.9*0.5 - 1.0 = -0.55
    #        A1 = 1.5; A0 = -0.55 + 0.72*1.5 = 0.53
    close(advantages, [[0.08528, 0.174, 0.7], [0.53, 1.5, 0.0]])
    close(returns, [[0.58528, 0.574, 1.0], [1.53, 2.0, 0.0]])


def test_gae_whitening_flag_via_dispatcher():
    rewards = t([[0.1, -0.2, 1.0], [0.0, 2.0, 9.0]])
    values = t([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    advantages, returns = compute_advantages(
        "gae", token_rewards=rewards, values=values, action_mask=MASK, gamma=0.9, lam=0.8, whiten_advantages=True
    )
    raw = [0.08528, 0.174, 0.7, 0.53, 1.5]
    mean = sum(raw) / 5
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 5 + 1e-8)  # population variance
    close(advantages, [[(a - mean) / std for a in raw[:3]], [(raw[3] - mean) / std, (raw[4] - mean) / std, 0.0]])
    close(returns, [[0.58528, 0.574, 1.0], [1.53, 2.0, 0.0]])  # returns come from unwhitened advantages


def test_grpo_dr_grpo_rloo_groups():
    scores = t([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    std1 = math.sqrt(1.0 / 3)  # deviations +-0.5, unbiased: 4*0.25/3
    std2 = math.sqrt(20.0 / 3)  # deviations -1, 1, 3, -3
    eps = 1e-6
    close(
        grpo_advantages(scores, 4, eps),
        [0.5 / (std1 + eps), -0.5 / (std1 + eps), -0.5 / (std1 + eps), 0.5 / (std1 + eps)]
        + [d / (std2 + eps) for d in (-1.0, 1.0, 3.0, -3.0)]
        + [0.0] * 4,
    )
    close(dr_grpo_advantages(scores, 4), [0.5, -0.5, -0.5, 0.5, -1.0, 1.0, 3.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    close(
        rloo_advantages(scores, 4),
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 2 - 10 / 3, 4 - 8 / 3, 6 - 6 / 3, 0 - 12 / 3, 0, 0, 0, 0],
    )


@pytest.mark.parametrize("function", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_group_functions_reject_ragged_batches(function):
    with pytest.raises(ValueError, match="group_size"):
        function(t([1.0, 2.0, 3.0, 4.0, 5.0]), 2)


@pytest.mark.parametrize("function", [grpo_advantages, rloo_advantages])
def test_group_functions_needing_two_samples_reject_group_size_one(function):
    with pytest.raises(ValueError, match="group_size"):
        function(t([1.0, 2.0]), 1)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_dispatcher_broadcasts_sequence_advantages_to_valid_tokens(estimator):
    scores = t([1.0, 3.0])
    advantages, returns = compute_advantages(estimator, scores=scores, action_mask=MASK, group_size=2)
    # group [1, 3]: mean 2, unbiased std sqrt(2); dr_grpo -> +-1; rloo -> 1 - 3 = -2, 3 - 1 = 2
    per_sequence = {"grpo": 1.0 / (math.sqrt(2.0) + 1e-6), "dr_grpo": 1.0, "rloo": 2.0}[estimator]
    close(advantages, [[-per_sequence] * 3, [per_sequence, per_sequence, 0.0]])
    close(returns, [[1.0, 1.0, 1.0], [3.0, 3.0, 0.0]])


# 2 groups of 2 rows, 3 tokens; row 1 is padded after 2 tokens (its 9.0 is garbage).
GROUP_SCORES = t([1.0, 0.0, 3.0, 1.0])
GROUP_MASK = t([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], torch.bool)
GROUP_KL = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [-0.1, 0.0, 0.2], [0.3, 0.3, 0.3]])
# Reward-to-go of -0.5 * kl over each row's valid tokens (gamma 1).
KL_REWARD_TO_GO = [[-0.3, -0.25, -0.15], [-0.45, -0.25, 0.0], [-0.05, -0.1, -0.1], [-0.45, -0.3, -0.15]]
GROUP_SEQUENCE_ADVANTAGES = {
    # groups [1, 0] and [3, 1]: unbiased stds sqrt(0.5) and sqrt(2)
    "grpo": [0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6),
             1.0 / (math.sqrt(2.0) + 1e-6), -1.0 / (math.sqrt(2.0) + 1e-6)],
    "dr_grpo": [0.5, -0.5, 1.0, -1.0],
    "rloo": [1.0, -1.0, 2.0, -2.0],
}


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_add_the_kl_reward_to_go(estimator):
    advantages, returns = compute_advantages(
        estimator, scores=GROUP_SCORES, kl=GROUP_KL, kl_coef=0.5, action_mask=GROUP_MASK, group_size=2
    )
    sequence = GROUP_SEQUENCE_ADVANTAGES[estimator]
    expected = [[a + kl if valid else 0.0 for kl, valid in zip(row, mask_row)]
                for a, row, mask_row in zip(sequence, KL_REWARD_TO_GO, GROUP_MASK.tolist())]
    close(advantages, expected)
    close(returns, [[1.0] * 3, [0.0] * 3, [3.0] * 3, [1.0] * 3])  # the raw score on every valid token


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_without_kl_penalty_broadcast_the_sequence_advantage(estimator):
    without_kl = compute_advantages(estimator, scores=GROUP_SCORES, action_mask=GROUP_MASK, group_size=2)
    zero_coef = compute_advantages(
        estimator, scores=GROUP_SCORES, kl=GROUP_KL, kl_coef=0.0, action_mask=GROUP_MASK, group_size=2
    )
    sequence = GROUP_SEQUENCE_ADVANTAGES[estimator]
    close(without_kl[0], [[a * valid for valid in mask_row] for a, mask_row in zip(sequence, GROUP_MASK.tolist())])
    for before, after in zip(without_kl, zero_coef):
        assert torch.equal(before, after)


def test_discounted_returns_by_hand():
    rewards = t([[0.1, -0.2, 1.0], [0.0, 2.0, 9.0]])
    # row 0: G2 = 1.0, G1 = -0.2 + 0.9*1.0 = 0.7, G0 = 0.1 + 0.9*0.7 = 0.73; row 1: G1 = 2.0, G0 = 1.8
    close(discounted_returns(rewards, MASK, 0.9), [[0.73, 0.7, 1.0], [1.8, 2.0, 0.0]])


def test_reinforce_pp_whitens_returns_over_all_valid_tokens():
    rewards = t([[0.1, -0.2, 1.0], [0.0, 2.0, 9.0]])
    advantages, returns = reinforce_pp_advantages(rewards, MASK, 0.9)
    valid = [0.73, 0.7, 1.0, 1.8, 2.0]
    mean = 6.23 / 5
    std = math.sqrt(sum((g - mean) ** 2 for g in valid) / 5 + 1e-8)  # population variance
    close(returns, [[0.73, 0.7, 1.0], [1.8, 2.0, 0.0]])
    close(advantages, [[(g - mean) / std for g in valid[:3]], [(1.8 - mean) / std, (2.0 - mean) / std, 0.0]])
    dispatched, _ = compute_advantages("reinforce_pp", token_rewards=rewards, action_mask=MASK, gamma=0.9)
    close(dispatched, advantages)


def test_reinforce_pp_baseline_by_hand():
    scores = t([1.0, 3.0])  # group of 2 -> centered [-1, 1]
    kl = t([[0.2, 0.0], [0.0, 0.4]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    # token rewards (kl_coef 0.5): [[-0.1, -1.0], [0.0, 1.0 - 0.2]]; gamma 1 returns: [[-1.1, -1.0], [0.8, 0.8]]
    returns_by_hand = [-1.1, -1.0, 0.8, 0.8]
    mean = -0.125
    std = math.sqrt(sum((g - mean) ** 2 for g in returns_by_hand) / 4 + 1e-8)  # population variance
    expected = [[(-1.1 - mean) / std, (-1.0 - mean) / std], [(0.8 - mean) / std, (0.8 - mean) / std]]
    advantages, returns = reinforce_pp_baseline_advantages(scores, kl, mask, 2, 0.5, 1.0)
    close(returns, [[-1.1, -1.0], [0.8, 0.8]])
    close(advantages, expected)
    dispatched, _ = compute_advantages(
        "reinforce_pp_baseline", scores=scores, kl=kl, kl_coef=0.5, action_mask=mask, group_size=2, gamma=1.0
    )
    close(dispatched, expected)


def test_dispatcher_validation():
    assert ADVANTAGE_ESTIMATORS == ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages("ppo2", scores=t([1.0, 2.0]), action_mask=MASK)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", token_rewards=torch.zeros(2, 3, dtype=torch.float64), action_mask=MASK)
    with pytest.raises(ValueError, match="kl"):
        compute_advantages("reinforce_pp_baseline", scores=t([1.0, 2.0]), action_mask=MASK, group_size=2)
    with pytest.raises(ValueError, match="whiten_advantages"):
        compute_advantages("grpo", scores=t([1.0, 2.0]), action_mask=MASK, group_size=2, whiten_advantages=True)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages("grpo", scores=t([1.0, 2.0]), action_mask=MASK, group_size=3)
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros(2, 3), torch.zeros(2, 2), MASK, 1.0, 1.0)


# ----------------------------------------------------------------------------- policy loss

# ratio row 0 = [1.5, 0.7, 1.1], row 1 = [0.5, 3.0, pad]; old log-probs are nonzero on purpose.
OLD_LOG_PROBS = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
RATIOS = [[1.5, 0.7, 1.1], [0.5, 3.0]]
ADVANTAGES = t([[1.0, -2.0, 0.5], [1.0, -1.0, NAN]])


def _policy_log_probs():
    log_probs = OLD_LOG_PROBS.clone()
    for row, ratios in enumerate(RATIOS):
        for col, ratio in enumerate(ratios):
            log_probs[row, col] += math.log(ratio)
    log_probs[1, 2] = 50.0  # padding garbage: exp would overflow if it were used
    return log_probs.requires_grad_()


# Per-token losses with clip 0.2 (surr1 = r*A, surr2 = clamp(r, 0.8, 1.2)*A, l = -min):
#   (1.5, 1): min(1.5, 1.2) -> -1.2 (clipped)   (0.7, -2): min(-1.4, -1.6) -> 1.6 (clipped)
#   (1.1, .5): 0.55 both -> -0.55               (0.5, 1): min(0.5, 0.8) -> -0.5
#   (3.0, -1): min(-3.0, -1.2) -> 3.0
PER_TOKEN = [[-1.2, 1.6, -0.55], [-0.5, 3.0]]


def test_policy_loss_token_mean_and_metrics():
    log_probs = _policy_log_probs()
    loss, metrics = policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK)
    close(loss.detach(), (-1.2 + 1.6 - 0.55 - 0.5 + 3.0) / 5)
    close(metrics["clip_fraction"], 2 / 5)
    close(metrics["ratio_mean"], (1.5 + 0.7 + 1.1 + 0.5 + 3.0) / 5)
    close(metrics["ratio_max"], 3.0)
    close(metrics["approx_kl"], sum(r - 1 - math.log(r) for r in (1.5, 0.7, 1.1, 0.5, 3.0)) / 5)
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())
    loss.backward()
    # d l / d log_prob = -r*A where the unclipped surrogate is active, 0 where clipped; token_mean divides by 5.
    close(log_probs.grad, [[0.0, 0.0, -1.1 * 0.5 / 5], [-0.5 * 1.0 / 5, 3.0 / 5, 0.0]])


def test_policy_loss_asymmetric_clip():
    # clip_high 0.6: the 1.5 ratio is no longer clipped -> -1.5 instead of -1.2.
    loss, metrics = policy_loss(_policy_log_probs(), OLD_LOG_PROBS, ADVANTAGES, MASK, clip_low=0.2, clip_high=0.6)
    close(loss.detach(), (-1.5 + 1.6 - 0.55 - 0.5 + 3.0) / 5)
    close(metrics["clip_fraction"], 1 / 5)


def test_policy_loss_dual_clip():
    # c = 2: the (3.0, A=-1) token is bounded by -c*A = 2.0; the (0.7, A=-2) token (1.6 < 4) is unchanged.
    log_probs = _policy_log_probs()
    loss, metrics = policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, dual_clip=2.0)
    close(loss.detach(), (-1.2 + 1.6 - 0.55 - 0.5 + 2.0) / 5)
    close(metrics["dual_clip_fraction"], 1 / 5)
    loss.backward()
    close(log_probs.grad, [[0.0, 0.0, -0.55 / 5], [-0.5 / 5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, dual_clip=1.0)


def test_policy_loss_importance_weights_multiply_per_token_loss():
    weights = t([[2.0, 0.5, 1.0], [0.0, 1.0, 7.0]])
    loss, _ = policy_loss(_policy_log_probs(), OLD_LOG_PROBS, ADVANTAGES, MASK, importance_weights=weights)
    close(loss.detach(), (-1.2 * 2.0 + 1.6 * 0.5 - 0.55 + 0.0 + 3.0) / 5)


# GSPO: one ratio per sequence, the geometric mean of its token ratios:
#   s0 = (1.5 * 0.7 * 1.1)^(1/3) = 1.155^(1/3) = 1.0492 (inside [0.8, 1.2]),  s1 = (0.5 * 3.0)^(1/2) = 1.2247 (above)
GSPO_S0, GSPO_S1 = 1.155 ** (1 / 3), 1.5 ** 0.5


def test_gspo_ratios_value_is_the_sequence_ratio_and_gradient_is_scaled_by_it():
    log_probs = _policy_log_probs()  # row 1's padding holds 50: it must not reach s1
    ratios = gspo_ratios(log_probs, OLD_LOG_PROBS, MASK)
    close(ratios.detach(), [[GSPO_S0] * 3, [GSPO_S1, GSPO_S1, 0.0]])
    ratios.sum().backward()
    # d s_bt / d log_probs_bt = s_b, and nothing flows through the sequence mean to the other tokens
    close(log_probs.grad, [[GSPO_S0] * 3, [GSPO_S1, GSPO_S1, 0.0]])


def test_gspo_policy_loss_clips_whole_sequences():
    # row 0 (A = [1, -2, 0.5]) is inside the clip: l = -s0 * A;  row 1 is above 1.2: A = 1 takes the clipped
    # -1.2 (no gradient), A = -1 the unclipped s1 (surr1 = -s1 < surr2 = -1.2)
    log_probs = _policy_log_probs()
    loss, metrics = policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, ratio_level="sequence",
                                aggregation="seq_mean_token_mean")
    row0, row1 = -GSPO_S0 * (1.0 - 2.0 + 0.5) / 3, (-1.2 + GSPO_S1) / 2
    close(loss.detach(), (row0 + row1) / 2)
    close(metrics["clip_fraction"], 1 / 5)
    close(metrics["ratio_mean"], (3 * GSPO_S0 + 2 * GSPO_S1) / 5)
    close(metrics["ratio_max"], GSPO_S1)
    loss.backward()
    # d l_bt / d log_prob_bt = -s_b * A_bt where unclipped; seq_mean_token_mean divides by n_b and by 2 rows
    close(log_probs.grad, [[-GSPO_S0 * 1.0 / 6, GSPO_S0 * 2.0 / 6, -GSPO_S0 * 0.5 / 6], [0.0, GSPO_S1 / 4, 0.0]])
    # the paper's clip range (3e-4, 4e-4) clips both rows: every token of a sequence shares its clip
    _, tight = policy_loss(_policy_log_probs(), OLD_LOG_PROBS, ADVANTAGES, MASK, ratio_level="sequence",
                           clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_mean")
    # row 0 (s0 > 1.0004): clipped where A > 0 (2 tokens); row 1: clipped where A > 0 (1 token)
    close(tight["clip_fraction"], 3 / 5)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, ratio_level="group")


def test_gspo_loss_exact_across_micro_batches_and_ranks():
    mask, old, logits, advantages = _ragged_batch()
    options = dict(ratio_level="sequence", aggregation="seq_mean_token_mean", clip_low=0.05, clip_high=0.05)
    full_logits = logits.clone().requires_grad_()
    full_loss, _ = policy_loss(full_logits, old, advantages, mask, **options)
    full_loss.backward()
    # 2 ranks x 2 micro-batches of 2 rows; global count: non-empty sequences
    normalizer = mask.any(dim=1).sum().double() / 4
    rank_grads, reported = [], 0.0
    for rank in range(2):
        rank_logits = logits.clone().requires_grad_()
        for micro in range(2):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            cols = slice(0, int(mask[rows].sum(dim=1).max()))
            loss, _ = policy_loss(rank_logits[rows, cols], old[rows, cols], advantages[rows, cols], mask[rows, cols],
                                  normalizer=normalizer, **options)
            (loss / 2).backward()
            reported += loss.item() / 4
        rank_grads.append(rank_logits.grad)
    assert reported == pytest.approx(full_loss.item(), abs=1e-9)
    torch.testing.assert_close(sum(rank_grads) / 2, full_logits.grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token_mean", {}, (-1.2 + 1.6 - 0.55 - 0.5 + 3.0) / 5),
        ("seq_mean_token_mean", {}, ((-1.2 + 1.6 - 0.55) / 3 + (-0.5 + 3.0) / 2) / 2),
        ("seq_mean_token_sum_norm", {}, ((-1.2 + 1.6 - 0.55) / 3 + (-0.5 + 3.0) / 3) / 2),
        ("seq_mean_token_sum_norm", {"max_len": 5}, ((-1.2 + 1.6 - 0.55) / 5 + (-0.5 + 3.0) / 5) / 2),
        ("token_mean", {"normalizer": 10.0}, (-1.2 + 1.6 - 0.55 - 0.5 + 3.0) / 10),
        ("seq_mean_token_mean", {"normalizer": 4}, ((-1.2 + 1.6 - 0.55) / 3 + (-0.5 + 3.0) / 2) / 4),
    ],
)
def test_aggregation_modes(mode, kwargs, expected):
    per_token = t([[-1.2, 1.6, -0.55], [-0.5, 3.0, NAN]])
    close(aggregate_loss(per_token, MASK, mode, **kwargs), expected)
    loss, _ = policy_loss(_policy_log_probs(), OLD_LOG_PROBS, ADVANTAGES, MASK, aggregation=mode, **kwargs)
    close(loss.detach(), expected)


def test_aggregation_ignores_empty_rows_and_empty_batch_is_zero():
    per_token = t([[2.0, 4.0], [5.0, 5.0]])
    one_empty_row = t([[1, 1], [0, 0]], torch.bool)
    close(aggregate_loss(per_token, one_empty_row, "seq_mean_token_mean"), 3.0)
    close(aggregate_loss(per_token, torch.zeros(2, 2, dtype=torch.bool), "token_mean"), 0.0)


def _ragged_batch(batch_size=8, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [6, 1, 4, 3, 5, 2, 6, 3][:batch_size]
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    old = -torch.rand(batch_size, width, generator=generator, dtype=torch.float64) * 2
    logits = old + 0.3 * torch.randn(batch_size, width, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch_size, width, generator=generator, dtype=torch.float64)
    return mask, old, logits, advantages


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_accumulation_and_data_parallel_invariance(mode):
    mask, old, logits, advantages = _ragged_batch()
    max_len = mask.shape[1]

    full_logits = logits.clone().requires_grad_()
    full_loss, _ = policy_loss(full_logits, old, advantages, mask, aggregation=mode, max_len=max_len, dual_clip=3.0)
    full_loss.backward()

    # 2 ranks x 2 micro-batches of 2 rows; each micro-batch trimmed to its own padded width.
    world_size, grad_accum_steps = 2, 2
    global_count = mask.sum() if mode == "token_mean" else mask.any(dim=1).sum()
    normalizer = global_count.double() / (grad_accum_steps * world_size)

    rank_grads, reported = [], 0.0
    for rank in range(world_size):
        rank_logits = logits.clone().requires_grad_()  # each rank holds its own replica
        for micro in range(grad_accum_steps):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            width = int(mask[rows].sum(dim=1).max())
            cols = slice(0, width)
            loss, _ = policy_loss(
                rank_logits[rows, cols],
                old[rows, cols],
                advantages[rows, cols],
                mask[rows, cols],
                aggregation=mode,
                normalizer=normalizer,
                max_len=max_len,
                dual_clip=3.0,
            )
            (loss / grad_accum_steps).backward()  # DeepSpeed scales each micro-batch loss by 1/gas
            reported += loss.item() / (grad_accum_steps * world_size)
        rank_grads.append(rank_logits.grad)
    all_reduced = sum(rank_grads) / world_size  # DeepSpeed averages gradients over ranks

    assert reported == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(all_reduced, full_logits.grad, atol=1e-6, rtol=0)


def test_value_loss_invariance_with_normalizer():
    mask, old, values, returns = _ragged_batch(seed=1)
    full_values = values.clone().requires_grad_()
    full_loss, _ = value_loss(full_values, old, returns, mask, clip_eps=0.2)
    full_loss.backward()
    parts = [slice(0, 3), slice(3, 8)]
    part_values = values.clone().requires_grad_()
    total = sum(
        value_loss(part_values[rows], old[rows], returns[rows], mask[rows], clip_eps=0.2, normalizer=mask.sum())[0]
        for rows in parts
    )
    total.backward()
    close(total.detach(), full_loss.item(), atol=1e-6)
    torch.testing.assert_close(part_values.grad, full_values.grad, atol=1e-6, rtol=0)


def test_policy_loss_padding_garbage_keeps_gradients_finite():
    log_probs = _policy_log_probs()
    loss, metrics = policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, aggregation="seq_mean_token_mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


def test_policy_loss_bounds_the_log_ratio_at_20():
    # log-ratio 25, A = -1: surr1 = -exp(20) < surr2 = -1.2, so l = exp(20) (4.85e8), not exp(25);
    # the bound is flat there, so the gradient is 0.
    log_probs = t([[25.0]]).requires_grad_()
    loss, metrics = policy_loss(log_probs, t([[0.0]]), t([[-1.0]]), t([[1]], torch.bool))
    close(loss.detach(), math.exp(20.0), atol=1e-6)
    close(metrics["ratio_max"], math.exp(20.0), atol=1e-6)
    loss.backward()
    close(log_probs.grad, [[0.0]])


def test_policy_loss_finite_at_log_ratio_100_in_float32():
    log_probs = torch.tensor([[100.0, 100.0, -100.0]]).requires_grad_()
    loss, metrics = policy_loss(log_probs, torch.zeros(1, 3), torch.tensor([[-1.0, 1.0, 1.0]]), torch.ones(1, 3))
    loss.backward()
    # per token: exp(20) (A < 0), -1.2 (A > 0: the clip wins), -exp(-20) (ratio below the clip, A > 0)
    assert loss.item() == pytest.approx((math.exp(20.0) - 1.2 - math.exp(-20.0)) / 3, rel=1e-6)
    assert torch.isfinite(log_probs.grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


def test_policy_loss_validation_names_arguments():
    log_probs = _policy_log_probs()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES[:, :2], MASK)
    with pytest.raises(ValueError, match="old_log_probs"):
        policy_loss(log_probs, OLD_LOG_PROBS[:1], ADVANTAGES, MASK)
    with pytest.raises(ValueError, match="importance_weights"):
        policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, importance_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(log_probs, OLD_LOG_PROBS, ADVANTAGES, MASK, aggregation="sum")
    with pytest.raises(ValueError, match="normalizer"):
        aggregate_loss(torch.ones(2, 3), MASK, "token_mean", normalizer=0)


# ----------------------------------------------------------------------------- truncated IS

# log(learner_old / behaviour): row 0 ratios [3, 0.5, 1.2], row 1 ratios [1.2, 4, pad]
IS_LEARNER = t([[math.log(3.0), math.log(0.5), math.log(1.2)], [math.log(1.2), math.log(4.0), 80.0]])
IS_BEHAVIOUR = torch.zeros(2, 3, dtype=torch.float64)


def test_truncated_is_token_level():
    weights, metrics = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="token", mode="clamp")
    close(weights, [[2.0, 0.5, 1.2], [1.2, 2.0, 0.0]])
    close(metrics["is_weight_mean"], (3.0 + 0.5 + 1.2 + 1.2 + 4.0) / 5)
    close(metrics["is_weight_max"], 4.0)
    close(metrics["is_truncated_fraction"], 2 / 5)
    masked, _ = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="token", mode="mask")
    close(masked, [[0.0, 0.5, 1.2], [1.2, 0.0, 0.0]])


def test_truncated_is_sequence_level():
    # row products: 3 * 0.5 * 1.2 = 1.8 (kept), 1.2 * 4 = 4.8 (> cap 2)
    learner = IS_LEARNER.clone().requires_grad_()
    weights, metrics = truncated_importance_weights(learner, IS_BEHAVIOUR, MASK, level="sequence", mode="clamp")
    assert not weights.requires_grad
    close(weights, [[1.8, 1.8, 1.8], [2.0, 2.0, 0.0]])
    close(metrics["is_weight_mean"], (1.8 + 4.8) / 2)
    close(metrics["is_weight_max"], 4.8)
    close(metrics["is_truncated_fraction"], 0.5)
    masked, _ = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="sequence", mode="mask")
    close(masked, [[1.8, 1.8, 1.8], [0.0, 0.0, 0.0]])


def test_truncated_is_token_level_floor_clamps_up_or_masks():
    # floor 0.6: the 0.5 ratio is below it; 3 and 4 are above the cap 2
    weights, metrics = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="token", floor=0.6)
    close(weights, [[2.0, 0.6, 1.2], [1.2, 2.0, 0.0]])
    close(metrics["is_truncated_fraction"], 3 / 5)
    close(metrics["is_weight_mean"], (3.0 + 0.5 + 1.2 + 1.2 + 4.0) / 5)  # of the weights before truncation
    masked, _ = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="token", mode="mask", floor=0.6)
    close(masked, [[0.0, 0.0, 1.2], [1.2, 0.0, 0.0]])


def test_truncated_is_sequence_level_floor():
    # row products 1.8 and 4.8; band [1.9, 5]: row 0 is below the floor, row 1 inside
    weights, metrics = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="sequence", cap=5.0,
                                                    floor=1.9)
    close(weights, [[1.9, 1.9, 1.9], [4.8, 4.8, 0.0]])
    close(metrics["is_truncated_fraction"], 0.5)
    masked, _ = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="sequence", mode="mask", cap=5.0,
                                             floor=1.9)
    close(masked, [[0.0, 0.0, 0.0], [4.8, 4.8, 0.0]])


def test_truncated_is_sequence_geometric_masks_by_the_geometric_mean_and_keeps_token_ratios():
    # geometric means over valid tokens only (row 1's padding holds 80): row 0 (3 * 0.5 * 1.2)^(1/3) = 1.8^(1/3)
    # = 1.216..., row 1 (1.2 * 4)^(1/2) = 4.8^(1/2) = 2.190...
    row0, row1 = 1.8 ** (1 / 3), 4.8 ** 0.5
    learner = IS_LEARNER.clone().requires_grad_()
    weights, metrics = truncated_importance_weights(learner, IS_BEHAVIOUR, MASK, level="sequence_geometric",
                                                    mode="mask")  # band [0, 2]: row 1 is dropped
    assert not weights.requires_grad
    close(weights, [[3.0, 0.5, 1.2], [0.0, 0.0, 0.0]])  # a kept row's tokens keep their own ratio
    close(metrics["is_weight_mean"], (row0 + row1) / 2)
    close(metrics["is_weight_max"], row1)
    close(metrics["is_truncated_fraction"], 0.5)
    # band [1.5, 5]: row 0 is now below the floor and row 1 inside
    weights, _ = truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="sequence_geometric",
                                              mode="mask", cap=5.0, floor=1.5)
    close(weights, [[0.0, 0.0, 0.0], [1.2, 4.0, 0.0]])


def test_truncated_is_validation():
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="batch")
    with pytest.raises(ValueError, match="mode"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, mode="drop")
    with pytest.raises(ValueError, match="behaviour_log_probs"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR[:, :2], MASK)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, cap=0.0)
    with pytest.raises(ValueError, match="floor"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, cap=2.0, floor=2.0)
    with pytest.raises(ValueError, match="sequence_geometric.*mask"):
        truncated_importance_weights(IS_LEARNER, IS_BEHAVIOUR, MASK, level="sequence_geometric", mode="clamp")


# ----------------------------------------------------------------------------- value loss, entropy


def test_value_loss_clipped_and_unclipped():
    values = t([[1.0, 0.0, 1.0], [0.3, 5.0, 0.0]]).requires_grad_()
    old_values = t([[0.5, 0.5, 0.0], [0.3, 0.0, 0.0]])
    returns = t([[0.8, 1.0, 0.9], [0.0, NAN, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)  # row 1 holds one token; the rest is garbage padding
    # (V, old, R): (1, .5, .8): max(.04, (.7-.8)^2=.01) = .04   (0, .5, 1): max(1, (.3-1)^2=.49) = 1
    #              (1, 0, .9):  max(.01, (.2-.9)^2=.49) = .49 (clipped)   (.3, .3, 0): .09 both
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    close(loss.detach(), 0.5 * (0.04 + 1.0 + 0.49 + 0.09) / 4)
    close(metrics["value_clip_fraction"], 1 / 4)
    loss.backward()
    assert torch.isfinite(values.grad).all()
    # The clipped token's loss does not depend on V (V - old is outside the clip range): zero gradient.
    close(values.grad[0, 2], 0.0)
    unclipped, metrics = value_loss(values, old_values, returns, mask)
    close(unclipped.detach(), 0.5 * (0.04 + 1.0 + 0.01 + 0.09) / 4)
    close(metrics["value_clip_fraction"], 0.0)
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old_values, returns[:, :2], mask)


def test_entropy_bonus_sign_and_aggregation():
    entropy = t([[1.0, 2.0, 3.0], [4.0, 6.0, NAN]])
    close(entropy_bonus(entropy, MASK, 0.01), 0.01 * 16.0 / 5)
    close(entropy_bonus(entropy, MASK, 0.01, aggregation="seq_mean_token_mean"), 0.01 * (2.0 + 5.0) / 2)


def test_approx_kl_validation():
    with pytest.raises(ValueError, match="estimator"):
        approx_kl(t([0.0]), t([0.0]), "k4")
    with pytest.raises(ValueError, match="ref_log_probs"):
        approx_kl(t([0.0, 1.0]), t([0.0]))
    with pytest.raises(ValueError, match="action_mask"):
        approx_kl(t([0.0, 1.0]), t([0.0, 0.0]), action_mask=t([1], torch.bool))


# ----------------------------------------------------------------------------- learning-rate schedule


def test_lr_at_constant_default_is_one_at_every_step():
    assert [lr_at(step, num_steps=4) for step in range(6)] == [1.0] * 6


def test_lr_at_warmup_starts_at_one_over_w_and_reaches_one():
    # W = 4: (s + 1) / 4 for s < 4, then the constant 1
    assert [lr_at(s, num_steps=10, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("schedule", "expected"), [
    # W = 2, num_steps = 10, m = 0.1: p = (s - 2) / 8 after the warm-up
    #   linear  0.1 + 0.9 * (1 - p):            p = 0 -> 1, 0.25 -> 0.775, 0.5 -> 0.55, 1 -> 0.1
    #   cosine  0.1 + 0.9 * (1 + cos(pi p)) / 2: p = 0.25 -> 0.1 + 0.9 * 0.853553..., 0.5 -> 0.55
    ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.775, 6: 0.55, 9: 0.2125, 10: 0.1, 12: 0.1}),
    ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 6: 0.55, 10: 0.1, 12: 0.1}),
])
def test_lr_at_decays_after_warmup_to_the_floor_at_num_steps(schedule, expected):
    for step, value in expected.items():
        assert lr_at(step, num_steps=10, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1) == \
            pytest.approx(value, abs=1e-12), step


def test_lr_at_decays_to_zero_by_default_and_without_warmup():
    # p = s / 4: linear 1 - p; cosine (1 + cos(pi s / 4)) / 2
    assert [lr_at(s, num_steps=4, schedule="linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_at(1, num_steps=4, schedule="cosine") == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert lr_at(4, num_steps=4, schedule="cosine") == pytest.approx(0.0, abs=1e-15)


def test_lr_at_warmup_as_long_as_the_run_never_decays():
    assert [lr_at(s, num_steps=2, warmup_steps=2, schedule="linear") for s in range(3)] == [0.5, 1.0, 0.0]


def test_lr_at_validation():
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, num_steps=4, schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_at(0, num_steps=4, schedule="linear", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, num_steps=4, warmup_steps=-1)
