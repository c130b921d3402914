"""PPOTrainer on one DeepSpeed rank (CPU, gloo): skipping the no-grad policy pass in `score`
(one PPO epoch, no reference) changes nothing: same metrics, loss, gradient norm and weights; a
non-finite micro-batch loss stops the step before its backward, naming where it happened; the KL
in the reward reaches the group estimators' advantages; the learning-rate schedule sets actor and
critic rates per step and continues across a checkpoint resume; GSPO reaches the policy loss; the
overlong penalty reaches the reward, and cut-off completions leave the loss and its normaliser; the
logged sample records hold the decoded completions with their rewards and advantages; held-out samples
are scored with their own dataset columns and without the overlong penalty; a step cut to the groups
dynamic sampling keeps trains as if only they had come."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import learner.algo.losses
import learner.training.trainer
from learner.algo import approx_kl, informative_groups, select_groups
from learner.training.checkpoint import CheckpointManager
from learner.data.reward_functions import RewardFn, RewardFunctions
from learner.hub.step_samples import StepSamples
from learner.tiny.model import build_tiny_model, build_tokenizer
from learner.training.trainer import NonFiniteLossError, PPOTrainer, ScoredPart, require_finite_loss, select_rows
from protocol.config import load_config
from protocol.messages import PackedBatch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, learner_rank):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the learner runs (train.torch_threads); more only contend on a shared machine
    yield str(path)
    torch.set_num_threads(threads)


def batch(grant_id: int, rng: np.random.Generator, n_prompts: int = 4, n: int = 4) -> PackedBatch:
    """Random sequences of different lengths with behaviour log-probs near the learner's (about -log V)."""
    tokens, cu, plens, mask, lps = [], [0], [], [], []
    for _ in range(n_prompts * n):
        plen, rlen = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        tokens += rng.integers(4, 60, plen + rlen).tolist()
        cu.append(len(tokens))
        plens.append(plen)
        mask += [0] * plen + [1] * rlen
        lps += [0.0] * plen + (-np.log(128) + rng.normal(0, 0.3, rlen)).tolist()
    b = n_prompts * n
    return PackedBatch(grant_id=grant_id, step=0, tokens=np.array(tokens), cu_seqlens=np.array(cu),
                       prompt_lens=np.array(plens), loss_mask=np.array(mask), behaviour_logprobs=np.minimum(lps, 0),
                       prompt_ids=np.repeat(np.arange(n_prompts), n) + 10 * grant_id,
                       sample_indices=np.tile(np.arange(n), n_prompts).astype(np.int32),
                       weight_versions=np.zeros(b, np.int32), last_weight_versions=np.zeros(b, np.int32),
                       finish_reasons=["stop"] * b, labels=[None] * b, gen_seconds=0.1)


def random_reward(prompts, completions, labels):
    return [float(len(c) % 3) for c in completions]


def make_trainer(model_dir: str, **overrides) -> PPOTrainer:
    cfg = load_config(overrides={"model.path": model_dir, "rollout.n_samples_per_prompt": "4", "train.lr": "0.01",
                                 "train.micro_batch_tokens": "64", **overrides})
    torch.manual_seed(0)
    reward_fns = RewardFunctions([RewardFn(random_reward, "tests:random_reward")], [1.0])
    return PPOTrainer(cfg, model_dir, build_tokenizer(), reward_fns)


def two_batches() -> list[PackedBatch]:
    rng = np.random.default_rng(0)
    return [batch(g, rng) for g in range(2)]


def score_batches(trainer: PPOTrainer, batches: list[PackedBatch]) -> list[ScoredPart]:
    return [p for b in batches for p in trainer.score(StepSamples.from_batches([b]), order=b.grant_id)]


def score_two_batches(trainer: PPOTrainer) -> list[ScoredPart]:
    return score_batches(trainer, two_batches())


def train_once(model_dir: str, policy_pass_in_score: bool, **overrides) -> tuple[dict, dict]:
    trainer = make_trainer(model_dir, **overrides)
    assert trainer.policy_pass_in_score == (trainer.cfg.train.ppo_epochs > 1)  # the default, before the test forces it
    trainer.policy_pass_in_score = policy_pass_in_score
    parts = score_two_batches(trainer)
    assert all((p.old is None) != policy_pass_in_score for p in parts)
    metrics = trainer.train_step(0, parts)
    return metrics, {k: v.detach().clone() for k, v in trainer.actor_module.state_dict().items()}


GSPO = {"algo.policy_loss": "gspo", "algo.loss_aggregation": "seq_mean_token_mean"}


