"""The learner's stream of weight versions to one rollout, under credit flow control (protocol.credit).

A version goes out as its header, then its buckets one by one, each once the rollout has credited the
one before: the rollout (and, through the relay, every rollout below it) holds one bucket from the
learner at a time, and a rollout that falls behind holds back only its own stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from protocol.credit import CreditWindow
from protocol.messages import RelayTarget, WeightUpdate

log = logging.getLogger("learner.hub.rollout_stream")


class RolloutStream:
    """Streams weight versions to one rollout, in order, from a task of its own. `send(message)` sends to
    that rollout. A version queued while another is going out waits for it; of those waiting only the
    newest is kept (the rollout goes from the one it is loading to that one)."""

    def __init__(self, name: str, send: Callable[[object], Awaitable[None]]):
        self.name = name
        self.send = send
        self.window = CreditWindow(name)
        self.sending: int | None = None  # the version going out
        self.waiting: tuple[WeightUpdate, list[RelayTarget], int] | None = None
        self.queued = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"weights-to-{name}")

    def enqueue(self, update: WeightUpdate, relay: list[RelayTarget], fanout: int) -> None:
        """Stream `update` next, with `relay` (the rollout's descendants in the relay tree) in its header.
        A version not newer than the one going out or waiting is not sent again."""
        newest = self.waiting[0].version if self.waiting else self.sending
        if newest is None or update.version > newest:
            self.waiting = (update, relay, fanout)
            self.queued.set()

    def close(self) -> None:
        self.task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                await self.queued.wait()
                self.queued.clear()
                while self.waiting is not None:
                    (update, relay, fanout), self.waiting = self.waiting, None
                    self.sending = update.version
                    await self._stream(update, relay, fanout)
                    self.sending = None
        except Exception:  # noqa: BLE001 - a bug here must not pass silently, nor stop the learner
            log.exception("streaming weights to %s failed", self.name)

    async def _stream(self, update: WeightUpdate, relay: list[RelayTarget], fanout: int) -> None:
        await self.send(update.header(relay, fanout))
        for bucket in update.bucket_messages():
            await self.window.acquire()  # the hub drops a rollout that stops crediting (weight_ack_timeout_s)
            self.window.sent(bucket.version, bucket.index)
            await self.send(bucket)
