"""Streamed weight versions on a rollout: received bucket by bucket, relayed on, loaded as they come.

A version arrives as a `WeightHeader` and one `WeightBucket` per bucket, from the learner or from the
rollout's relay parent (learner.hub.weight_fanout), or whole as a `WeightUpdate` (unicast), which is
taken apart into the same pieces. `WeightStreams` forwards the header and each bucket to this
rollout's relay children as soon as it has them (`RelayLinks`), then hands the bucket to the engine
thread, which loads it (`IncomingUpdate.tensors`) and lets it go: besides what its engine holds, a
rollout holds the buckets not yet loaded, not a copy of the model.

A version may arrive twice (its relay parent was dropped and the learner sent it again, straight):
the second copy fills in only the buckets still missing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator

from protocol.errors import ProtocolError
from protocol.messages import RelayTarget, TensorMeta, WeightBucket, WeightHeader, WeightUpdate, relay_children
from protocol.transport import LearnerEndpoint, RolloutClient

log = logging.getLogger("rollout.weights")

# A relay child that takes no bucket for this long is cut off for the version: the learner sends it
# the version straight once it drops the child for not applying it, and the others are not held up.
RELAY_SEND_TIMEOUT_S = 10.0
# Buckets ZeroMQ queues towards one relay child (and into a relay socket) before the sender waits:
# a slow child slows its parent down instead of piling buckets up in the parent's memory.
RELAY_QUEUE = 2


class UpdateAbandoned(RuntimeError):
    """The rest of a streamed version will not come (this rollout is rejoining or stopping)."""


class IncomingUpdate:
    """One streamed version as it arrives; its buckets go, in index order, to the engine thread."""

    def __init__(self, header: WeightHeader):
        self.header = header
        self.next_index = 0  # buckets before it have been handed to the engine thread
        self.early: dict[int, WeightBucket] = {}  # arrived ahead of a missing one (two senders)
        self.ready: queue.Queue = queue.Queue()  # thread-safe: filled by the event loop, drained by the engine thread
        self.metas: list[list[TensorMeta]] = [[] for _ in header.bucket_sizes]
        for meta in header.tensors:
            self.metas[meta.bucket].append(meta)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def complete(self) -> bool:
        return self.next_index == len(self.header.bucket_sizes)

    def layout(self) -> list:
        """Each bucket's size and tensors as plain values, as the engine's workers receive a version broadcast
        over NCCL (rollout.worker_extension.BucketLayout); its buckets never come through here then."""
        return [(size, [(m.name, m.dtype, list(m.shape), m.offset, m.nbytes) for m in metas])
                for size, metas in zip(self.header.bucket_sizes, self.metas)]

    def add(self, bucket: WeightBucket) -> bool:
        """Take in a bucket; False for one already taken. Raises ProtocolError for one that does not fit the header."""
        count = len(self.header.bucket_sizes)
        if bucket.index >= count:
            raise ProtocolError("out_of_bounds", f"weight_bucket.index: {bucket.index} of version {self.version}, "
                                                 f"whose header announced {count} bucket(s)")
        size = memoryview(bucket.data).nbytes
        if size != self.header.bucket_sizes[bucket.index]:
            raise ProtocolError("length_mismatch", f"weight_bucket {bucket.index} of version {self.version}: {size} "
                                                   f"bytes, its header announced {self.header.bucket_sizes[bucket.index]}")
        if bucket.index < self.next_index or bucket.index in self.early:
            return False
        self.early[bucket.index] = bucket
        while self.next_index in self.early:
            self.ready.put(self.early.pop(self.next_index).data)
            self.next_index += 1
        return True

    def abandon(self) -> None:
        """Make the engine thread's `tensors` raise UpdateAbandoned instead of waiting for the rest."""
        self.ready.put(None)

    def tensors(self, timeout_s: float) -> Iterator[tuple[TensorMeta, memoryview]]:
        """Every tensor of the version as a view of its bucket, waiting for each bucket up to `timeout_s`
        (TimeoutError); a bucket is released once its tensors have been consumed. Engine thread only."""
        for index, metas in enumerate(self.metas):
            try:
                data = self.ready.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"bucket {index} of weight version {self.version} did not arrive within "
                                   f"{timeout_s:g} s (transport.weight_ack_timeout_s)") from None
            if data is None:
                raise UpdateAbandoned(f"weight version {self.version} abandoned at bucket {index}")
            view = memoryview(data).cast("B")
            for meta in metas:
                yield meta, view[meta.offset: meta.offset + meta.nbytes]
            del data, view


