"""Streamed weight versions on a rollout: received bucket by bucket, relayed on, loaded as they come.

A version arrives as a `WeightHeader` and one `WeightBucket` per bucket, from the learner or from the
rollout's relay parent (learner.hub.weight_fanout), or whole as a `WeightUpdate` (unicast), which is
taken apart into the same pieces. `WeightStreams` forwards the header and each bucket to this
rollout's relay children (rollout.relay), then hands the bucket to the engine thread, which loads it
(`IncomingUpdate.tensors`) and lets it go.

Flow control (protocol.credit): once a streamed bucket is loaded and written out to every relay child
(`BucketRelease`), its sender is credited (`WeightCredit`) and only then sends the next one. So besides
what its engine holds, a rollout holds one bucket from each sender, plus the tensors its engine keeps
across a bucket boundary (copies, `copied_from`), not a copy of the model. While its engine may not load
(rollout.inflight_update finish, requests running) buckets are credited as they come and the version
waits whole.

A version may arrive twice (its relay parent was dropped and the learner sent it again, straight):
the second copy fills in only the buckets still missing, and each copy's buckets are credited to
their own sender.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator

from protocol.errors import ProtocolError
from protocol.messages import TensorMeta, WeightBucket, WeightCredit, WeightHeader, WeightUpdate, relay_children

log = logging.getLogger("rollout.weights")

Credit = Callable[[WeightCredit], Awaitable[None]]  # sends a credit to the sender of a bucket


class UpdateAbandoned(RuntimeError):
    """The rest of a streamed version will not come (this rollout is rejoining or stopping)."""


class BucketRelease:
    """Who still holds one received bucket: the rollout while it hands it on, the engine thread until it
    has loaded it, each relay child's link until the bucket is written out. When the last one lets go,
    `on_free` runs on the event loop. `hold` and `release` may be called from any thread."""

    def __init__(self, on_free: Callable[[], None]):
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._holders = 1  # the caller, until it has handed the bucket on
        self._on_free = on_free

    def hold(self) -> BucketRelease:
        with self._lock:
            self._holders += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            free = self._holders == 0
        if free:
            self._loop.call_soon_threadsafe(self._on_free)


def module_of(name: str) -> str:
    """The module a tensor belongs to, as vLLM fuses them: `model.layers.3.self_attn` for
    `model.layers.3.self_attn.q_proj.weight` (q, k and v load into one qkv_proj)."""
    return name.rsplit(".", 2)[0]


def copied_from(metas: list[list[TensorMeta]]) -> list[int]:
    """For each bucket (its tensors, in order), the position of the first tensor handed to the engine as
    a copy rather than as a view of the bucket: none (its length) for the last bucket and for a bucket
    whose tail would be all of it; otherwise its last tensor, and the run of tensors before it in the
    module the next bucket starts with. The engine may keep those while the next bucket comes (a loop's
    last item; vLLM keeps the parts of a fused module, q/k/v or gate/up, until the last one is loaded):
    a view would keep the whole bucket, a copy keeps the tensors only."""
    starts = []
    for index, tensors in enumerate(metas):
        following = next((b[0] for b in metas[index + 1:] if b), None)
        start = len(tensors) - 1 if following is not None else len(tensors)
        while 0 < start < len(tensors) and module_of(tensors[start - 1].name) == module_of(following.name):
            start -= 1
        starts.append(start if start > 0 else len(tensors))
    return starts


def bucket_tensors(data, metas: list[TensorMeta], copy_from: int) -> Iterator[tuple[TensorMeta, memoryview]]:
    """Each tensor of a bucket as a view of `data`, those from position `copy_from` on as copies."""
    view = memoryview(data).cast("B")
    for position, meta in enumerate(metas):
        piece = view[meta.offset: meta.offset + meta.nbytes]
        yield meta, (memoryview(bytearray(piece)) if position >= copy_from else piece)


class IncomingUpdate:
    """One streamed version as it arrives; its buckets go, in index order, to the engine thread."""

    def __init__(self, header: WeightHeader):
        self.header = header
        self.next_index = 0  # buckets before it have been handed to the engine thread
        self.early: dict[int, tuple] = {}  # index -> (data, release): arrived ahead of a missing one (two senders)
        # thread-safe: (data, release) filled by the event loop, drained by the engine thread
        self.ready: queue.Queue = queue.Queue()
        self.metas: list[list[TensorMeta]] = [[] for _ in header.bucket_sizes]
        for meta in header.tensors:
            self.metas[meta.bucket].append(meta)
        self.copy_from = copied_from(self.metas)

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

    def add(self, bucket: WeightBucket, release: BucketRelease | None = None) -> bool:
        """Take in a bucket, holding `release` until the engine thread has loaded it; False for one already
        taken. Raises ProtocolError for one that does not fit the header."""
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
        self.early[bucket.index] = (bucket.data, release.hold() if release else None)
        while self.next_index in self.early:
            self.ready.put(self.early.pop(self.next_index))
            self.next_index += 1
        return True

    def discard(self) -> None:
        """Let go of every bucket the engine thread has not taken."""
        held = list(self.early.values())
        self.early.clear()
        while True:
            try:
                held.append(self.ready.get_nowait())
            except queue.Empty:
                break
        for _, release in filter(None, held):
            if release is not None:
                release.release()

    def abandon(self) -> None:
        """Let go of the buckets not loaded yet; the engine thread's `tensors` raises UpdateAbandoned
        instead of waiting for the rest."""
        self.discard()
        self.ready.put(None)

    def tensors(self, timeout_s: float) -> Iterator[tuple[TensorMeta, memoryview]]:
        """Every tensor of the version, waiting for each bucket up to `timeout_s` (TimeoutError); a bucket
        is let go once the engine asks for the tensor after its last one. Engine thread only."""
        for index, metas in enumerate(self.metas):
            try:
                item = self.ready.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"bucket {index} of weight version {self.version} did not arrive within "
                                   f"{timeout_s:g} s (transport.weight_ack_timeout_s)") from None
            if item is None:
                raise UpdateAbandoned(f"weight version {self.version} abandoned at bucket {index}")
            data, release = item
            del item
            try:
                yield from bucket_tensors(data, metas, self.copy_from[index])
            finally:
                del data  # this thread's last reference: the bucket goes once written out to the relay children
                if release is not None:
                    release.release()


class WeightStreams:
    """The versions a rollout is receiving: relays each piece on, keeps it for the engine, and credits
    each streamed bucket to its sender once it has let go of it.

    `links`: the relay (rollout.relay.RelayLinks), None without a relay socket. `parked()`: whether the
    engine may not load weights now (buckets are then credited as they come, and the version waits whole).
    """

    def __init__(self, links=None, parked: Callable[[], bool] = lambda: False):
        self.links = links
        self.parked = parked
        self.incoming: dict[int, IncomingUpdate] = {}
        self.children: dict[int, list] = {}  # version -> [(RelayChild, patience in s)] it is forwarded to
        self.epoch = 0  # advances when every version is abandoned: buckets held before then are not credited
        self.crediting: set[asyncio.Task] = set()

    def on_header(self, header: WeightHeader, applied_version: int) -> None:
        if header.version not in self.children:
            children = relay_children(header.relay, header.fanout)
            if children and self.links is None:
                raise ProtocolError("bad_value", f"weight_header {header.version} asks this rollout to relay, "
                                                 f"but it has no relay socket (transport.weight_relay_fanout 0)")
            self.children[header.version] = self._forward_header(header, children)
        if header.version > applied_version and header.version not in self.incoming:
            self.incoming[header.version] = IncomingUpdate(header)

    def on_bucket(self, bucket: WeightBucket, credit: Credit | None) -> None:
        """Take in a bucket, and forward it; `credit` credits its sender once this rollout has let go of it
        (None: nobody to credit, a whole update)."""
        release = None
        if credit is not None:
            release = BucketRelease(functools.partial(self._credit, credit, bucket.version, bucket.index, self.epoch))
        try:
            update = self.incoming.get(bucket.version)
            if update is not None and not update.add(bucket, None if self.parked() else release):
                return  # a copy of one already taken (and forwarded)
            for child, patience_s in self.children.get(bucket.version, []):
                child.put(bucket, release, patience_s)
        finally:
            if release is not None:
                release.release()

    def on_whole(self, update: WeightUpdate, applied_version: int) -> None:
        """A version sent whole (unicast): taken in as if streamed, with no sender to credit."""
        self.on_header(update.header(), applied_version)
        for bucket in update.bucket_messages():
            self.on_bucket(bucket, None)

    def next_update(self, applied_version: int) -> IncomingUpdate | None:
        """The oldest version newer than `applied_version` whose header has come (older ones are dropped)."""
        for version in sorted(self.incoming):
            if version <= applied_version:
                self._forget(version)
        return self.incoming[min(self.incoming)] if self.incoming else None

    def done(self, version: int) -> None:
        self._forget(version)

    def abandon_all(self) -> None:
        """Give up every version (rejoining or stopping): their senders are not credited any more."""
        self.epoch += 1
        for version in list(self.incoming):
            self.incoming.pop(version).abandon()
            self._forget(version)

    def _forget(self, version: int) -> None:
        update = self.incoming.pop(version, None)
        if update is not None:
            update.discard()
        for old in [v for v in self.children if v < version]:
            del self.children[old]

    def _credit(self, credit: Credit, version: int, index: int, epoch: int) -> None:
        if epoch == self.epoch:
            task = asyncio.ensure_future(self._send_credit(credit, WeightCredit(version=version, index=index)))
            self.crediting.add(task)
            task.add_done_callback(self.crediting.discard)

    @staticmethod
    async def _send_credit(credit: Credit, message: WeightCredit) -> None:
        try:
            await credit(message)
        except Exception as exc:  # noqa: BLE001 - a sender that has gone away needs no credit
            log.info("could not credit bucket %d of weight version %d: %s", message.index, message.version, exc)

    def _forward_header(self, header: WeightHeader, children) -> list:
        if self.links is None:
            return []
        targets = [child for child, _ in children]
        if set(targets) != set(self.links.children):
            log.info("relaying weight version %d to %s", header.version, [t.key_name for t in targets] or "nobody")
        self.links.keep_only(targets + [link.target for kids in self.children.values() for link, _ in kids])
        forwarded = []
        for child, below in children:
            link = self.links.child(child)
            patience_s = self.links.patience_s(len(below), header.fanout)
            link.put(WeightHeader(version=header.version, tensors=header.tensors, bucket_sizes=header.bucket_sizes,
                                  fingerprint=header.fingerprint, relay=below, fanout=header.fanout), None, patience_s)
            forwarded.append((link, patience_s))
        return forwarded
