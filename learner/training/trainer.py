"""The PPO learner on one DeepSpeed rank: models, experience making and the optimizer step.

For one step's packed samples:
  1. `score` (as each batch arrives): one no-grad pass per model over its packed micro-batches:
     the reward functions on the decoded texts (with their prompts' other dataset columns), the
     reference log-probs (if KL is used), the critic's values (GAE), the reward model's scores,
     and the current policy's log-probs when something before training needs them (see
     `PPOTrainer.policy_pass_in_score`)
  2. `make_experience`: rewards, KL and advantages over the whole step (groups of n samples stay
     together)
  3. `optimize`: per micro-batch, truncated importance weights between behaviour (vLLM) and
     learner log-probs, the clipped PPO policy loss (+ KL loss, - entropy bonus) and the clipped
     value loss, one optimizer step per PPO epoch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from protocol.config import RunConfig
from learner.algo import (approx_kl, clip_rewards, combine_rewards, compute_advantages, entropy_bonus, kl_loss,
                          lr_at, masked_mean, overlong_penalty, policy_loss, shape_token_rewards, truncated_importance_weights, value_loss)
from learner.algo.kl import AdaptiveKLController, FixedKLController
from learner.models.actor import Actor, LoraSpec
from learner.models.packing import unpack_to_padded
from learner.models.value_model import build_value_model
from learner.data.reward_functions import RewardFunctions, score_functions
from learner.hub.step_samples import StepSamples


def deepspeed_config(cfg: RunConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # The number of packed micro-batches varies per step, so the trainer owns the
        # accumulation boundary: backward() accumulates, step() reduces and updates.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage,
                              "stage3_param_persistence_threshold": cfg.train.zero3_persistence_threshold},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class NonFiniteLossError(RuntimeError):
    """A micro-batch loss is NaN or infinite. Raised before its backward: the weights never see it."""


def require_finite_loss(value: float, name: str, *, step: int, micro_batch: int, rows: tuple[int, int],
                        epoch: int | None = None) -> None:
    """Raise :class:`NonFiniteLossError` unless ``value``, the micro-batch's ``name`` loss, is finite.

    The message says where: the step, the PPO epoch (when given), the micro-batch's index in the
    step and its rows ``start-stop`` (stop exclusive) among this rank's sequences of the step.
    """
    if not math.isfinite(value):
        epoch_text = f", epoch {epoch}" if epoch is not None else ""
        raise NonFiniteLossError(f"step {step}{epoch_text}, micro-batch {micro_batch} "
                                 f"(rows {rows[0]}-{rows[1]}): {name} is {value}")


@dataclass
class ScoredPart:
    """One packed micro-batch and what the no-grad passes computed for it; per-token tensors are
    padded [b, A_part] (A_part = its longest response), sequence scores are [b]."""

    samples: StepSamples
    order: tuple[int, int]
    mask: torch.Tensor
    behaviour: torch.Tensor
    old: torch.Tensor | None  # None: taken from the first training forward (see policy_pass_in_score)
    ref: torch.Tensor | None
    values: torch.Tensor | None
    function_scores: torch.Tensor  # [b, F]: one column per reward function
    model_scores: torch.Tensor | None

    def select(self, keep: torch.Tensor) -> ScoredPart:
        """The rows where `keep` ([b] bool) is True."""
        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[keep]

        return ScoredPart(self.samples.select(keep), self.order, rows(self.mask), rows(self.behaviour), rows(self.old),
                          rows(self.ref), rows(self.values), rows(self.function_scores), rows(self.model_scores))


def select_rows(parts: list[ScoredPart], keep: torch.Tensor) -> list[ScoredPart]:
    """The rows of `parts` (in their order) where `keep` ([B] bool over all their rows) is True;
    a part left without rows is left out."""
    selected, start = [], 0
    for part in parts:
        rows = keep[start: start + part.samples.num_sequences]
        start += part.samples.num_sequences
        if rows.any():
            selected.append(part.select(rows))
    return selected


@dataclass
class Experience:
    """Per-token training targets for one step, padded [B, A] (A = longest response of the step)."""

    samples: StepSamples
    action_mask: torch.Tensor  # the tokens the losses train on (cut-off completions left out under mask_truncated)
    old_log_probs: torch.Tensor | None  # None: the first training forward's, detached
    behaviour_log_probs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_log_probs: torch.Tensor | None
    old_values: torch.Tensor | None
    bounds: list[tuple[int, int]]
    metrics: dict[str, float]
    scores: torch.Tensor  # [B] each sequence's total reward


def _padded(flat: torch.Tensor, part: StepSamples, width: int) -> torch.Tensor:
    """Response part of a token-aligned [T] tensor as [b, width] (zeros after each response)."""
    padded, _ = unpack_to_padded(flat, part.cu_seqlens, part.prompt_lens)
    return F.pad(padded, (0, width - padded.shape[1]))


class PPOTrainer:
    def __init__(self, cfg: RunConfig, model_path: str, tokenizer, reward_fns: RewardFunctions,
                 columns_of: Callable[[int], Mapping[str, Any]] = lambda prompt_id: {}):
        """`columns_of(prompt_id)`: the prompt's other dataset columns, for the reward functions."""
        import deepspeed  # here, not at import: it announces its accelerator on import (`python -m learner --help`)

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.reward_fns = reward_fns
        self.columns_of = columns_of
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        m = cfg.model
        lora = LoraSpec(m.lora_rank, m.lora_alpha, m.lora_dropout, list(m.lora_target_modules)) if m.lora_rank else None
        actor = Actor.from_pretrained(model_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                                      lora=lora, load_in_4bit=m.load_in_4bit,
                                      gradient_checkpointing=m.gradient_checkpointing,
                                      trust_remote_code=m.trust_remote_code,
                                      logprobs_from_hidden=m.logprobs_from_hidden)
        if cfg.train.zero_stage == 3:
            # every forward gathers the partitioned parameters collectively: one per micro-batch on
            # every rank, not one per length bucket (the ranks' buckets differ)
            actor.max_padding = None
        self.actor, *_ = deepspeed.initialize(
            model=actor, config=deepspeed_config(cfg),
            optimizer=torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad],
                                        lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
        self.ref = None
        if cfg.algo.kl_coef > 0:
            self.ref = Actor.from_pretrained(model_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                                             trust_remote_code=m.trust_remote_code,
                                             logprobs_from_hidden=m.logprobs_from_hidden).eval().requires_grad_(False)
        self.reward_model = None
        if cfg.reward.model_path:
            self.reward_model = build_value_model(
                "reward", cfg.reward.model_path, dtype=m.dtype, value_head_prefix=cfg.reward.value_head_prefix,
                attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code,
            ).eval().requires_grad_(False)
        self.critic = None
        if cfg.uses_critic:
            critic = build_value_model("critic", cfg.critic.path or model_path, dtype=m.dtype,
                                       value_head_prefix=cfg.critic.value_head_prefix,
                                       attn_implementation=m.attn_implementation,
                                       trust_remote_code=m.trust_remote_code)
            if m.gradient_checkpointing:
                critic.gradient_checkpointing_enable()
            if cfg.train.zero_stage == 3:
                critic.max_padding = None  # as the actor's
            self.critic, *_ = deepspeed.initialize(
                model=critic, config=deepspeed_config(cfg),
                optimizer=torch.optim.AdamW(critic.parameters(), lr=cfg.critic.lr, weight_decay=cfg.train.weight_decay))
        # With one PPO epoch the first training forward of a micro-batch computes exactly the old
        # policy's log-probs (no optimizer step comes in between), so the no-grad policy pass in
        # `score` is needed only when something before training uses them: more epochs, or the
        # KL to the reference (advantages in kl_mode reward, the adaptive controller, kl_ref).
        self.policy_pass_in_score = cfg.train.ppo_epochs > 1 or self.ref is not None
        a = cfg.algo
        self.kl_controller = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target > 0
                              else FixedKLController(a.kl_coef))

    @property
    def actor_module(self) -> Actor:
        return self.actor.module

    @property
    def engines(self) -> dict:
        """The DeepSpeed engines whose state a checkpoint holds."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    # ------------------------------------------------------------------ experience
    def function_scores(self, samples: StepSamples,
                        columns_of: Callable[[int], Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Each reward function's scores of the samples, [B, F]. `columns_of`: where the prompts'
        dataset columns come from (default: the training data's)."""
        if not self.reward_fns.fns:
            return torch.zeros(samples.num_sequences, 0)
        prompts, completions = samples.response_texts(self.tokenizer)
        scores = score_functions(self.reward_fns.fns, prompts, completions, samples.labels,
                                 self.columns(samples, columns_of or self.columns_of))
        return torch.tensor(scores, dtype=torch.float32).T

    def columns(self, samples: StepSamples, columns_of: Callable[[int], Mapping[str, Any]]) -> dict[str, list[Any]]:
        """The samples' prompts' other dataset columns: name -> one value per sample (None where a
        prompt's row lacks the column)."""
        rows = [columns_of(int(prompt_id)) for prompt_id in samples.prompt_ids]
        names = sorted({name for row in rows for name in row})
        return {name: [row.get(name) for row in rows] for name in names}

    def total_reward(self, function_scores: torch.Tensor, model_scores: torch.Tensor | None,
                     overlong: torch.Tensor | None) -> torch.Tensor:
        """Weighted sum of the reward functions' and the reward model's scores, plus the overlong
        penalty (if any), clipped if asked."""
        r = self.cfg.reward
        components, weights = {}, {}
        for column, (name, weight) in enumerate(zip(self.reward_fns.names, self.reward_fns.weights)):
            components[f"function {name}"], weights[f"function {name}"] = function_scores[:, column], weight
        if model_scores is not None:
            components["model"], weights["model"] = model_scores, r.model_weight
        if overlong is not None:
            components["overlong"], weights["overlong"] = overlong, 1.0
        total = combine_rewards(components, weights)
        return (clip_rewards(total, r.clip) if r.clip else total).to(torch.float32)

    @torch.no_grad()
    def rewards(self, samples: StepSamples,
                columns_of: Callable[[int], Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward of samples that are scored but never trained on (held-out evaluation): each
        sequence's total [B] (reward functions, server and model, weighted and clipped as in
        training; no overlong penalty, a training signal) and each function's scores [B, F]. The
        reward model runs on this rank alone, micro-batch by micro-batch."""
        model_scores = None
        if self.reward_model is not None:
            parts = [samples.rows(start, stop) for start, stop in
                     samples.micro_batch_bounds(self.cfg.train.micro_batch_tokens)]
            model_scores = torch.cat([self.reward_model(p.tokens, cu_seqlens=p.cu_seqlens) for p in parts])
        function_scores = self.function_scores(samples, columns_of)
        return self.total_reward(function_scores, model_scores, None), function_scores

    @torch.no_grad()
    def score(self, samples: StepSamples, order: int, idle_row: StepSamples | None = None) -> list[ScoredPart]:
        """One no-grad pass per model over each packed micro-batch of `samples` (reward function,
        policy, reference, critic, reward model). `order` places the parts in the step's experience,
        so the result does not depend on the order in which batches arrived. `samples` may be empty
        (a rank dealt none of a batch's groups); `idle_row` (one sequence) then feeds its idle passes."""
        cfg = self.cfg
        parts = []
        self._set_training(False)
        bounds = samples.micro_batch_bounds(cfg.train.micro_batch_tokens) if samples.num_sequences else []
        idle_passes = self._lockstep_extra_passes(len(bounds))  # agreed before any pass starts
        for index, (start, stop) in enumerate(bounds):
            part = samples.rows(start, stop)
            width = int(part.response_lengths.max())
            old = ref = values = model_scores = None
            if self.policy_pass_in_score:
                old = self.actor(part.tokens, cu_seqlens=part.cu_seqlens, temperature=cfg.rollout.temperature)
                old = _padded(old["log_probs"], part, width)
            if self.ref is not None:
                ref = self.ref(part.tokens, cu_seqlens=part.cu_seqlens, temperature=cfg.rollout.temperature)
                ref = _padded(ref["log_probs"], part, width)
            if self.critic is not None:
                values = _padded(self.critic(part.tokens, cu_seqlens=part.cu_seqlens), part, width)
            if self.reward_model is not None:
                model_scores = self.reward_model(part.tokens, cu_seqlens=part.cu_seqlens)
            parts.append(ScoredPart(
                samples=part, order=(order, index), mask=_padded(part.loss_mask, part, width),
                behaviour=_padded(part.behaviour_log_probs, part, width), old=old, ref=ref, values=values,
                function_scores=self.function_scores(part), model_scores=model_scores))
        for _ in range(idle_passes):
            self._idle_pass(idle_row if idle_row is not None else samples, backward=False,
                            actor=self.policy_pass_in_score)
        self._set_training(True)
        return parts

    def _set_training(self, mode: bool) -> None:
        """Training (or evaluation) mode of the trained models: dropout, and the recomputation of
        model.gradient_checkpointing, which Transformers applies in training mode only."""
        for engine in (self.actor, self.critic):
            if engine is not None:
                engine.train(mode)

    @torch.no_grad()
    def make_experience(self, parts: list[ScoredPart]) -> Experience:
        """Rewards, KL, advantages and importance weights over the whole step (groups stay together)."""
        cfg, algo = self.cfg, self.cfg.algo
        parts = sorted(parts, key=lambda p: p.order)
        samples = StepSamples.concat([p.samples for p in parts])
        width = max(p.mask.shape[1] for p in parts)

        def cat(field: str) -> torch.Tensor | None:
            if getattr(parts[0], field) is None:
                return None
            return torch.cat([F.pad(getattr(p, field), (0, width - getattr(p, field).shape[1])) for p in parts])

        mask, old, behaviour, ref, values = cat("mask"), cat("old"), cat("behaviour"), cat("ref"), cat("values")
        function_scores, model_scores, overlong = self.reward_terms(parts)
        scores = self.total_reward(function_scores, model_scores, overlong)
        rows = [p.samples.num_sequences for p in parts]
        bounds = [(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(rows))]

        # (with a reference, `score` computed the old log-probs: policy_pass_in_score)
        kl = (approx_kl(old, ref, algo.kl_estimator, algo.kl_clamp, action_mask=mask) if ref is not None
              else torch.zeros_like(behaviour))
        kl_coef = self.kl_controller.value
        token_rewards = shape_token_rewards(scores, kl, mask, kl_coef if algo.kl_mode == "reward" else 0.0)
        advantages, returns = compute_advantages(
            algo.advantage_estimator, action_mask=mask, scores=scores, token_rewards=token_rewards, values=values,
            kl=kl, kl_coef=kl_coef if algo.kl_mode == "reward" else 0.0,
            group_size=cfg.rollout.n_samples_per_prompt, gamma=algo.gamma, lam=algo.lam,
            whiten_advantages=algo.advantage_estimator == "gae")
        self.kl_controller.update(float(masked_mean(kl, mask)), samples.num_sequences)
        metrics = {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            **self.function_metrics(function_scores),
            **({"reward_model_mean": float(model_scores.mean())} if model_scores is not None else {}),
            "response_len": float(mask.sum(1).float().mean()),
            "kl_ref": float(masked_mean(kl, mask)), "kl_coef": kl_coef,
            "truncated_fraction": int(samples.truncated.sum()) / samples.num_sequences,
            **({"overlong_penalty_mean": float(overlong.mean())} if overlong is not None else {}),
        }
        # Cut-off completions stay in their group's baseline above; here they leave every loss and its normaliser.
        loss_mask = mask & ~samples.truncated[:, None] if cfg.train.mask_truncated else mask
        return Experience(samples, loss_mask, old, behaviour, advantages, returns, ref, values, bounds, metrics, scores)

    def reward_terms(self, parts: list[ScoredPart]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What each sequence of `parts` (in their order) scored: the reward functions' [B, F], the
        reward model's [B] and the overlong penalty [B] (None when not used); `total_reward` sums them."""
        r = self.cfg.reward
        function_scores = torch.cat([p.function_scores for p in parts])
        model_scores = torch.cat([p.model_scores for p in parts]) if parts[0].model_scores is not None else None
        lengths = torch.cat([p.samples.response_lengths for p in parts])
        overlong = (overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, r.overlong_buffer, r.overlong_penalty)
                    if r.overlong_buffer else None)
        return function_scores, model_scores, overlong

    def function_metrics(self, function_scores: torch.Tensor) -> dict[str, float]:
        """`reward_fn_<name>_mean` of each reward function, and `reward_function_mean` of their weighted sum."""
        if not self.reward_fns.fns:
            return {}
        weighted = function_scores @ torch.tensor(self.reward_fns.weights, dtype=torch.float32)
        means = function_scores.mean(0).tolist()
        return {"reward_function_mean": float(weighted.mean()),
                **{f"reward_fn_{name}_mean": mean for name, mean in zip(self.reward_fns.names, means)}}

    # ------------------------------------------------------------------ optimisation
    def _normalizer(self, exp: Experience) -> float:
        """Global count the loss divides by, over all micro-batches and ranks (see learner.algo.losses)."""
        if self.cfg.algo.loss_aggregation == "token_mean":
            local = exp.action_mask.sum()
        else:
            local = exp.action_mask.any(1).sum()
        count = local.double()
        if self.world_size > 1:
            dist.all_reduce(count)
        # A step with nothing to train (every completion cut off, under mask_truncated) has all-zero
        # losses; a count of 1 keeps them defined.
        return max(float(count), 1.0) / self.world_size

    def set_learning_rates(self, step: int) -> dict[str, float]:
        """Set actor and critic learning rates for `step` from train.lr_schedule; returns them (`lr`,
        `critic_lr`). A pure function of the step, so a resumed run continues the schedule where
        the checkpoint left it, and every PPO epoch of a step trains at the same rate."""
        t = self.cfg.train
        factor = lr_at(step, num_steps=t.num_steps, warmup_steps=t.warmup_steps, schedule=t.lr_schedule,
                       min_lr_ratio=t.min_lr_ratio)
        rates = {"lr": t.lr * factor, **({"critic_lr": self.cfg.critic.lr * factor} if self.critic is not None else {})}
        for name, engine in (("lr", self.actor), ("critic_lr", self.critic)):
            if engine is not None:
                for group in engine.optimizer.param_groups:
                    group["lr"] = rates[name]
        return rates

    def train_step(self, step: int, parts: list[ScoredPart]) -> dict[str, float]:
        """`optimize` on the experience of the step's scored parts."""
        return self.optimize(step, self.make_experience(parts))

    def optimize(self, step: int, exp: Experience) -> dict[str, float]:
        """One optimizer step per PPO epoch on the step's experience, at `step`'s learning rates;
        `step` also names the step in errors."""
        rates = self.set_learning_rates(step)
        samples = exp.samples
        cfg, algo = self.cfg, self.cfg.algo
        normalizer = self._normalizer(exp)
        agg = dict(aggregation=algo.loss_aggregation, normalizer=normalizer, max_len=cfg.rollout.max_new_tokens)
        sums: dict[str, float] = {}
        # Each micro-batch loss is already divided by the global count: their sum is the step's loss.
        losses: dict[str, float] = {}
        behaviour_metrics = BehaviourMetrics()
        idle_passes = self._lockstep_extra_passes(len(exp.bounds))
        for epoch in range(cfg.train.ppo_epochs):
            for _ in range(idle_passes):
                self._idle_pass(samples, backward=True)
            for index, (start, stop) in enumerate(exp.bounds):
                where = dict(step=step, micro_batch=index, rows=(start, stop),
                             epoch=epoch if cfg.train.ppo_epochs > 1 else None)
                part = samples.rows(start, stop)
                loss = self._policy_micro_batch(exp, part, slice(start, stop), epoch, agg, where, sums,
                                                behaviour_metrics)
                losses["policy_loss"] = losses.get("policy_loss", 0.0) + loss
                if self.critic is not None:
                    vloss = self._value_micro_batch(exp, part, slice(start, stop), agg, where, sums)
                    losses["value_loss"] = losses.get("value_loss", 0.0) + vloss
            self.actor.step()
            if self.critic is not None:
                self.critic.step()
        total = max(float(exp.action_mask.sum()), 1.0) * cfg.train.ppo_epochs
        metrics = {k: v / total for k, v in sums.items()}
        metrics.update({k: v / cfg.train.ppo_epochs for k, v in losses.items()})
        return {**exp.metrics, **behaviour_metrics.result(), **metrics, **rates,
                "grad_norm": float(self.actor.get_global_grad_norm() or 0.0),
                "tokens": float(samples.num_tokens), "sequences": float(samples.num_sequences)}

    # The two micro-batch passes below are functions so that everything a pass builds (its graph,
    # and the [T, V] logits that a branch outside the loss may still hold, e.g. the entropy kept
    # for metrics) is released when it returns, before the next micro-batch's forward: a step's
    # peak memory is that of its largest micro-batch, whatever the number of micro-batches.
    def _policy_micro_batch(self, exp: Experience, part: StepSamples, rows: slice, epoch: int, agg: dict,
                            where: dict, sums: dict[str, float], behaviour_metrics: BehaviourMetrics) -> float:
        """Forward, policy loss (+ KL loss, - entropy bonus) and backward of the actor on the step's
        `rows` (`part`); adds the loss metrics to `sums` and, in epoch 0, the behaviour metrics.
        Returns the micro-batch's loss."""
        algo = self.cfg.algo
        out = self.actor(part.tokens, cu_seqlens=part.cu_seqlens, temperature=self.cfg.rollout.temperature,
                         return_entropy=algo.entropy_coef > 0 or epoch == 0)
        width = exp.action_mask.shape[1]
        log_probs = _padded(out["log_probs"], part, width)
        mask = exp.action_mask[rows]
        behaviour = exp.behaviour_log_probs[rows]
        old = log_probs.detach() if exp.old_log_probs is None else exp.old_log_probs[rows]
        weights = None
        if algo.tis_level != "off":
            weights, is_metrics = truncated_importance_weights(old, behaviour, mask, level=algo.tis_level,
                                                               mode=algo.tis_mode, cap=algo.tis_cap,
                                                               floor=algo.tis_floor)
        if epoch == 0:
            behaviour_metrics.add(old, behaviour, _padded(out["entropy"], part, width).detach(), mask,
                                  is_metrics if weights is not None else {})
        loss, m = policy_loss(
            # without importance sampling the ratio is taken to the behaviour policy itself
            log_probs, old if weights is not None else behaviour, exp.advantages[rows], mask,
            clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip or None,
            importance_weights=weights, ratio_level="sequence" if algo.policy_loss == "gspo" else "token",
            **agg)
        if algo.kl_mode == "loss" and exp.ref_log_probs is not None:
            loss = loss + self.kl_controller.value * kl_loss(log_probs, exp.ref_log_probs[rows], mask,
                                                             estimator=algo.kl_estimator,
                                                             clamp=algo.kl_clamp, **agg)
        if algo.entropy_coef > 0:
            loss = loss - entropy_bonus(_padded(out["entropy"], part, width), mask, algo.entropy_coef, **agg)
        # .item() (the sync the metric needs anyway) before backward: NaN/inf must not reach the gradients
        loss_value = loss.item()
        require_finite_loss(loss_value, "policy loss", **where)
        self.actor.backward(loss, scale_wrt_gas=False)
        _accumulate(sums, m, weight=float(mask.sum()))
        return loss_value

    def _value_micro_batch(self, exp: Experience, part: StepSamples, rows: slice, agg: dict, where: dict,
                           sums: dict[str, float]) -> float:
        """Forward, clipped value loss and backward of the critic on the step's `rows` (`part`); adds
        the value metrics to `sums`. Returns the micro-batch's value loss."""
        mask = exp.action_mask[rows]
        values = _padded(self.critic(part.tokens, cu_seqlens=part.cu_seqlens), part, exp.action_mask.shape[1])
        vloss, vm = value_loss(values, exp.old_values[rows], exp.returns[rows], mask,
                               clip_eps=self.cfg.critic.value_clip or None, **agg)
        vloss_value = vloss.item()
        require_finite_loss(vloss_value, "value loss", **where)
        self.critic.backward(vloss, scale_wrt_gas=False)
        _accumulate(sums, {f"value_{k}": v for k, v in vm.items()}, weight=float(mask.sum()))
        return vloss_value

    def sample_records(self, exp: Experience, prompts: int) -> list[dict]:
        """Every completion of the step's first `prompts` prompts (in grant order), decoded, with its
        reward and advantage, for <output.dir>/samples.jsonl. `advantage` is that of the first
        response token: the sequence's advantage for the group estimators without a KL reward."""
        head = exp.samples.rows(0, min(prompts * self.cfg.rollout.n_samples_per_prompt, exp.samples.num_sequences))
        prompt_texts, completions = head.response_texts(self.tokenizer)
        return [{"prompt_id": int(head.prompt_ids[b]), "prompt": prompt_texts[b], "completion": completions[b],
                 "reward": float(exp.scores[b]), "advantage": float(exp.advantages[b, 0]),
                 "response_tokens": int(head.response_lengths[b]), "finish_reason": head.finish_reasons[b],
                 "weight_version": int(head.weight_versions[b])}
                for b in range(head.num_sequences)]

    def _lockstep_extra_passes(self, local_passes: int) -> int:
        """Idle micro-batch passes this rank adds so that every rank runs as many as the busiest one.

        Under ZeRO-3 every forward and backward gathers the partitioned parameters collectively:
        a rank with fewer micro-batches than another would leave that one waiting forever.
        """
        if self.world_size == 1 or self.cfg.train.zero_stage != 3:
            return 0
        most = torch.tensor([local_passes], dtype=torch.long)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most) - local_passes

    def _idle_pass(self, samples: StepSamples, *, backward: bool, actor: bool = True) -> None:
        """Forward (and a zero-loss backward) of the partitioned models on one sequence: it joins the
        other ranks' parameter gathers and changes nothing. `actor`: the actor takes part."""
        one = samples.rows(0, 1)
        if actor:
            out = self.actor(one.tokens, cu_seqlens=one.cu_seqlens, temperature=self.cfg.rollout.temperature)
            if backward:
                self.actor.backward(out["log_probs"].sum() * 0.0, scale_wrt_gas=False)
        if self.critic is not None:
            values = self.critic(one.tokens, cu_seqlens=one.cu_seqlens)
            if backward:
                self.critic.backward(values.sum() * 0.0, scale_wrt_gas=False)

    def save(self, out_dir: str) -> None:
        """The actor as a Hugging Face directory (LoRA merged) with its tokenizer, on rank 0."""
        state = gathered_state_dict(self.actor_module, self.cfg.train.zero_stage)
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            base = self.actor_module.model.get_base_model() if self.actor_module.is_lora else self.actor_module.model
            base.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)


