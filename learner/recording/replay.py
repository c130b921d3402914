"""Replay-from-disk: feed the learner a recorded run, with no rollout processes.

A recording (learner.recording.store) holds every wire message the learner accepted, byte for byte, and
one record per optimizer step naming the messages that step consumed and the fingerprint of the
weights it produced. `ReplayHub` is a learner.hub.interface.Hub: `arrivals(step)`
decodes the recorded batches of that step (with the same validating codec as the live path) in
the recorded order, and `end_step` checks that each replayed step has the recorded losses and
produces weights with the recorded fingerprint, so a replay that drifts says at which step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from protocol.codec import decode
from protocol.messages import PackedBatch, WeightUpdate

from learner.recording.store import RecordingReader

log = logging.getLogger("learner.recording.replay")


class ReplayMismatch(RuntimeError):
    """The replayed run diverged from the recorded one."""


class ReplayHub:
    def __init__(self, directory: str, *, verify: bool = True, dump_step: int = -1, dump_dir: Path | None = None):
        self.reader = RecordingReader(directory, on_damage="stop")
        self.steps = {r.step: r.info for r in self.reader.steps()}
        if self.reader.damage is not None:
            log.warning("recording is damaged after its last intact record (%s); replaying what precedes it",
                        self.reader.damage)
        if not self.steps:
            raise ValueError(f"recording {directory} has no optimizer-step records to replay")
        self.verify = verify
        self.dump_step, self.dump_dir = dump_step, dump_dir
        self.last_batches: list[PackedBatch] = []  # those of the step replayed last
        self.taken: dict[int, int] = {}  # step -> recorded batches handed out so far
        self.last_step = max(self.steps)

    @property
    def run_config(self) -> dict:
        return self.reader.header["run_config"]

    def offer(self, grants) -> None:
        """Nothing to hand out: the samples come from the recording."""

    async def arrivals(self, step: int, expected_batches: int, timeout_s: float):
        """The next `expected_batches` recorded batches of `step`, in the recorded order (a step
        with dynamic sampling asks more than once; `end_step` checks that it took them all)."""
        info = self.steps.get(step)
        if info is None:
            raise ReplayMismatch(f"the recording has no step {step} (it ends at step {self.last_step})")
        start = self.taken.get(step, 0)
        numbers = info["consumed"][start: start + expected_batches]
        if len(numbers) != expected_batches:
            raise ReplayMismatch(f"step {step}: recorded {len(info['consumed'])} batches, the replay asks for "
                                 f"{start + expected_batches}")
        self.taken[step] = start + expected_batches
        batches = [decode(self.reader.record(n).frames).body for n in numbers]
        self.last_batches = (self.last_batches if start else []) + batches
        for batch in batches:
            yield batch

    async def evaluation_arrivals(self, timeout_s: float):
        """A replay evaluates nothing (no rollouts to generate evaluations): nothing comes here."""
        return
        yield  # (an async generator that yields nothing)

    async def publish(self, update: WeightUpdate) -> None:
        """No rollouts to send weights to (end_step checks them against the recording)."""

    def end_step(self, step: int, fingerprint: dict[str, str], metrics: dict[str, float]) -> None:
        """Check the replayed step against the recorded one: every recorded batch trained, same
        losses, same resulting weights."""
        recorded = len(self.steps[step]["consumed"])
        if self.taken.pop(step) != recorded:
            raise ReplayMismatch(f"step {step}: the replay collected fewer batches than the {recorded} recorded")
        if step == self.dump_step and self.dump_dir is not None:
            self._dump(step, metrics)
        if not self.verify:
            return
        recorded = self.steps[step]
        for key in ("policy_loss", "value_loss", "reward_mean"):
            if key in recorded["metrics"] and recorded["metrics"][key] != metrics.get(key):
                raise ReplayMismatch(f"step {step}: {key} {metrics.get(key)!r} != recorded {recorded['metrics'][key]!r}")
        if recorded["fingerprint"] != fingerprint:
            raise ReplayMismatch(f"step {step}: resulting weights differ from the recorded run "
                                 f"(fingerprint {fingerprint} != {recorded['fingerprint']})")

    def _dump(self, step: int, metrics: dict[str, float]) -> None:
        """The step's samples (token ids, lengths, behaviour log-probs) and metrics, for inspection."""
        sequences = []
        for batch in self.last_batches:
            for b in range(batch.num_sequences):
                start, stop = int(batch.cu_seqlens[b]), int(batch.cu_seqlens[b + 1])
                sequences.append({"grant_id": batch.grant_id, "prompt_id": int(batch.prompt_ids[b]),
                                  "weight_version": int(batch.weight_versions[b]),
                                  "last_weight_version": int(batch.last_weight_versions[b]),
                                  "prompt_len": int(batch.prompt_lens[b]), "tokens": batch.tokens[start:stop].tolist(),
                                  "behaviour_logprobs": batch.behaviour_logprobs[start:stop].tolist(),
                                  "finish_reason": batch.finish_reasons[b], "label": batch.labels[b]})
        path = Path(self.dump_dir) / f"replay_step_{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "metrics": metrics, "recorded": self.steps[step],
                                    "sequences": sequences}, indent=1))
        log.info("dumped step %d to %s", step, path)

    async def shutdown_rollouts(self, reason: str) -> None:
        """No rollouts to stop."""

    def stats(self) -> dict:
        return {"replayed_from": str(self.reader.directory), "replayed_steps": len(self.steps)}