@pytest.mark.parametrize("options", [
    {"algo.tis_level": "token"}, {"algo.tis_level": "sequence"}, {"algo.tis_level": "off"},
    {"algo.tis_level": "sequence_geometric", "algo.tis_mode": "mask"}, GSPO, {**GSPO, "algo.tis_level": "off"},
], ids=["token", "sequence", "off", "sequence_geometric", "gspo", "gspo-tis-off"])
def test_old_log_probs_from_the_training_forward_equal_the_scoring_pass(model_dir, options):
    with_pass, weights_with = train_once(model_dir, True, **options)
    without, weights_without = train_once(model_dir, False, **options)
    assert with_pass.keys() == without.keys()
    assert {"entropy", "kl_behaviour", "kl_behaviour_max", "behaviour_log_ratio_max"} <= with_pass.keys()
    for key in with_pass:
        assert without[key] == pytest.approx(with_pass[key], rel=1e-5, abs=1e-6), key
    assert with_pass["grad_norm"] > 0 and with_pass["behaviour_log_ratio_max"] > 0.3
    for name in weights_with:
        torch.testing.assert_close(weights_without[name], weights_with[name], rtol=1e-5, atol=1e-6)


def test_require_finite_loss_names_step_epoch_micro_batch_and_rows():
    require_finite_loss(1.5, "policy loss", step=7, micro_batch=2, rows=(16, 24))
    with pytest.raises(NonFiniteLossError, match=r"^step 7, micro-batch 2 \(rows 16-24\): policy loss is nan$"):
        require_finite_loss(float("nan"), "policy loss", step=7, micro_batch=2, rows=(16, 24))
    with pytest.raises(NonFiniteLossError, match=r"^step 3, epoch 1, micro-batch 0 \(rows 0-8\): value loss is -inf$"):
        require_finite_loss(float("-inf"), "value loss", step=3, micro_batch=0, rows=(0, 8), epoch=1)


@pytest.mark.parametrize(("loss_function", "engine", "name", "overrides"), [
    ("policy_loss", "actor", "policy loss", {}),
    ("value_loss", "critic", "value loss", {"algo.advantage_estimator": "gae"}),
])
def test_non_finite_loss_stops_the_step_before_its_backward(model_dir, monkeypatch, loss_function, engine, name,
                                                            overrides):
    trainer = make_trainer(model_dir, **overrides)
    parts = score_two_batches(trainer)
    original_loss, original_backward = getattr(learner.training.trainer, loss_function), getattr(trainer, engine).backward
    losses, backwards = [], []

    def nan_in_the_second_micro_batch(*args, **kwargs):
        loss, metrics = original_loss(*args, **kwargs)
        losses.append(loss)
        return (loss * float("nan") if len(losses) == 2 else loss), metrics

    def counted_backward(*args, **kwargs):
        backwards.append(args[0])
        return original_backward(*args, **kwargs)

    monkeypatch.setattr(learner.training.trainer, loss_function, nan_in_the_second_micro_batch)
    monkeypatch.setattr(getattr(trainer, engine), "backward", counted_backward)
    first, second = parts[0].samples.num_sequences, parts[1].samples.num_sequences
    expected = rf"^step 7, micro-batch 1 \(rows {first}-{first + second}\): {name} is nan$"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.train_step(7, parts)
    assert len(backwards) == 1  # the first micro-batch's; the second never reached backward


def test_kl_in_the_reward_adds_its_reward_to_go_to_group_advantages(model_dir):
    trainer = make_trainer(model_dir, **{"algo.kl_coef": "0.05", "algo.kl_mode": "reward"})
    with torch.no_grad():  # a reference unlike the policy, so that the KL is not 0
        for parameter in trainer.ref.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    parts = score_two_batches(trainer)
    penalised = trainer.make_experience(parts)
    trainer.kl_controller.value = 0.0
    plain = trainer.make_experience(parts)

    mask = penalised.action_mask.bool()
    kl = approx_kl(penalised.old_log_probs, penalised.ref_log_probs, "k3", action_mask=mask)
    assert kl.abs().max() > 1e-3
    # the reward-to-go of -kl_coef * kl as a reversed cumulative sum (masked tokens add 0)
    reward_to_go = torch.where(mask, (-0.05 * kl).flip(1).cumsum(1).flip(1), torch.zeros_like(kl))
    torch.testing.assert_close(penalised.advantages - plain.advantages, reward_to_go)


