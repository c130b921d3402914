"""Held-out evaluation during training (`eval.*`): rounds of evaluation grants, scored, never trained on.

A round evaluates one weight version v: every prompt of the eval set goes out in evaluation grants
(`WorkGrant.evaluation`, step v, min_weight_version v) with the evaluation's own sampling
settings, as soon as v is published. The hub hands them to the rollouts at once, beside their
training grants (never in a training grant's place), and their engines run them at a lower
priority than training requests (learner.hub.rollout_hub, rollout.engine). Their answers are scored by the
run's reward as they arrive, on rank 0, in the pauses of the driver (while it waits for a step's
batches); when the last one is in, the round's metrics join the row of the step in progress.
Evaluation grants take ids from the planner's sequence but never enter a step, the staleness
accounting or a checkpoint; a round still out when the learner stops is lost, and a resumed run
evaluates the versions of the schedule from its first one on.

A rollout applies new weights as soon as they come, also while an evaluation request waits or
runs, so a round may contain samples of versions newer than v: `eval/newer_weights_fraction` is
the share of its samples that saw a newer version (0 when the engines had room for the whole
round before the next version came).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from protocol.config import RunConfig
from protocol.messages import PackedBatch, SamplingSpec, WorkGrant

from learner.algo import pass_at_k
from learner.data.prompts import EncodedPrompt
from learner.hub.grants import prompt_specs
from learner.hub.interface import Hub
from learner.hub.step_samples import StepSamples

log = logging.getLogger("learner.evaluation")

# Added to rollout.seed for the evaluation's sampling seed: its samples draw from a stream of their own.
EVAL_SEED_STREAM = 1 << 32


def grant_size(prompts: int, most: int) -> int:
    """The largest size <= `most` that divides `prompts`: every evaluation grant holds as many
    prompts, which keeps each sample's seed its own (WorkGrant.request_seed)."""
    return next(size for size in range(min(most, prompts), 0, -1) if prompts % size == 0)


@dataclass
class EvalRound:
    """One weight version's evaluation: the grants still out and what the answered ones scored."""

    version: int
    waiting: set[int]  # grant ids not answered yet
    started: float
    rewards: list[torch.Tensor] = field(default_factory=list)  # per batch [b], prompt by prompt
    function_scores: list[torch.Tensor] = field(default_factory=list)  # per batch [b, F]
    response_lengths: list[torch.Tensor] = field(default_factory=list)
    truncated: list[torch.Tensor] = field(default_factory=list)
    newer_weights: list[torch.Tensor] = field(default_factory=list)  # [b] bool: a token of a version > v

    def add(self, batch: PackedBatch, samples: StepSamples, rewards: torch.Tensor,
            function_scores: torch.Tensor) -> None:
        self.waiting.discard(batch.grant_id)
        self.rewards.append(rewards)
        self.function_scores.append(function_scores)
        self.response_lengths.append(samples.response_lengths.float())
        self.truncated.append(samples.truncated)
        self.newer_weights.append(torch.from_numpy(batch.last_weight_versions > self.version))


