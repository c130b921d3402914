"""The hub: where the driver's samples come from and where its weights go.

`learner.main.train` and the evaluator talk to a hub only through this interface. The hubs:

- `learner.hub.rollout_hub.RolloutHub`: the live one, rollout processes over ZeroMQ (rank 0);
- `learner.recording.recording_hub.RecordingHub`: a live hub whose run is recorded (output.record), and
  that answers grants from a crashed run's recording on resume;
- `learner.recording.replay.ReplayHub`: a recorded run played back from disk, no rollouts (replay.path);
- `learner.hub.follower_hub.FollowerHub`: learner ranks > 0, which get each step's batches from rank 0.

`learner.hub.factory.open_hub` picks one for the run.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

from protocol.messages import PackedBatch, WeightUpdate, WorkGrant


@runtime_checkable
class Hub(Protocol):
    def offer(self, grants: list[WorkGrant]) -> None:
        """Queue grants (training and evaluation) to be answered."""

    async def publish(self, update: WeightUpdate) -> None:
        """Make a new weight version the one samples are generated with from now on."""

    def arrivals(self, step: int, expected_batches: int, timeout_s: float) -> AsyncIterator[PackedBatch | None]:
        """The `expected_batches` training batches of `step` as they come (None on a rank that
        receives them from rank 0), and any evaluation batch that comes meanwhile."""

    def evaluation_arrivals(self, timeout_s: float) -> AsyncIterator[PackedBatch]:
        """Evaluation batches as they come, for as long as the caller asks."""

    def end_step(self, step: int, fingerprint: dict[str, str], metrics: dict[str, float]) -> None:
        """`step` is trained: its weights have `fingerprint`, its metrics are `metrics`."""

    async def shutdown_rollouts(self, reason: str) -> None:
        """Tell the rollouts (if any) that the run is over."""

    def stats(self) -> dict:
        """Counters for the run's summary.json."""
