"""When a rollout applies the weight updates it received, per rollout.inflight_update.

The engine is a stand-in holding only the update bookkeeping, with VLLMGenerator's own rule for
when weights may be applied; the real engine's side of each mode is tested end to end
(tests/e2e/test_inflight_update.py).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from protocol.config import RunConfig
from protocol.messages import PromptSpec, SamplingSpec, WeightAck, WeightUpdate, WorkGrant
from rollout.engine import VLLMGenerator
from rollout.main import RolloutWorker


class UpdateOnlyEngine:
    """Busy while it holds running requests; records the versions applied, in order."""

    ready_for_weights = VLLMGenerator.ready_for_weights

    def __init__(self, mode: str, busy: bool):
        self.inflight_update = mode
        self.busy = busy
        self.weight_version = 0
        self.applied: list[int] = []

    def apply_weight_stream(self, version: int, fingerprint_names: list[str], tensors, staging_dir: str,
                            timeout_s: float) -> dict[str, str]:
        assert list(tensors) == []
        self.applied.append(version)
        self.weight_version = version
        return {"w": f"print-{version}"}

    def cancel_all(self) -> int:
        return 0


def update(version: int) -> WeightUpdate:
    return WeightUpdate(version=version, tensors=[], buckets=[], fingerprint={"w": f"print-{version}"})


def worker_with(mode: str, *, busy: bool) -> tuple[RolloutWorker, UpdateOnlyEngine, list]:
    """A rollout whose engine runs requests (`busy`), holding a grant for version 0 and updates 1 and 2."""
    worker = RolloutWorker(RunConfig(), 0, "model")
    worker.engine = UpdateOnlyEngine(mode, busy)
    sent = []

    async def send(message):
        sent.append(message)

    worker.send = send
    sampling = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4, stop_token_ids=[], seed=0)
    worker.grants.append(WorkGrant(grant_id=0, step=0, min_weight_version=0, n_samples=1, sampling=sampling,
                                   prompts=[PromptSpec(prompt_id=0, token_ids=np.array([1, 2]), label=None)]))
    for version in (1, 2):
        worker.streams.on_whole(update(version), worker.engine.weight_version)
    return worker, worker.engine, sent


def acks(sent: list) -> list[tuple[int, dict]]:
    return [(m.version, m.fingerprint) for m in sent if isinstance(m, WeightAck)]


@pytest.mark.parametrize("mode", ["recompute", "keep"])
def test_updates_land_at_once_while_requests_run(mode):
    worker, engine, sent = worker_with(mode, busy=True)
    try:
        asyncio.run(worker.apply_updates())
        assert engine.applied == [1, 2]
        assert acks(sent) == [(1, {"w": "print-1"}), (2, {"w": "print-2"})]
        assert not worker.update_waiting() and worker.runnable_grant() is worker.grants[0]
    finally:
        worker.engine_thread.shutdown()


def test_finish_holds_updates_and_new_grants_until_the_running_requests_end():
    worker, engine, sent = worker_with("finish", busy=True)
    try:
        asyncio.run(worker.apply_updates())
        assert engine.applied == [] and acks(sent) == []
        assert worker.runnable_grant() is None, "a new grant must wait for the held update"

        engine.busy = False  # the running requests have finished
        asyncio.run(worker.apply_updates())
        assert engine.applied == [1, 2]
        assert acks(sent) == [(1, {"w": "print-1"}), (2, {"w": "print-2"})]
        assert worker.runnable_grant() is worker.grants[0]
    finally:
        worker.engine_thread.shutdown()


def test_after_a_hello_again_the_learners_version_is_loaded_whatever_its_number():
    """A resumed learner numbers its versions from its checkpoint again: after the rollout says hello
    again, a version it has already loaded (by number) is loaded and acknowledged once more; within
    one hello, a version older than the newest loaded is skipped."""
    worker, engine, sent = worker_with("keep", busy=False)
    try:
        asyncio.run(worker.apply_updates())
        worker.take_weights(update(1), worker.send)  # late, within the same hello: skipped
        asyncio.run(worker.apply_updates())
        assert engine.applied == [1, 2]

        asyncio.run(worker.rejoin("the learner was lost"))
        worker.take_weights(update(2), worker.send)  # the resumed learner's current version, sent on hello
        asyncio.run(worker.apply_updates())
        assert engine.applied == [1, 2, 2]
        assert acks(sent)[-1] == (2, {"w": "print-2"})
    finally:
        worker.engine_thread.shutdown()
