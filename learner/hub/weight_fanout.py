"""Weight fan-out: which rollouts the learner sends each weight version to, and how.

`transport.weight_relay_fanout` 0 (unicast): every rollout gets the whole update from the learner as
one `WeightUpdate` message, so rank 0 sends one copy per rollout.

>= 1 (relay): the update is streamed as a `WeightHeader` and one `WeightBucket` per bucket, to one
rollout only (the root); every rollout forwards each bucket to at most `fanout` children as soon
as it has it (`protocol.messages.relay_children`: a tree of depth about log_fanout(n), a chain for
1), while it loads the bucket into its own engine. Rank 0 sends one copy per update whatever the
number of rollouts. The learner keeps the plan of each version (who relays to whom) so that

* a rollout is not blamed for a version that its relay parent has not applied either: the parent
  is the one stuck, and it is dropped first (`upstream_of_stuck`); one late with a version that
  came through the relay gets it straight from the learner before it is blamed (`second_chance`:
  its parent may have applied it and then stopped forwarding);
* when a rollout is dropped, the rollouts below it in the latest version's tree that have not
  applied that version get it straight from the learner (`orphans`), and their acknowledgement
  deadline restarts then (`ack_clock_start`).

Rollouts that connect later, and rollouts that announced no relay socket, get the latest version
straight from the learner, streamed the same way.

Streaming is credit-based (protocol.credit): the learner, and every relaying rollout, sends a rollout
the next bucket only once it has credited the previous one, so a rollout holds one bucket from each
sender at a time. Each rollout the learner streams to has its own `RolloutStream` task: `publish`
and `send_direct` return at once, and a rollout that falls behind holds back no other.
"""

from __future__ import annotations

import collections
import functools
import time
from dataclasses import dataclass, field

from protocol.errors import ProtocolError
from protocol.messages import RelayTarget, WeightBucket, WeightCredit, WeightUpdate, relay_children

from learner.hub.rollout_stream import RolloutStream

# Plans kept for acknowledgement bookkeeping: a rollout more versions behind than this is long past
# its acknowledgement deadline anyway.
PLANS_KEPT = 8


@dataclass
class RelayPlan:
    """One version's relay tree: each planned rollout's parent (None: the learner sends to it)."""

    version: int
    parent: dict[bytes, bytes | None] = field(default_factory=dict)

    def ancestors(self, identity: bytes) -> list[bytes]:
        """The rollouts a version passes through on its way to `identity`, nearest first."""
        chain = []
        node = self.parent.get(identity)
        while node is not None:
            chain.append(node)
            node = self.parent.get(node)
        return chain


def plan_relay(version: int, targets: dict[bytes, RelayTarget], fanout: int) -> tuple[RelayPlan, bytes | None, list[RelayTarget]]:
    """The tree of `targets` (identity -> relay socket, in connection order) for one version.

    Returns the plan, the root (the one rollout the learner sends to; None without targets) and the
    root's descendants, which go into the root's header.
    """
    plan = RelayPlan(version)
    if not targets:
        return plan, None, []
    identity_of = {target: identity for identity, target in targets.items()}
    root, *descendants = targets.values()

    def place(node: RelayTarget, below: list[RelayTarget]) -> None:
        for child, its_descendants in relay_children(below, fanout):
            plan.parent[identity_of[child]] = identity_of[node]
            place(child, its_descendants)

    plan.parent[identity_of[root]] = None
    place(root, descendants)
    return plan, identity_of[root], descendants


class MembershipError(RuntimeError):
    """A rollout may not join or leave the rollouts weights go to (learner.hub.nccl_fanout: a fixed NCCL
    group). `fatal`: the run cannot go on; otherwise only that rollout is turned away."""

    def __init__(self, reason: str, *, fatal: bool):
        super().__init__(reason)
        self.fatal = fatal


