"""A rollout's side of the weight relay: its relay socket, and its links to the relay children it forwards to.

Each link (`RelayChild`) sends headers and buckets in the order they came, from a task of its own, under
credit flow control (protocol.credit): a bucket goes out once the child has credited the one before,
and the link lets go of it (`BucketRelease`) once ZeroMQ has written it out. So this rollout holds a
received bucket until it is loaded and written out to each child, and no longer.

A child that does not credit a bucket, or take it, within its patience is cut off for the version: its
link closes and lets go of what it still holds, and the learner later sends it the version straight.
Its patience grows with the height of its subtree (`relay_patience_s`): a child waiting on a stuck
child of its own cuts that one off first, and is not cut off for it.
"""

from __future__ import annotations

import asyncio
import logging

from protocol.credit import CreditWindow
from protocol.errors import ProtocolError
from protocol.log_throttle import worth_logging
from protocol.messages import RelayTarget, WeightBucket, WeightCredit, relay_height
from protocol.transport import LearnerEndpoint, RolloutClient, written

log = logging.getLogger("rollout.relay")

# The patience of a relay parent with a child that has no relay children, at most: long enough for a
# child's engine step to end and its engine to load a bucket.
RELAY_SEND_TIMEOUT_S = 10.0
# Messages ZeroMQ queues towards one relay child, and into a relay socket from one parent, before the
# sender waits. Credits already keep buckets to one at a time; this also bounds headers, and what a
# parent that ignores credits could push.
RELAY_QUEUE = 2


def relay_patience_s(ack_timeout_s: float, descendants: int, fanout: int) -> float:
    """How long a relay parent waits for a child with `descendants` below it to credit or take a bucket.

    `min(RELAY_SEND_TIMEOUT_S, ack_timeout_s / 8) * (1 + height)`, the height of the child's subtree
    (protocol.messages.relay_height): a child's patience with its own children is shorter than its
    parent's with it, so a stuck rollout is cut off by its own parent, not by its ancestors. A stuck
    rollout with h levels below it holds up its ancestors (1 + h) / 8 of ack_timeout_s at most, less
    than the learner gives each of them to apply the version for h <= 6 (64 rollouts at fanout 2)."""
    return min(RELAY_SEND_TIMEOUT_S, ack_timeout_s / 8) * (1 + relay_height(descendants, fanout))


class RelayChild:
    """This rollout's link to one relay child, until the child is cut off (`cut_off`)."""

    def __init__(self, target: RelayTarget, client: RolloutClient):
        self.target = target
        self.client = client
        self.window = CreditWindow(f"relay child {target.key_name} ({target.address})")
        self.queue: asyncio.Queue = asyncio.Queue()  # (message, BucketRelease or None, patience in s)
        self.cut_off = False
        self.refused = 0
        self.tasks = [asyncio.create_task(self._send_all()), asyncio.create_task(self._take_credits())]

    def put(self, message, release, patience_s: float) -> None:
        """Send `message` (a header or a bucket) after those before it; `release` (a BucketRelease, for a
        bucket) is held until it has been written out, or until the child is cut off."""
        if self.cut_off:
            return
        self.queue.put_nowait((message, release.hold() if release else None, patience_s))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self._let_go()
        self.client.close()

    async def _send_all(self) -> None:
        while not self.cut_off:
            await self._send_next(await self.queue.get())  # nothing of the last message outlives its send

    async def _send_next(self, item) -> None:
        message, release, patience_s = item
        del item
        try:
            await self._send(message, patience_s)
        except Exception as exc:  # noqa: BLE001 - a child that cannot take it is cut off, whatever the reason
            log.warning("relay child %s (%s) did not take %s: %s; cut off from this version", self.target.key_name,
                        self.target.address, type(message).__name__, exc or type(exc).__name__)
            self.cut_off = True
            self.close()
        finally:
            if release is not None:
                release.release()

    async def _send(self, message, patience_s: float) -> None:
        """Wait for the credit of the bucket before (a bucket), send, wait until written out: each within
        `patience_s`."""
        what = f"{type(message).__name__} of version {message.version}"
        if isinstance(message, WeightBucket):
            what = f"bucket {message.index} of version {message.version}"
            try:
                await self.window.acquire(patience_s)
            except TimeoutError:
                raise TimeoutError(f"it credited no bucket for {patience_s:g} s") from None
            self.window.sent(message.version, message.index)
        tracker = await asyncio.wait_for(self.client.send(message, weight_version=message.version, track=True),
                                         patience_s)
        await written(tracker, patience_s, what)

    async def _take_credits(self) -> None:
        """The child's credits, into the window; anything else it sends is refused (and logged, throttled)."""
        while True:
            try:
                body = (await self.client.recv()).body
                if isinstance(body, WeightCredit):
                    self.window.credit(body)
                else:
                    self._refuse(f"a {type(body).__name__} message: a relay child sends weight credits only")
            except ProtocolError as exc:  # malformed (the client counted it), or not for the bucket awaiting credit
                self._refuse(str(exc))
            except Exception as exc:  # noqa: BLE001 - no more credits: the send side times out and cuts it off
                log.warning("relay child %s (%s): %s; taking no more credits from it", self.target.key_name,
                            self.target.address, exc)
                return

    def _refuse(self, why: str) -> None:
        self.refused += 1
        if worth_logging(self.refused):
            log.warning("refused from relay child %s (%s): %s (%d refused so far)", self.target.key_name,
                        self.target.address, why, self.refused)

    def _let_go(self) -> None:
        while not self.queue.empty():
            _, release, _ = self.queue.get_nowait()
            if release is not None:
                release.release()


class RelayLinks:
    """This rollout's relay socket (a `LearnerEndpoint`: the same checks and CURVE allow-list as the
    learner's socket) and its links to the relay children it forwards to."""

    def __init__(self, inbox: LearnerEndpoint, connect, ack_timeout_s: float):
        self.inbox = inbox
        self.connect = connect  # RelayTarget -> RolloutClient
        self.ack_timeout_s = ack_timeout_s  # transport.weight_ack_timeout_s: bounds the patience with children
        self.children: dict[RelayTarget, RelayChild] = {}

    @property
    def address(self) -> str:
        return self.inbox.address

    def child(self, target: RelayTarget) -> RelayChild:
        """The link to `target`: a new one if there is none, or if it was cut off."""
        link = self.children.get(target)
        if link is None or link.cut_off:
            link = self.children[target] = RelayChild(target, self.connect(target))
        return link

    def patience_s(self, descendants: int, fanout: int) -> float:
        return relay_patience_s(self.ack_timeout_s, descendants, fanout)

    def credit_to(self, parent: bytes):
        """How to credit the relay parent `parent` (its identity on the relay socket) for a bucket."""
        async def send(credit: WeightCredit) -> None:
            await self.inbox.send(parent, credit, weight_version=credit.version)
        return send

    def keep_only(self, targets: list[RelayTarget]) -> None:
        """Close the links to children that are no longer ours."""
        for target in [t for t in self.children if t not in targets]:
            self.children.pop(target).close()

    def close(self) -> None:
        for link in self.children.values():
            link.close()
        self.children.clear()
        self.inbox.close()