# linear decay after 2 warm-up steps over 4 steps: (s + 1) / 2 for s < 2, then 1 - (s - 2) / 2
SCHEDULE = {"train.num_steps": "4", "train.lr_warmup_steps": "2", "train.lr_schedule": "linear",
            "algo.advantage_estimator": "gae"}
SCHEDULE_FACTORS = [0.5, 1.0, 1.0, 0.5]
CRITIC_LR = 5e-4  # critic.lr's default


def train_steps(trainer: PPOTrainer, steps) -> list[dict]:
    """Each step scored by the models as they are at that step, as the learner does."""
    return [trainer.train_step(step, score_two_batches(trainer)) for step in steps]


def test_default_lr_is_constant_and_reported(model_dir):
    trainer = make_trainer(model_dir)
    metrics = train_steps(trainer, range(2))
    assert [m["lr"] for m in metrics] == [0.01, 0.01] and trainer.actor.get_lr() == [0.01]
    assert "critic_lr" not in metrics[0]


def test_lr_schedule_sets_actor_and_critic_rates_per_step(model_dir):
    trainer = make_trainer(model_dir, **SCHEDULE)
    for step, factor in enumerate(SCHEDULE_FACTORS):
        (metrics,) = train_steps(trainer, [step])
        assert metrics["lr"] == pytest.approx(0.01 * factor), step
        assert metrics["critic_lr"] == pytest.approx(CRITIC_LR * factor), step
        # what the optimizers ran with, not only what was reported
        assert trainer.actor.get_lr() == [pytest.approx(0.01 * factor)]
        assert trainer.critic.get_lr() == [pytest.approx(CRITIC_LR * factor)]


def test_resume_from_a_checkpoint_continues_the_schedule_and_the_training(model_dir, tmp_path):
    straight = make_trainer(model_dir, **SCHEDULE)
    uninterrupted = train_steps(straight, range(4))

    interrupted = make_trainer(model_dir, **SCHEDULE)
    train_steps(interrupted, [0])  # the checkpoint's optimizer holds step 0's rate, half of step 1's
    checkpoints = CheckpointManager(tmp_path, keep=1)
    checkpoints.save(0, interrupted.engines, interrupted.save, {})
    del interrupted

    resumed = make_trainer(model_dir, **SCHEDULE)
    assert checkpoints.load(checkpoints.latest(), resumed.engines)["step"] == 0
    continued = train_steps(resumed, range(1, 4))
    for before, after in zip(uninterrupted[1:], continued):
        for key in ("lr", "critic_lr", "policy_loss", "value_loss", "grad_norm"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), key
    assert [m["lr"] for m in continued] == pytest.approx([0.01 * f for f in SCHEDULE_FACTORS[1:]])
    assert resumed.actor.get_lr() == [pytest.approx(0.01 * SCHEDULE_FACTORS[3])]
    for engine in ("actor", "critic"):
        expected = getattr(straight, engine).module.state_dict()
        for name, value in getattr(resumed, engine).module.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_gspo_reaches_the_policy_loss(model_dir, monkeypatch):
    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return learner.algo.losses.policy_loss(*args, **kwargs)

    monkeypatch.setattr(learner.training.trainer, "policy_loss", recorded)
    trainer = make_trainer(model_dir, **GSPO)
    trainer.train_step(0, score_two_batches(trainer))
    assert calls and all(c["ratio_level"] == "sequence" and c["aggregation"] == "seq_mean_token_mean" for c in calls)


def test_overlong_penalty_is_added_to_the_reward(model_dir):
    # max_new_tokens 8, buffer 4: -0.5 * min(1, max(0, L - 4) / 4) for a response of L tokens
    trainer = make_trainer(model_dir, **{"rollout.max_new_tokens": "8", "reward.overlong_buffer": "4",
                                         "reward.overlong_penalty": "0.5"})
    parts = score_two_batches(trainer)
    penalised = trainer.make_experience(parts).metrics
    trainer.cfg.reward.overlong_buffer = 0
    plain = trainer.make_experience(parts).metrics
    lengths = StepSamples.concat([p.samples for p in parts]).response_lengths.tolist()
    expected = [-0.5 * min(1.0, max(0, length - 4) / 4) for length in lengths]
    assert min(expected) < 0 and max(expected) == 0  # some responses are penalised, some are not
    assert penalised["overlong_penalty_mean"] == pytest.approx(sum(expected) / len(expected))
    assert penalised["reward_mean"] - plain["reward_mean"] == pytest.approx(sum(expected) / len(expected))
    assert penalised["reward_function_mean"] == plain["reward_function_mean"]  # the function's own scores
    assert "overlong_penalty_mean" not in plain


