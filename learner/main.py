"""The learner process: trains the policy on what the rollout processes stream in.

    python -m learner --config run.yaml [--section.key value ...]

Rank 0 owns the ZeroMQ endpoint. With several ranks (torchrun / the DeepSpeed launcher) each
step's samples are broadcast from rank 0 and split by whole prompt groups across the ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import sys
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from protocol.config import (ConfigArgumentParser, ConfigError, RunConfig, check_inputs, check_weight_transfer_device,
                             config_from_args, config_from_dict, config_to_dict)
from protocol.messages import SCHEMA_VERSION, PackedBatch
from protocol.keys import CurveKeyError

from learner.algo import informative_groups, select_groups
from learner.data.prompts import DatasetError, DataSpec, EncodedPrompt, PromptDataset, load_prompts
from learner.training.checkpoint import CheckpointManager
from learner.training.distributed import GroupDealer, StepBroadcaster, init_distributed, is_rank0, per_rank, reduce_metrics
from learner.evaluation import Evaluator
from learner.hub.grants import GrantPlanner
from learner.hub.factory import open_hub
from learner.hub.interface import Hub
from learner.metrics import MetricsBackendError, MetricsLogger
from learner.recording.store import RecordingError, RecordingReader, RecordingWriter
from learner.recording.recording_hub import reusable_batches
from learner.data.reward_functions import RewardFnError, RewardFunctions
from learner.hub.step_samples import StepSamples
from learner.training.trainer import PPOTrainer, select_rows
from learner.training.weight_sync import WeightPublisher

log = logging.getLogger("learner")


async def train(cfg: RunConfig) -> dict[str, float]:
    """The algorithm: hand out prompts, collect samples, update the policy, push weights. Repeat."""
    learner = Learner(cfg)
    planner = learner.grant_planner()
    evaluator = learner.evaluator(planner)
    async with learner.open_hub() as hub:
        await hub.publish(learner.weight_update(version=learner.start_step))
        hub.offer(planner.release(published_version=learner.start_step))
        evaluator.offer_due(learner.start_step, hub)
        for step in range(learner.start_step, learner.num_steps):
            started = time.perf_counter()
            batches = await collect(step, learner, planner, evaluator, hub, cfg.transport.batch_timeout_s)
            waited = time.perf_counter() - started
            metrics = await asyncio.to_thread(learner.train_step, step, batches)
            update = learner.weight_update(version=step + 1)
            await hub.publish(update)
            hub.offer(planner.release(published_version=step + 1))
            evaluator.offer_due(step + 1, hub)
            hub.end_step(step, update.fingerprint, metrics)  # recorded, or checked against a recording
            learner.log(step, {**metrics, **evaluator.results()}, waited=waited, total=time.perf_counter() - started)
            learner.maybe_checkpoint(step, planner)
        learner.log_final_evaluation(await evaluator.finish(hub, cfg.transport.batch_timeout_s))
        await hub.shutdown_rollouts("training finished")
    return learner.finish()


async def collect(step: int, learner: Learner, planner: GrantPlanner, evaluator: Evaluator, hub: Hub,
                  timeout_s: float) -> list[PackedBatch]:
    """The batches of `step`, each shared with the other learner ranks and scored as it arrives (while
    the rest of the step is on its way), evaluation batches scored meanwhile; with dynamic sampling,
    until the planner hands out no more grants for the step."""
    batches = []
    while True:
        async for arrived in hub.arrivals(step, planner.granted(step) - len(batches), timeout_s):
            if arrived is not None and arrived.evaluation:  # (only rank 0 sees batches here, and evaluates)
                await asyncio.to_thread(evaluator.score, arrived)
            else:
                batches.append(await asyncio.to_thread(learner.share_and_score, arrived))
        more = planner.top_up(step, learner.informative_count(batches))
        if not more:
            return batches
        hub.offer(more)


class Learner:
    """Everything one rank needs: data, reward, models, weight publishing and logging."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path,
                                                           trust_remote_code=cfg.model.trust_remote_code)
        except OSError as exc:  # the first use of model.path: a Hub id that cannot be fetched, a broken directory
            raise ConfigError(f"--model.path {cfg.model.path}: {exc}") from exc
        self.dataset = self.prompt_dataset(DataSpec.of(cfg.data), max_prompt_len=cfg.prompt_len_limit,
                                           shuffle=cfg.data.shuffle)
        self.eval_prompts = self.load_eval_prompts()
        self.stop_token_ids = list(cfg.rollout.stop_token_ids)
        reward_fns = RewardFunctions.from_config(cfg.reward)
        self.trainer = PPOTrainer(cfg, cfg.model.path, self.tokenizer, reward_fns,
                                  columns_of=lambda prompt_id: self.dataset.get(prompt_id).columns)
        self.publisher = WeightPublisher(self.trainer.actor_module, engine_dtype=cfg.rollout.engine_dtype,
                                         bucket_bytes=cfg.transport.weight_bucket_mb << 20,
                                         zero_stage=cfg.train.zero_stage)
        self.broadcaster = StepBroadcaster()
        world = self.broadcaster.world_size
        if world > 1 and cfg.train.prompts_per_step < world:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} prompt groups per step cannot "
                             f"give each of the {world} learner ranks at least one")
        self.dealer = GroupDealer(world, dist.get_rank() if world > 1 else 0, cfg.rollout.n_samples_per_prompt)
        self.scored: dict[int, list] = {}  # grant id -> scored micro-batches of a batch that arrived
        self.informative: dict[int, torch.Tensor] = {}  # grant id -> [groups] whose rewards differ (dynamic sampling)
        self.score_s: dict[int, float] = {}  # grant id -> seconds its scoring took
        self.run_dir = Path(cfg.output.dir)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.start_step, self.resume_state, self.reusable = 0, None, {}
        if cfg.train.resume:
            self.resume()
        o = cfg.output
        self.logger = MetricsLogger(self.run_dir, self.num_steps, o.progress, first_step=self.start_step,
                                    jsonl_stdout=o.jsonl_stdout, tensorboard=o.tensorboard,
                                    wandb_project=o.wandb_project, run_config=config_to_dict(cfg),
                                    plot=o.plot, samples=o.log_samples_every > 0) if is_rank0() else None
        self.last_metrics: dict[str, float] = {}
        self.hub_stats: dict = {}
        self.recorder: RecordingWriter | None = None  # rank 0 with output.record
        self.busy_s = 0.0
        self.wall_start = time.perf_counter()

    def prompt_dataset(self, spec: DataSpec, *, max_prompt_len: int, shuffle: bool) -> PromptDataset:
        """The prompts of `spec`, tokenised with data.apply_chat_template."""
        template = {"auto": None, "yes": True, "no": False}[self.cfg.data.apply_chat_template]
        return PromptDataset(load_prompts(spec), self.tokenizer, max_prompt_len=max_prompt_len,
                             apply_chat_template=template, seed=self.cfg.train.seed, shuffle=shuffle,
                             weights=spec.weights)

    def load_eval_prompts(self) -> list[EncodedPrompt]:
        """The held-out prompts of eval.path (its eval.split and eval.subset, with data.*'s fields) in
        their order, on rank 0 (the one that evaluates); none without eval.path and in a replay (no
        rollouts to generate them)."""
        if not self.cfg.eval.path or not is_rank0():
            return []
        if self.cfg.replay.path:
            log.info("eval.path is set, but a replay has no rollouts to generate evaluations: evaluation skipped")
            return []
        e, d = self.cfg.eval, self.cfg.data
        spec = DataSpec(paths=(e.path,), splits=(e.split,), subsets=(e.subset,), input_key=d.input_key,
                        label_key=d.label_key, section="eval")
        dataset = self.prompt_dataset(spec, max_prompt_len=self.cfg.eval_prompt_len_limit, shuffle=False)
        return dataset.next_batch(len(dataset))

    def evaluator(self, planner: GrantPlanner) -> Evaluator:
        """The run's held-out evaluation (it does nothing without eval prompts), its grant ids from `planner`."""
        columns = {p.prompt_id: p.columns for p in self.eval_prompts}
        return Evaluator(self.cfg, self.eval_prompts, stop_token_ids=self.stop_token_ids,
                         rewards=lambda samples: self.trainer.rewards(samples, columns.__getitem__),
                         function_metrics=self.trainer.function_metrics, allocate_ids=planner.allocate_ids)

    def resume(self) -> None:
        path = self.checkpoints.latest()
        if path is None:
            raise ConfigError(f"--train.resume: no complete checkpoint under {self.checkpoints.directory}")
        self.resume_state = self.checkpoints.load(path, self.trainer.engines)
        self.start_step = self.resume_state["step"] + 1
        recording = self.run_dir / "recording"
        if self.cfg.output.record and recording.exists():
            position = self.resume_state.get("recording_position")
            intact = len(RecordingReader(recording, on_damage="stop"))
            if position is not None and intact < position:
                raise ValueError(f"--train.resume: {recording} holds {intact} intact record(s), but checkpoint {path} "
                                 f"was taken after record {position - 1}: the recording does not go with it")
            self.reusable = reusable_batches(recording, after_step=self.resume_state["step"])
            log.info("%d recorded batch(es) of the interrupted run will be reused", len(self.reusable))
        self.trainer.kl_controller.value = self.resume_state["kl_coef"]
        log.info("resumed from %s: continuing at step %d", path, self.start_step)

    def grant_planner(self) -> GrantPlanner:
        planner = GrantPlanner(self.cfg, self.dataset, self.stop_token_ids)
        if self.resume_state is not None:
            planner.resume(self.start_step, self.resume_state["planner"])
        return planner

    def maybe_checkpoint(self, step: int, planner: GrantPlanner) -> None:
        every = self.cfg.train.save_every
        if every <= 0 or self.cfg.replay.path or ((step + 1) % every and step + 1 != self.num_steps):
            return
        state = {"weight_version": step + 1, "planner": planner.state_after(step),
                 "kl_coef": self.trainer.kl_controller.value, "run_id": self.cfg.run_id,
                 # the recording's records before this one (every message the saved steps consumed)
                 "recording_position": self.recorder.next_number if self.recorder is not None else None}
        self.checkpoints.save(step, self.trainer.engines, self.trainer.save, state)

    @property
    def num_steps(self) -> int:
        stop = self.cfg.replay.stop_after_step if self.cfg.replay.path else -1
        return self.cfg.train.num_steps if stop < 0 else min(stop + 1, self.cfg.train.num_steps)

    @contextlib.asynccontextmanager
    async def open_hub(self):
        """This rank's hub (learner.hub.factory), the run recorded on rank 0 with output.record."""
        live = is_rank0() and not self.cfg.replay.path
        self.recorder = self.open_recording() if live and self.cfg.output.record else None
        try:
            async with open_hub(self.cfg, rank0=is_rank0(), run_dir=self.run_dir, vocab_size=self.vocab_size(),
                                recorder=self.recorder, reusable=self.reusable) as hub:
                yield hub
            self.hub_stats = hub.stats()
        finally:
            if self.recorder is not None:
                self.recorder.close()

    def open_recording(self) -> RecordingWriter:
        """The run's recording (output.record): a new one, or the interrupted run's on resume."""
        recording = self.run_dir / "recording"
        if self.cfg.train.resume and recording.exists():
            return RecordingWriter.open_existing(recording)
        return RecordingWriter(recording, run_config=config_to_dict(self.cfg), protocol_version=SCHEMA_VERSION)

    def vocab_size(self) -> int:
        return int(self.trainer.actor_module.config.vocab_size)

    def weight_update(self, version: int):
        """The WeightUpdate that carries the current policy weights as version `version`."""
        return self.publisher.build(version)

    def share_and_score(self, batch: PackedBatch | None) -> PackedBatch:
        """Take a batch as soon as it arrives: share it with the other learner ranks (rank 0 sends
        it; they pass None and receive it) and score this rank's groups of it (reward, policy,
        reference, critic passes). Returns the batch."""
        started = time.perf_counter()
        if self.broadcaster.world_size > 1:
            batch = self.broadcaster.share([batch] if is_rank0() else None)[0]
        samples = StepSamples.from_batches([batch])
        parts = self.scored[batch.grant_id] = self.trainer.score(self.dealer.deal(samples), order=batch.grant_id,
                                                                 idle_row=samples.rows(0, 1))
        if self.cfg.algo.dynamic_sampling:  # (one learner rank: it holds every group)
            self.informative[batch.grant_id] = informative_groups(
                self.trainer.total_reward(*self.trainer.reward_terms(parts)), self.cfg.rollout.n_samples_per_prompt)
        self.score_s[batch.grant_id] = time.perf_counter() - started
        self.busy_s += self.score_s[batch.grant_id]
        return batch

    def informative_count(self, batches: list[PackedBatch]) -> int:
        """Informative groups (rewards not all equal) among `batches`; 0 without dynamic sampling."""
        return sum(int(self.informative[b.grant_id].sum()) for b in batches if b.grant_id in self.informative)

    def train_step(self, step: int, batches) -> dict[str, float]:
        started = time.perf_counter()
        # planned (grant) order, not arrival order: the step log lists prompts as the dataset dealt them
        batches = sorted(batches, key=lambda b: b.grant_id)
        samples = StepSamples.from_batches(batches)
        parts = [part for b in batches for part in self.scored.pop(b.grant_id)]
        selection = {}
        if self.cfg.algo.dynamic_sampling:
            parts, kept, selection = self.trained_groups(parts, torch.cat([self.informative.pop(b.grant_id)
                                                                           for b in batches]))
            samples = samples.select(kept)
        if self.logger:
            self.logger.log_step_samples(step, samples.prompt_ids[:: self.cfg.rollout.n_samples_per_prompt].tolist(),
                                         sorted(set(samples.weight_versions.tolist())))
        # counted from the version a sample started with (the oldest that generated any of its tokens)
        staleness = (step - samples.weight_versions).float()
        spanned = np.concatenate([b.last_weight_versions != b.weight_versions for b in batches])
        self.dealer.new_step()
        experience = self.trainer.make_experience(parts)
        # the peak so far of the rank that holds the most
        metrics = reduce_metrics({**self.trainer.optimize(step, experience), "peak_rss_mib_max": peak_rss_mib()})
        every = self.cfg.output.log_samples_every
        if self.logger and every and step % every == 0:  # rank 0's own prompt groups
            self.logger.log_samples(step, self.trainer.sample_records(experience, self.cfg.output.log_samples))
        seconds = time.perf_counter() - started
        self.busy_s += seconds
        return {**metrics, **selection,
                "staleness_mean": float(staleness.mean()), "staleness_max": float(staleness.max()),
                "update_in_flight_fraction": float(spanned.mean()),
                "tokens_per_s": samples.num_tokens / seconds, "train_s": seconds,
                "score_s": sum(self.score_s.pop(b.grant_id) for b in batches),
                "gen_s": float(sum(b.gen_seconds for b in batches))}

    def trained_groups(self, parts: list, informative: torch.Tensor) -> tuple[list, torch.Tensor, dict[str, float]]:
        """Dynamic sampling: `parts` (the step's, in grant order) cut to the groups it trains
        (`select_groups` of the step's `informative` flags), the rows kept [B] and the metrics
        dynamic_sampling/*: groups generated, informative, dropped (generated, not trained),
        filled (uninformative ones trained for want of informative ones) and prompts generated
        per prompt trained."""
        chosen = select_groups(informative, self.cfg.train.prompts_per_step)
        kept = chosen.repeat_interleave(self.cfg.rollout.n_samples_per_prompt)
        groups, trained = informative.numel(), int(chosen.sum())
        metrics = {"groups": float(groups), "groups_informative": float(informative.sum()),
                   "groups_dropped": float(groups - trained), "groups_filled": float((chosen & ~informative).sum()),
                   "prompts_generated_per_trained": groups / trained}
        return select_rows(parts, kept), kept, {f"dynamic_sampling/{k}": v for k, v in metrics.items()}

    def log(self, step: int, metrics: dict[str, float], *, waited: float, total: float) -> None:
        self.last_metrics = {**metrics, "wait_s": waited, "step_s": total,
                             "learner_busy_fraction": self.busy_s / (time.perf_counter() - self.wall_start)}
        if self.logger:
            self.logger.log(step, self.last_metrics)

    def log_final_evaluation(self, metrics: dict[str, float]) -> None:
        """The final weights' evaluation: a row of its own at step train.num_steps (after the last
        step), and in the summary's final metrics."""
        if not metrics:
            return
        self.last_metrics = {**self.last_metrics, **metrics}
        if self.logger:
            self.logger.log(self.num_steps, metrics, advance=False)

    def finish(self) -> dict[str, float]:
        if self.logger:
            self.logger.close()
        if self.cfg.output.save_final:
            self.trainer.save(str(self.run_dir / "final"))
        peaks = per_rank(peak_rss_mib())
        if is_rank0():
            summary = {"final_metrics": self.last_metrics, "learner_peak_rss_mib": peaks, **self.hub_stats}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return self.last_metrics


