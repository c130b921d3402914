"""Credit-based flow control of streamed weight buckets: one bucket at a time on each link.

A sender (the learner, or a relaying rollout) sends a receiver bucket k+1 of a streamed version only
once the receiver has credited the bucket before it (`WeightCredit`: it no longer holds it). However
fast or slow either side is, a receiver then holds at most one bucket from each of its senders, and
nothing piles up in a queue between them. Headers need no credit: they are small.
"""

from __future__ import annotations

import asyncio

from .errors import ProtocolError
from .messages import WeightCredit

__all__ = ["CreditWindow"]


class CreditWindow:
    """A sender's side of one link: the bucket, if any, that went out and awaits the receiver's credit."""

    def __init__(self, receiver: str):
        self.receiver = receiver  # named in errors
        self.awaiting: tuple[int, int] | None = None  # (version, index) sent and not credited yet
        self._open = asyncio.Event()
        self._open.set()

    def sent(self, version: int, index: int) -> None:
        """Bucket `index` of `version` is going out: the next one waits for its credit. Call it before
        sending, so that a credit cannot come back before the window knows what it is for."""
        self.awaiting = (version, index)
        self._open.clear()

    def credit(self, credit: WeightCredit) -> None:
        """Take in a credit. ProtocolError ("bad_credit") for one that is not for the bucket awaiting
        credit (a second credit, a bucket never sent, another version): it opens nothing."""
        if (credit.version, credit.index) != self.awaiting:
            if self.awaiting is None:
                expected = "no bucket awaits credit on this link"
            else:
                expected = f"the bucket awaiting credit is bucket {self.awaiting[1]} of version {self.awaiting[0]}"
            raise ProtocolError("bad_credit", f"weight_credit from {self.receiver} for bucket {credit.index} of "
                                              f"version {credit.version}: {expected}")
        self.awaiting = None
        self._open.set()

    async def acquire(self, timeout_s: float | None = None) -> None:
        """Return once no bucket awaits credit; TimeoutError after `timeout_s` seconds (None: no limit)."""
        if not self._open.is_set():
            await asyncio.wait_for(self._open.wait(), timeout_s)
