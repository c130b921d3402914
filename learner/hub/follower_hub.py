"""The hub of learner ranks > 0 (learner.hub.interface.Hub): they talk to no rollout and get each
step's batches from rank 0 (`Learner.share_and_score`)."""

from __future__ import annotations


class FollowerHub:
    async def arrivals(self, step, expected, timeout):
        """One placeholder per batch of the step: `Learner.share_and_score` receives the batch itself."""
        for _ in range(expected):
            yield None

    async def evaluation_arrivals(self, timeout_s):
        """Only rank 0 evaluates: nothing comes here."""
        return
        yield  # (an async generator that yields nothing)

    def offer(self, grants):
        pass

    async def publish(self, update):
        pass

    def end_step(self, step, fingerprint, metrics):
        pass

    async def shutdown_rollouts(self, reason):
        pass

    def stats(self) -> dict:
        return {}