class Evaluator:
    """Plans, scores and summarises the evaluation rounds of a run (on rank 0; `enabled` False
    elsewhere, in replay and without eval.path: then every method does nothing)."""

    def __init__(self, cfg: RunConfig, prompts: list[EncodedPrompt], *, stop_token_ids: list[int],
                 rewards: Callable[[StepSamples], tuple[torch.Tensor, torch.Tensor]],
                 function_metrics: Callable[[torch.Tensor], dict[str, float]],
                 allocate_ids: Callable[[int], range]):
        """`prompts`: the eval set (empty: evaluation off); `rewards(samples)`: each sequence's total
        reward [B] and each reward function's scores [B, F]; `function_metrics(scores)`: the reward
        functions' metrics of [B, F] scores; `allocate_ids(n)`: n grant ids of the run."""
        e = cfg.eval
        self.prompts = prompts
        self.every_steps = e.every_steps
        self.final_version = cfg.train.num_steps
        self.n_samples = e.n_samples
        self.pass_k, self.pass_threshold = list(e.pass_k), e.pass_threshold
        self.grant_size = grant_size(len(prompts), cfg.rollout.prompts_per_grant) if prompts else 0
        self.sampling = SamplingSpec(temperature=e.temperature, top_p=e.top_p, top_k=-1,
                                     max_new_tokens=cfg.eval_max_new_tokens, stop_token_ids=list(stop_token_ids),
                                     seed=cfg.rollout.seed + EVAL_SEED_STREAM)
        self.rewards, self.function_metrics, self.allocate_ids = rewards, function_metrics, allocate_ids
        self.round: EvalRound | None = None
        self.completed: dict[str, float] = {}
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def due(self, version: int) -> bool:
        """Whether weight version `version` is on the schedule: 0, every every_steps, the final one."""
        every = self.every_steps
        return version in (0, self.final_version) or (every > 0 and version % every == 0)

    def offer_due(self, version: int, hub: Hub) -> None:
        """Offer `hub` the round of `version` if it is due. A round due while the previous one is
        still out is skipped, except the final one: the previous one is then given up (its answers
        still coming are ignored)."""
        if not self.enabled or not self.due(version):
            return
        if self.round is not None:
            if version != self.final_version:
                self.skipped += 1
                log.warning("evaluation of weight version %d skipped: that of version %d is still out "
                            "(eval.every_steps %d steps take less time than a round)",
                            version, self.round.version, self.every_steps)
                return
            log.warning("evaluation of weight version %d given up for that of the final weights (version %d)",
                        self.round.version, version)
        grants = self.round_grants(version)
        self.round = EvalRound(version, {g.grant_id for g in grants}, time.perf_counter())
        hub.offer(grants)

    def round_grants(self, version: int) -> list[WorkGrant]:
        """The evaluation grants of weight version `version`: the eval set in grants of `grant_size`."""
        size = self.grant_size
        ids = self.allocate_ids(len(self.prompts) // size)
        return [WorkGrant(grant_id=grant_id, step=version, min_weight_version=version, n_samples=self.n_samples,
                          sampling=self.sampling, prompts=prompt_specs(self.prompts[i * size: (i + 1) * size]),
                          evaluation=True)
                for i, grant_id in enumerate(ids)]

    @property
    def outstanding(self) -> bool:
        """Whether a round is still out."""
        return self.round is not None

    def score(self, batch: PackedBatch) -> None:
        """Score an evaluation batch into its round (a batch of a round given up is ignored); the
        round's metrics are ready (`results`) once its last batch is in."""
        current = self.round
        if current is None or batch.grant_id not in current.waiting:
            log.info("evaluation batch of grant %d (version %d) ignored: its round was given up",
                     batch.grant_id, batch.step)
            return
        samples = StepSamples.from_batches([batch])
        rewards, function_scores = self.rewards(samples)
        current.add(batch, samples, rewards, function_scores)
        if not current.waiting:
            self.completed = self.round_metrics(current)
            self.round = None

    def results(self) -> dict[str, float]:
        """The metrics of the round completed since the last call ({} if none)."""
        completed, self.completed = self.completed, {}
        return completed

    async def finish(self, hub: Hub, timeout_s: float) -> dict[str, float]:
        """Wait for the round still out (the final one) and return its metrics."""
        if self.outstanding:
            async for batch in hub.evaluation_arrivals(timeout_s):
                await asyncio.to_thread(self.score, batch)
                if not self.outstanding:
                    break
        return self.results()

    def round_metrics(self, done: EvalRound) -> dict[str, float]:
        """eval/*: the weight version evaluated, reward mean and std over every sample, pass@k over
        prompts (a sample passes with a reward >= eval.pass_threshold), response length, the share
        cut off at the token limit and generated partly by newer weights, and the seconds from the
        round's offer to its last score."""
        rewards = torch.cat(done.rewards)
        passed = (rewards >= self.pass_threshold).view(-1, self.n_samples)  # [prompts, n]: a batch holds whole groups
        metrics = {
            "step": float(done.version), "prompts": float(passed.shape[0]),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            **{f"pass@{k}": float(pass_at_k(passed, k).mean()) for k in self.pass_k},
            "response_len": float(torch.cat(done.response_lengths).mean()),
            "truncated_fraction": float(torch.cat(done.truncated).float().mean()),
            "newer_weights_fraction": float(torch.cat(done.newer_weights).float().mean()),
            "round_s": time.perf_counter() - done.started,
            **self.function_metrics(torch.cat(done.function_scores)),
        }
        return {f"eval/{name}": value for name, value in metrics.items()}