class WeightFanout:
    """Sends weight versions to the rollouts (unicast or through the relay tree) and keeps the relay
    bookkeeping the hub's acknowledgement checks need. `send(identity, message)` is the hub's sender.
    Rollouts may connect and be dropped at any time."""

    def __init__(self, fanout: int, send):
        self.fanout = fanout
        self.send = send
        self.targets: dict[bytes, RelayTarget] = {}  # connected rollouts with a relay socket
        self.plans: collections.OrderedDict[int, RelayPlan] = collections.OrderedDict()
        self.resent_at: dict[tuple[bytes, int], float] = {}  # (rollout, version) -> sent straight to it
        self.streams: dict[bytes, RolloutStream] = {}  # the rollouts the learner streams versions to
        self.bytes_sent = 0  # weight bytes the learner sent over the run (rank 0's share of the fan-out)

    @property
    def relay(self) -> bool:
        return self.fanout > 0

    def check_hello(self, identity: bytes, engine_info: dict) -> None:
        """Raise MembershipError for a rollout that may not join (never here)."""

    async def welcome(self, identity: bytes) -> None:
        """What a rollout that said hello is told before anything else (nothing here)."""

    def check_departure(self) -> None:
        """Raise MembershipError when no rollout may leave (never here)."""

    def connected(self, identity: bytes, key_name: str, relay_address: str | None) -> None:
        """A rollout said hello, announcing its relay socket (or none); a stream to an earlier process
        with its identity (or to itself before it rejoined) ends."""
        self.disconnected(identity)
        if self.relay and relay_address:
            self.targets[identity] = RelayTarget(address=relay_address, key_name=key_name)

    def disconnected(self, identity: bytes) -> None:
        """A rollout went away (or started again): the learner stops streaming to it."""
        self.targets.pop(identity, None)
        stream = self.streams.pop(identity, None)
        if stream is not None:
            stream.close()

    def credit(self, identity: bytes, credit: WeightCredit) -> None:
        """A rollout let go of a bucket the learner streamed it; ProtocolError ("bad_credit") for a credit
        that is not for the bucket awaiting it."""
        stream = self.streams.get(identity)
        if stream is None:
            raise ProtocolError("bad_credit", f"weight_credit for bucket {credit.index} of version {credit.version}: "
                                              f"the learner streams no weight version to this rollout")
        stream.window.credit(credit)

    def close(self) -> None:
        """Stop every stream (the hub is closing)."""
        for identity in list(self.streams):
            self.disconnected(identity)

    async def publish(self, update: WeightUpdate, identities: list[bytes]) -> None:
        """Send a new version to the connected rollouts `identities`."""
        if not self.relay:
            for identity in identities:
                await self._send_whole(identity, update)
            return
        planned = {i: self.targets[i] for i in identities if i in self.targets}
        plan, root, descendants = plan_relay(update.version, planned, self.fanout)
        self.plans[update.version] = plan
        while len(self.plans) > PLANS_KEPT:
            dropped, _ = self.plans.popitem(last=False)
            self.resent_at = {key: t for key, t in self.resent_at.items() if key[1] != dropped}
        if root is not None:
            self._stream(root, update, descendants)
        for identity in identities:  # rollouts without a relay socket
            if identity not in planned:
                await self.send_direct(identity, update)

    async def send_direct(self, identity: bytes, update: WeightUpdate) -> None:
        """Send a version straight to one rollout (a late joiner, or one cut off from its relay parent)."""
        if self.relay:
            self.resent_at[(identity, update.version)] = time.monotonic()
            self._stream(identity, update, [])
        else:
            await self._send_whole(identity, update)

    def orphans(self, dropped: bytes, applied: dict[bytes, int]) -> list[bytes]:
        """The connected rollouts (`applied`: identity -> applied version) below `dropped` in the latest
        plan that have not applied its version: they must get it straight from the learner."""
        self.disconnected(dropped)
        if not self.plans:
            return []
        plan = next(reversed(self.plans.values()))
        cut_off = [identity for identity, version in applied.items()
                   if version < plan.version and dropped in plan.ancestors(identity)]
        for identity in cut_off:  # their deadline restarts now: the learner sends them the version next
            self.resent_at[(identity, plan.version)] = time.monotonic()
        return cut_off

    def upstream_of_stuck(self, identity: bytes, version: int, applied: dict[bytes, int]) -> bool:
        """Whether a connected rollout that relays `version` to `identity` has not applied it either."""
        plan = self.plans.get(version)
        if plan is None or (identity, version) in self.resent_at:
            return False
        return any(applied.get(node, version) < version for node in plan.ancestors(identity))

    def second_chance(self, identity: bytes, version: int) -> bool:
        """Whether a rollout late with `version` was to get it through the relay and has not been sent it
        directly yet (its parent may have applied it and then stopped forwarding): its deadline restarts
        for every version up to the latest, which the learner then sends it straight."""
        plan = self.plans.get(version)
        if plan is None or plan.parent.get(identity) is None or (identity, version) in self.resent_at:
            return False
        now = time.monotonic()
        for later in [v for v in self.plans if v >= version]:
            self.resent_at[(identity, later)] = now
        return True

    def ack_clock_start(self, identity: bytes, version: int, published_at: float) -> float:
        """When `identity`'s deadline to apply `version` started: its publication, or a later direct re-send."""
        return self.resent_at.get((identity, version), published_at)

    async def _send_whole(self, identity: bytes, update: WeightUpdate) -> None:
        self.bytes_sent += update.total_bytes
        await self.send(identity, update)

    def _stream(self, identity: bytes, update: WeightUpdate, relay: list[RelayTarget]) -> None:
        """Queue `update` on the rollout's stream (started on first use)."""
        stream = self.streams.get(identity)
        if stream is None:
            stream = self.streams[identity] = RolloutStream(identity.decode(errors="replace"),
                                                            functools.partial(self._send_counted, identity))
        stream.enqueue(update, relay, max(self.fanout, 1))

    async def _send_counted(self, identity: bytes, message) -> None:
        if isinstance(message, WeightBucket):
            self.bytes_sent += memoryview(message.data).nbytes
        await self.send(identity, message)