def test_each_reward_function_is_weighted_gets_its_columns_and_has_its_metric(model_dir):
    """Two functions, weights 2 and 0.5: `one` (plain, no columns) scores 1; `bonus` (async) returns
    its prompt's `bonus` column, the prompt id: grant 0 has prompts 0-3, grant 1 prompts 10-13, 4
    samples each, so its mean is (0+1+2+3+10+11+12+13) / 8 = 6.5 and the weighted sum's 2 + 3.25."""
    def one(prompts, completions, labels):
        return [1.0] * len(completions)

    async def bonus(prompts, completions, labels, *, bonus, tag="unset"):
        assert set(tag) == {"t"}  # the columns it names, and only those
        return bonus

    trainer = make_trainer(model_dir)
    trainer.reward_fns = RewardFunctions([RewardFn(one, "m:one"), RewardFn(bonus, "m:bonus")], [2.0, 0.5])
    trainer.columns_of = lambda prompt_id: {"bonus": float(prompt_id), "tag": "t", "other": [1]}
    parts = score_two_batches(trainer)
    assert parts[0].function_scores.shape[1] == 2
    exp = trainer.make_experience(parts)
    assert exp.metrics["reward_fn_one_mean"] == 1.0 and exp.metrics["reward_fn_bonus_mean"] == 6.5
    assert exp.metrics["reward_function_mean"] == exp.metrics["reward_mean"] == pytest.approx(5.25)
    prompt_ids = exp.samples.prompt_ids.double()
    torch.testing.assert_close(exp.scores.double(), 2.0 + 0.5 * prompt_ids)


def test_rewards_of_held_out_samples_use_their_own_columns_and_no_overlong_penalty(model_dir):
    """`rewards` (held-out evaluation): the weighted sum 2 x 1 + 0.5 x bonus clipped to 54, with the
    bonus column from the given `columns_of` (prompt id + 100, not the training data's), no
    overlong penalty though some responses are long enough for one in training."""
    def one(prompts, completions, labels):
        return [1.0] * len(completions)

    def bonus(prompts, completions, labels, bonus):
        return bonus

    trainer = make_trainer(model_dir, **{"rollout.max_new_tokens": "8", "reward.overlong_buffer": "4",
                                         "reward.clip": "54"})
    trainer.reward_fns = RewardFunctions([RewardFn(one, "m:one"), RewardFn(bonus, "m:bonus")], [2.0, 0.5])
    trainer.columns_of = lambda prompt_id: {"bonus": 0.0}
    samples = StepSamples.from_batches(two_batches())
    assert (samples.response_lengths > 4).any()
    total, function_scores = trainer.rewards(samples, lambda prompt_id: {"bonus": float(prompt_id) + 100})
    prompt_ids = samples.prompt_ids.double()
    torch.testing.assert_close(total.double(), (2.0 + 0.5 * (prompt_ids + 100)).clamp(max=54.0))  # 52-53.5, 54
    torch.testing.assert_close(function_scores, torch.stack([torch.ones(32), prompt_ids.float() + 100], dim=1))


def test_dynamic_sampling_trains_the_chosen_groups_as_if_only_they_had_come(model_dir):
    """Groups of even prompts all score 1 (uninformative); the step keeps the first 3 informative
    groups. Cutting the scored micro-batches to their rows (`select_rows`; 64-token micro-batches
    split groups) gives the metrics, loss, gradient norm and weights of scoring and training a
    batch of just those groups."""
    def by_prompt(prompts, completions, labels, pid):
        return [1.0 if p % 2 == 0 else float(len(c) % 3) for p, c in zip(pid, completions)]

    def trainer():
        t = make_trainer(model_dir)
        t.reward_fns = RewardFunctions([RewardFn(by_prompt, "m:by_prompt")], [1.0])
        t.columns_of = lambda prompt_id: {"pid": prompt_id}
        return t

    batches = two_batches()
    full = trainer()
    parts = score_two_batches(full)
    sizes = np.cumsum([p.samples.num_sequences for p in parts])
    assert any(size % 4 for size in sizes), "some group spans two micro-batches"
    informative = informative_groups(full.total_reward(*full.reward_terms(parts)), 4)
    assert informative.tolist()[0::2] == [False] * 4 and informative.sum() > 3  # a surplus is dropped too
    keep = select_groups(informative, 3).repeat_interleave(4)
    selected = full.train_step(0, select_rows(parts, keep))

    alone = trainer()
    only_chosen = alone.train_step(0, alone.score(StepSamples.from_batches(batches).select(keep), order=0))
    assert selected["sequences"] == only_chosen["sequences"] == 12
    for key in only_chosen:
        assert selected[key] == pytest.approx(only_chosen[key], rel=1e-5, abs=1e-6), key
    # other micro-batches sum in another order; Adam's first step moves a weight by about lr x g / |g|
    # (lr 0.01), so where a gradient is near 0 its rounding shows: a handful of weights, by < 1e-3
    for name, weight in alone.actor_module.state_dict().items():
        diff = (full.actor_module.state_dict()[name] - weight).abs()
        assert diff.max() < 1e-3 and (diff > 1e-6).float().mean() < 1e-3, name