class RelayLinks:
    """This rollout's side of the relay: its relay socket (a `LearnerEndpoint`: the same checks and
    CURVE allow-list as the learner's socket) and a client to each relay child it forwards to."""

    def __init__(self, inbox: LearnerEndpoint, connect):
        self.inbox = inbox
        self.connect = connect  # RelayTarget -> RolloutClient
        self.clients: dict[RelayTarget, RolloutClient] = {}

    @property
    def address(self) -> str:
        return self.inbox.address

    async def forward(self, targets: list[RelayTarget], message, weight_version: int) -> list[RelayTarget]:
        """Send `message` to every target at once; returns the targets that did not take it in time."""
        results = await asyncio.gather(*(self._send(t, message, weight_version) for t in targets))
        return [t for t, ok in zip(targets, results) if not ok]

    async def _send(self, target: RelayTarget, message, weight_version: int) -> bool:
        client = self.clients.get(target) or self.clients.setdefault(target, self.connect(target))
        try:
            await asyncio.wait_for(client.send(message, weight_version=weight_version), RELAY_SEND_TIMEOUT_S)
            return True
        except Exception as exc:  # noqa: BLE001 - a child that cannot take it is cut off, whatever the reason
            log.warning("relay child %s (%s) did not take %s: %s; cut off from this version",
                        target.key_name, target.address, type(message).__name__, exc or type(exc).__name__)
            self.clients.pop(target).close()
            return False

    def keep_only(self, targets: list[RelayTarget]) -> None:
        """Close the clients of children that are no longer ours."""
        for target in [t for t in self.clients if t not in targets]:
            self.clients.pop(target).close()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        self.inbox.close()


class WeightStreams:
    """The versions a rollout is receiving: relays each piece on, then keeps it for the engine."""

    def __init__(self, links: RelayLinks | None = None):
        self.links = links
        self.incoming: dict[int, IncomingUpdate] = {}
        self.children: dict[int, list[RelayTarget]] = {}  # version -> the children it is forwarded to

    async def on_header(self, header: WeightHeader, applied_version: int) -> None:
        if header.version not in self.children:
            children = relay_children(header.relay, header.fanout)
            if children and self.links is None:
                raise ProtocolError("bad_value", f"weight_header {header.version} asks this rollout to relay, "
                                                 f"but it has no relay socket (transport.weight_relay_fanout 0)")
            self.children[header.version] = await self._forward_headers(header, children)
        if header.version > applied_version and header.version not in self.incoming:
            self.incoming[header.version] = IncomingUpdate(header)

    async def on_bucket(self, bucket: WeightBucket) -> None:
        update = self.incoming.get(bucket.version)
        if update is not None and not update.add(bucket):
            return  # a copy of one already taken (and forwarded)
        children = self.children.get(bucket.version, [])
        if children:
            late = await self.links.forward(children, bucket, bucket.version)
            self.children[bucket.version] = [c for c in children if c not in late]

    async def on_whole(self, update: WeightUpdate, applied_version: int) -> None:
        """A version sent whole (unicast): taken in as if streamed."""
        await self.on_header(update.header(), applied_version)
        for bucket in update.bucket_messages():
            await self.on_bucket(bucket)

    def next_update(self, applied_version: int) -> IncomingUpdate | None:
        """The oldest version newer than `applied_version` whose header has come (older ones are dropped)."""
        for version in sorted(self.incoming):
            if version <= applied_version:
                self._forget(version)
        return self.incoming[min(self.incoming)] if self.incoming else None

    def done(self, version: int) -> None:
        self._forget(version)

    def abandon_all(self) -> None:
        for version in list(self.incoming):
            self.incoming[version].abandon()
            self._forget(version)

    def _forget(self, version: int) -> None:
        self.incoming.pop(version, None)
        for old in [v for v in self.children if v < version]:
            del self.children[old]

    async def _forward_headers(self, header: WeightHeader, children) -> list[RelayTarget]:
        if self.links is None:
            return []
        targets = [child for child, _ in children]
        if set(targets) != set(self.links.clients):
            log.info("relaying weight version %d to %s", header.version, [t.key_name for t in targets] or "nobody")
        self.links.keep_only(targets + [t for kids in self.children.values() for t in kids])
        ok = []
        for child, below in children:
            sub = WeightHeader(version=header.version, tensors=header.tensors, bucket_sizes=header.bucket_sizes,
                               fingerprint=header.fingerprint, relay=below, fanout=header.fanout)
            if not await self.links.forward([child], sub, header.version):
                ok.append(child)
        return ok