def peak_rss_mib() -> float:
    """The largest resident memory this process has had so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Mistakes in what the user gave (config, data, reward function, keys, recording, logging backends):
# reported as one line, the traceback going to the log.
USER_ERRORS = (ConfigError, CurveKeyError, DatasetError, RewardFnError, RecordingError, MetricsBackendError)


def main(argv: list[str] | None = None) -> int:
    parser = ConfigArgumentParser(prog="python -m learner", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        cfg = run_config(args)
    except USER_ERRORS as exc:
        parser.exit(2, f"error: {exc}\n")
    init_distributed()
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s learner[{os.environ.get('RANK', '0')}] "
                                                   "%(levelname)s %(message)s")
    if is_rank0():
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output.dir) / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    try:
        metrics = asyncio.run(train(cfg))
    except USER_ERRORS as exc:
        rank = os.environ.get("RANK", "0")
        return report_user_error(exc, Path(cfg.output.dir) / "logs" / ("learner.log" if rank == "0" else
                                                                       f"learner-{rank}.log"))
    if is_rank0():
        print(json.dumps({"final": {k: round(v, 4) for k, v in metrics.items()}}))
    return 0


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's config from the flags (on top of a replayed recording's), checked before anything loads."""
    replay_path = vars(args).get("replay.path")
    if replay_path:
        # A replay starts from the recorded run's config; flags still override it.
        recorded = config_from_dict(RecordingReader(replay_path).header["run_config"], f"recording {replay_path}")
        recorded.output.record = False
        recorded.output.wandb_project = ""
        recorded.output.dir = str(Path(replay_path).resolve().parent / "replay")
        cfg = config_from_args(args, recorded)
    else:
        cfg = config_from_args(args)
    if not cfg.model.path or not cfg.data.path:
        raise ConfigError("--model.path and --data.path are required (launch/local.sh prepares the built-in task)")
    check_inputs(cfg, "learner")
    if not cfg.replay.path:  # a replay sends no weights
        check_weight_transfer_device(cfg, "learner", torch.cuda.is_available())
    if not cfg.run_id:
        cfg.run_id = uuid.uuid4().hex[:12]
    return cfg


def report_user_error(exc: Exception, log_path: Path) -> int:
    """One line on stderr for the user; the traceback, for a bug report, appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log_file:
        traceback.print_exception(exc, file=log_file)
    print(f"error: {exc} (traceback in {log_path})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