def cut_off_every_third(batches: list[PackedBatch]) -> list[PackedBatch]:
    return [dataclasses.replace(b, finish_reasons=["length" if i % 3 == 0 else "stop" for i in range(b.num_sequences)])
            for b in batches]


def test_mask_truncated_leaves_cut_off_completions_out_of_the_loss_and_its_normaliser(model_dir, monkeypatch):
    calls = []

    def recorded(log_probs, old, advantages, mask, **kwargs):
        calls.append((mask, kwargs["normalizer"]))
        return learner.algo.losses.policy_loss(log_probs, old, advantages, mask, **kwargs)

    monkeypatch.setattr(learner.training.trainer, "policy_loss", recorded)
    trainer = make_trainer(model_dir, **{"train.mask_truncated": "true"})
    batches = cut_off_every_third(two_batches())
    samples = StepSamples.from_batches(batches)
    truncated, lengths = samples.truncated, samples.response_lengths
    assert 0 < int(truncated.sum()) < samples.num_sequences
    metrics = trainer.train_step(0, score_batches(trainer, batches))
    # every response token of batch() is a loss token: the kept ones are the responses not cut off
    assert {normalizer for _, normalizer in calls} == {float(lengths[~truncated].sum())}
    trained = torch.cat([mask.sum(dim=1) for mask, _ in calls])
    assert trained.tolist() == torch.where(truncated, 0, lengths).tolist()
    assert metrics["truncated_fraction"] == pytest.approx(float(truncated.float().mean()))

    calls.clear()
    trainer.cfg.train.mask_truncated = False  # the same batches train on every response token
    trainer.train_step(1, score_batches(trainer, batches))
    assert {normalizer for _, normalizer in calls} == {float(lengths.sum())}


def test_mask_truncated_with_every_completion_cut_off_changes_nothing(model_dir):
    trainer = make_trainer(model_dir, **{"train.mask_truncated": "true", "algo.entropy_coef": "0.01"})
    before = {k: v.detach().clone() for k, v in trainer.actor_module.state_dict().items()}
    batches = [dataclasses.replace(b, finish_reasons=["length"] * b.num_sequences) for b in two_batches()]
    metrics = trainer.train_step(0, score_batches(trainer, batches))
    assert metrics["policy_loss"] == 0.0 and metrics["grad_norm"] == 0.0 and metrics["truncated_fraction"] == 1.0
    assert all(math.isfinite(value) for value in metrics.values())
    for name, value in trainer.actor_module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_sample_records_decode_the_first_prompts_with_their_rewards_and_advantages(model_dir):
    trainer = make_trainer(model_dir)
    exp = trainer.make_experience(score_two_batches(trainer))
    records = trainer.sample_records(exp, prompts=2)
    assert len(records) == 2 * 4  # every sample (n = 4) of the first two prompts, in grant order
    samples, tokenizer = exp.samples, build_tokenizer()
    for b, record in enumerate(records):
        start, split = int(samples.cu_seqlens[b]), int(samples.cu_seqlens[b]) + int(samples.prompt_lens[b])
        stop = int(samples.cu_seqlens[b + 1])
        assert record["prompt"] == tokenizer.decode(samples.tokens[start:split].tolist(), skip_special_tokens=True)
        assert record["completion"] == tokenizer.decode(samples.tokens[split:stop].tolist(), skip_special_tokens=True)
        assert record["reward"] == float(len(record["completion"]) % 3)  # random_reward
        assert record["response_tokens"] == stop - split and record["finish_reason"] == "stop"
        assert record["prompt_id"] == int(samples.prompt_ids[b])
    for group in (records[:4], records[4:]):  # GRPO: (r - mean) / (std + 1e-6) within each prompt's group
        rewards = torch.tensor([r["reward"] for r in group])
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(trainer.sample_records(exp, prompts=100)) == samples.num_sequences
