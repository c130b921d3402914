"""Recording a live run (output.record), as a wrapper around its RolloutHub.

`RecordedEndpoint` stands in for the hub's LearnerEndpoint: it appends every message the endpoint
accepts to the recording, byte for byte, and remembers which record carried each PackedBatch.
`RecordingHub` wraps the RolloutHub: at the end of each step it appends a step record naming the
records of the batches the step consumed and their sampling seeds, and on a resumed run it answers
the grants that a crashed run's recording already answers (`reusable_batches`) from the recording.
The recording's format is learner.recording.store's; `learner.recording.replay` plays it back.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from pathlib import Path

from protocol.codec import decode
from protocol.messages import Envelope, PackedBatch, WeightUpdate, WorkGrant
from protocol.transport import LearnerEndpoint

from learner.hub.rollout_hub import RolloutHub
from learner.recording.store import RecordingReader, RecordingWriter

log = logging.getLogger("learner.recording.recording_hub")

# A recorded batch that a resumed run can reuse: (step, prompt ids) -> (record number, batch)
Reusable = dict[tuple[int, tuple[int, ...]], tuple[int, PackedBatch]]


def reusable_batches(directory: Path, after_step: int) -> Reusable:
    """Recorded batches of steps after `after_step`, keyed by (step, prompt ids), with their record numbers.

    After a crash, a run resumed from the checkpoint of `after_step` plans the same prompts for the
    same steps again; these batches answer them without generating anything twice. The newest
    recording of a key wins (a run may have crashed more than once). Evaluation batches are never
    trained on, so never reused.
    """
    reader = RecordingReader(directory, on_damage="stop")
    found = {}
    for record in reader.messages():
        body = decode(record.frames).body
        if isinstance(body, PackedBatch) and not body.evaluation and body.step > after_step:
            found[(body.step, _prompt_ids(body))] = (record.number, body)
    return found


def _prompt_ids(batch: PackedBatch) -> tuple[int, ...]:
    return tuple(int(p) for p in dict.fromkeys(batch.prompt_ids.tolist()))


class RecordedEndpoint:
    """The part of a LearnerEndpoint a RolloutHub uses, recording every accepted message."""

    def __init__(self, endpoint: LearnerEndpoint, writer: RecordingWriter):
        self.endpoint = endpoint
        self.writer = writer
        # id(batch) -> its record, for as long as the batch lives (one the hub discards is not kept
        # alive here; messages compare by value, so they cannot be dictionary keys themselves)
        self._records: dict[int, int] = {}
        self._appended: int | None = None
        endpoint.on_accept = self._append

    def _append(self, peer: bytes, frames) -> None:
        self._appended = self.writer.append_message(peer, frames)

    async def recv(self) -> tuple[bytes, Envelope]:
        # The endpoint calls on_accept with a message's frames before its recv returns that message
        # (LearnerEndpoint's contract), so `_appended` is the record of the message returned here.
        self._appended = None
        peer, envelope = await self.endpoint.recv()
        if self._appended is None:
            raise RuntimeError("the endpoint returned a message without passing it to on_accept: not recorded")
        if isinstance(envelope.body, PackedBatch):
            self._records[id(envelope.body)] = self._appended
            weakref.finalize(envelope.body, self._records.pop, id(envelope.body), None)
        return peer, envelope

    def record_of(self, batch: PackedBatch) -> int:
        """The number of the record that holds `batch`, a batch `recv` returned."""
        return self._records[id(batch)]

    async def send(self, peer: bytes, message, weight_version: int) -> None:
        await self.endpoint.send(peer, message, weight_version=weight_version)

    @property
    def rejections(self) -> collections.Counter[str]:
        return self.endpoint.rejections


@dataclasses.dataclass
class Consumed:
    """A batch a step trained on: the record that holds it and the sampling seed that generated it."""

    batch: PackedBatch
    record: int
    seed: int | None


class RecordingHub:
    """A learner.hub.interface.Hub: `hub`, with its run recorded through `endpoint` (the hub's own)."""

    def __init__(self, hub: RolloutHub, endpoint: RecordedEndpoint, reusable: Reusable):
        self.hub = hub
        self.endpoint = endpoint
        self.writer = endpoint.writer
        self.reusable = dict(reusable)
        self.reused = 0
        self.grants: dict[int, WorkGrant] = {}  # training grants offered, until their batch is consumed
        self.from_recording: dict[int, list[Consumed]] = collections.defaultdict(list)  # step -> answers not yet handed over
        self.consumed: dict[int, list[Consumed]] = collections.defaultdict(list)  # step -> batches, until end_step

    def offer(self, grants: list[WorkGrant]) -> None:
        """Offer `grants` to the rollouts, except the training grants that a recorded batch of a
        crashed run answers: those are answered from the recording."""
        live = []
        for grant in grants:
            recorded = None if grant.evaluation else self._recorded_answer(grant)
            if recorded is None:
                live.append(grant)
            else:
                self.from_recording[grant.step].append(recorded)
                self.reused += 1
            if not grant.evaluation:
                self.grants[grant.grant_id] = grant
        self.hub.offer(live)

    def _recorded_answer(self, grant: WorkGrant) -> Consumed | None:
        number, batch = self.reusable.pop((grant.step, tuple(p.prompt_id for p in grant.prompts)), (None, None))
        if batch is None or batch.num_sequences != len(grant.prompts) * grant.n_samples:
            return None
        # generated for the crashed run's grant: its seed is that grant's
        return Consumed(dataclasses.replace(batch, grant_id=grant.grant_id), number, grant.request_seed(0, batch.grant_id))

    async def arrivals(self, step: int, expected_batches: int, timeout_s: float):
        """The batches of `step` answered from the recording, then those the rollouts send."""
        recorded = self.from_recording.pop(step, [])
        consumed = list(recorded)
        for answer in recorded:
            yield answer.batch
        async for batch in self.hub.arrivals(step, expected_batches - len(recorded), timeout_s):
            if not batch.evaluation:
                seed = self.grants[batch.grant_id].request_seed(0)
                consumed.append(Consumed(batch, self.endpoint.record_of(batch), seed))
            yield batch
        # (a step with dynamic sampling asks more than once: each round in grant order)
        self.consumed[step] += sorted(consumed, key=lambda c: c.batch.grant_id)
        for c in consumed:
            self.grants.pop(c.batch.grant_id, None)

    def end_step(self, step: int, fingerprint: dict[str, str], metrics: dict[str, float]) -> None:
        """Record which messages `step` consumed and what it produced."""
        consumed = self.consumed.pop(step)
        self.writer.append_step(step, {"consumed": [c.record for c in consumed],
                                       "seeds": {"sampling": [c.seed for c in consumed]},
                                       "weight_version": step + 1, "fingerprint": fingerprint, "metrics": metrics})
        self.hub.end_step(step, fingerprint, metrics)

    def evaluation_arrivals(self, timeout_s: float):
        return self.hub.evaluation_arrivals(timeout_s)

    async def publish(self, update: WeightUpdate) -> None:
        await self.hub.publish(update)

    async def shutdown_rollouts(self, reason: str) -> None:
        await self.hub.shutdown_rollouts(reason)

    def stats(self) -> dict:
        return self.hub.stats() | {"reused_recorded_batches": float(self.reused)}