class BehaviourMetrics:
    """How the learner's old policy relates to the behaviour (vLLM) policy over a step, gathered
    micro-batch by micro-batch: token means, and maxima that show single outlier tokens.

    ``entropy`` (of the learner's distribution), ``kl_behaviour`` (k3 of learner vs behaviour,
    mean and ``_max``), ``behaviour_log_ratio_max`` (largest |learner - behaviour| log-prob of a
    token) and the importance-sampling metrics (``is_*``; means weighted by valid tokens).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, old: torch.Tensor, behaviour: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
            is_metrics: dict[str, torch.Tensor]) -> None:
        """One micro-batch; all tensors ``[b, A]``."""
        valid = mask.bool()
        tokens = float(valid.sum())
        kl = approx_kl(old, behaviour, "k3", clamp=None, action_mask=mask)  # unclamped: outliers stay visible
        means = {"entropy": masked_mean(entropy, mask), "kl_behaviour": masked_mean(kl, mask),
                 **{k: v for k, v in is_metrics.items() if not k.endswith("_max")}}
        log_ratio_size = torch.where(valid, (old - behaviour).abs(), 0.0)  # a micro-batch may have no valid token
        maxima = {"kl_behaviour_max": kl.max(), "behaviour_log_ratio_max": log_ratio_size.max(),
                  **{k: v for k, v in is_metrics.items() if k.endswith("_max")}}
        _accumulate(self.sums, means, weight=tokens)
        for k, v in maxima.items():
            self.maxima[k] = max(self.maxima.get(k, 0.0), float(v))
        self.tokens += tokens

    def result(self) -> dict[str, float]:
        return {**{k: v / max(self.tokens, 1.0) for k, v in self.sums.items()}, **self.maxima}


def _accumulate(sums: dict[str, float], values: dict[str, torch.Tensor], weight: float) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + float(v) * weight


def gathered_state_dict(actor: Actor, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full (LoRA-merged) actor state dict; under ZeRO-3 gathered (and copied) module by module."""
    if zero_stage == 3:
        return {k: v.clone() for k, v in actor.merged_weights(zero3_gather)}
    return actor.merged_state_dict()


def zero3_gather(params: list[torch.nn.Parameter]):
    """Make ZeRO-3 partitioned parameters whole on every rank for the duration of a `with` (collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
