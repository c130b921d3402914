"""The learner's side of the wire: rollout peers, work hand-out, sample collection, weight pushes.

Runs on learner rank 0 inside its asyncio loop. `serve()` keeps receiving while the trainer works
in a thread, so batches, acknowledgements and heartbeats are taken in as they arrive.
Every PackedBatch is checked against the grant it answers (right peer, right prompts, enough
samples, weights recent enough and acknowledged) before it is accepted.

Liveness means progress, not heartbeats: a rollout that holds work it could generate but sends
no batch and applies no weights within `progress_timeout_s`, or that does not apply a published
version within `ack_timeout_s`, is dropped like a dead one (its work re-issued) and told to rejoin.
A grant held longer than `straggler_timeout_s` is also handed to an idle rollout; the first answer
is trained on, any later one discarded.

Evaluation grants (held-out evaluation, learner.evaluation) queue apart from training grants and
never take a training grant's place: they go out at once, shared evenly among the rollouts, beside
the training grants, and a rollout's engine runs them at a lower priority than its training work
(rollout.engine), so that a round is generated as close to its weight version as the engines'
spare room allows. Their answers are handed to the driver as they come, whatever step it waits for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import (Heartbeat, Hello, PackedBatch, RolloutError, Shutdown, WeightAck, WeightCredit,
                               WeightUpdate, WorkGrant)
from protocol.log_throttle import worth_logging
from protocol.transport import LearnerEndpoint, PeerUnreachableError

from learner.hub.weight_fanout import MembershipError, WeightFanout

log = logging.getLogger("learner.hub.rollout_hub")

# Grants held per rollout: its engine generates both together, and the next one is already there
# when one finishes, so an engine never waits on a round trip.
MAX_GRANTS_PER_PEER = 2


class RolloutFailure(RuntimeError):
    """A rollout process reported a fatal error, sent inconsistent data or stopped answering."""


@dataclass
class Peer:
    identity: bytes
    producer_id: str
    connected_at: float
    last_seen: float
    last_progress: float  # a batch accepted, a version applied, or work received while idle
    applied_version: int = -1
    acked_versions: list[int] = field(default_factory=list)
    grants: dict[int, WorkGrant] = field(default_factory=dict)

    def held(self, *, evaluation: bool) -> list[WorkGrant]:
        """The training or the evaluation grants this rollout holds."""
        return [g for g in self.grants.values() if g.evaluation == evaluation]


@dataclass
class PublishedVersion:
    version: int
    fingerprint: dict[str, str]
    sent_at: float
    ack_latency: dict[str, float] = field(default_factory=dict)  # send -> ack, per rollout
    apply_seconds: dict[str, float] = field(default_factory=dict)  # time the engine took to load it


class RolloutHub:
    """The live learner.hub.interface.Hub: grants go to the connected rollouts, their answers are
    checked and handed to the driver. `serve()` (the receive loop) must run beside it."""

    def __init__(self, endpoint: LearnerEndpoint, *, ack_timeout_s: float, peer_timeout_s: float = 60.0,
                 progress_timeout_s: float = 300.0, straggler_timeout_s: float = 0.0, min_live_rollouts: int = 0,
                 weight_relay_fanout: int = 0, fanout: Callable[..., WeightFanout] | None = None):
        """`fanout(send)`: what sends weight versions, given the hub's sender (default: over ZeroMQ,
        WeightFanout with `weight_relay_fanout`; learner.hub.nccl_fanout over NCCL)."""
        self.endpoint = endpoint
        self.ack_timeout_s = ack_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.progress_timeout_s = progress_timeout_s
        self.straggler_timeout_s = straggler_timeout_s
        self.min_live_rollouts = min_live_rollouts
        self.too_few_since: float | None = None  # when the connected rollouts fell below min_live_rollouts
        self.peers: dict[bytes, Peer] = {}
        self.handed_out_at: dict[int, float] = {}  # grant id -> when it first went to a rollout
        self.duplicated: set[int] = set()  # grants also handed to a second rollout (stragglers), until answered
        self.answered: set[int] = set()  # duplicated grants answered once: a later answer is discarded
        self.pending: collections.deque[WorkGrant] = collections.deque()
        self.eval_pending: collections.deque[WorkGrant] = collections.deque()
        self.batches: dict[int, list[PackedBatch]] = collections.defaultdict(list)
        self.eval_batches: list[PackedBatch] = []
        self.published: dict[int, PublishedVersion] = {}
        self.latest: WeightUpdate | None = None  # the only update kept in full: late joiners need it
        self.fanout = fanout(self._send_to) if fanout else WeightFanout(weight_relay_fanout, self._send_to)
        self.orphaned: set[bytes] = set()  # rollouts cut off from their relay parent: the latest goes to them directly
        self.discarded: collections.Counter[str] = collections.Counter()
        self.failure: RolloutFailure | None = None
        self.dropped_peers = 0
        self.changed = asyncio.Condition()

    # ------------------------------------------------------------------ driver-facing API
    def offer(self, grants: list[WorkGrant]) -> None:
        """Queue grants; they go to rollouts with free slots, oldest first."""
        for grant in grants:
            (self.eval_pending if grant.evaluation else self.pending).append(grant)

    async def wait_for_rollouts(self, count: int, timeout_s: float) -> None:
        """Wait until `count` rollouts have said hello; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        async with self.changed:
            while len(self.peers) < count:
                self._raise_if_failed()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.peers)} of {count} rollouts connected within {timeout_s:.0f} s "
                                       f"(transport.min_rollouts, transport.batch_timeout_s)")
                await self._next_change(remaining)
        log.info("%d rollout(s) connected, handing out work", len(self.peers))

    async def publish(self, update: WeightUpdate) -> None:
        """Send a new weight version to every connected rollout, directly or through the relay tree
        (learner.hub.weight_fanout), and to any that connects later."""
        self.latest = update
        self.published[update.version] = PublishedVersion(update.version, dict(update.fingerprint), time.monotonic())
        self.orphaned.clear()  # this version's tree is made of the rollouts connected now
        await self.fanout.publish(update, list(self.peers))

    async def arrivals(self, step: int, expected_batches: int, timeout_s: float):
        """Yield the batches of `step` as they are accepted, until every grant of the step is
        answered, and every evaluation batch accepted meanwhile (`batch.evaluation`)."""
        deadline = time.monotonic() + timeout_s
        yielded = 0
        while yielded < expected_batches:
            async with self.changed:
                while len(self.batches[step]) <= yielded and not self.eval_batches:
                    await self._wait_for_work(deadline, lambda: (
                        f"step {step}: {len(self.batches[step])}/{expected_batches} batches after {timeout_s:.1f} s"))
                arrived = self.batches[step][yielded:] + self._take_eval_batches()
            for batch in arrived:
                if not batch.evaluation:
                    yielded += 1
                yield batch
        self.batches.pop(step, None)

    async def evaluation_arrivals(self, timeout_s: float):
        """Yield evaluation batches as they are accepted, for as long as the caller asks; TimeoutError
        when none comes for `timeout_s`."""
        while True:
            deadline = time.monotonic() + timeout_s
            async with self.changed:
                while not self.eval_batches:
                    await self._wait_for_work(deadline, lambda: f"no evaluation batch for {timeout_s:.1f} s")
                arrived = self._take_eval_batches()
            for batch in arrived:
                yield batch

    def _take_eval_batches(self) -> list[PackedBatch]:
        arrived, self.eval_batches = self.eval_batches, []
        return arrived

    async def _wait_for_work(self, deadline: float, waiting_for) -> None:
        """One turn of waiting (holding `changed`) for an accepted message: fail on a failure, drop
        rollouts without progress, hand out work; TimeoutError past `deadline`, `waiting_for()` saying
        what for."""
        self._raise_if_failed()
        await self._drop_peers_without_progress()
        self._check_enough_rollouts()
        await self._dispatch()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            evaluation = f", {len(self.eval_pending)} evaluation grant(s)" if self.eval_pending else ""
            raise TimeoutError(f"{waiting_for()}; {len(self.peers)} rollout(s) connected, {len(self.pending)} "
                               f"grant(s){evaluation} unassigned")
        await self._next_change(remaining)

    def end_step(self, step: int, fingerprint: dict[str, str], metrics: dict[str, float]) -> None:
        """Nothing to do: the rollouts learn of new weights from `publish` (recording a step is
        learner.recording.recording_hub's)."""

    async def heartbeats(self, interval_s: float) -> None:
        """Tell every rollout the learner is alive (they give up on a silent learner)."""
        while True:
            await asyncio.sleep(interval_s)
            for peer in list(self.peers.values()):
                await self._send(peer, Heartbeat(state="training"))

    async def shutdown_rollouts(self, reason: str) -> None:
        # Weight streams stop first: a bucket still going out (the last version, which no step needs)
        # would reach a rollout that has gone and drop it, as if it had failed.
        self.fanout.close()
        for peer in list(self.peers.values()):
            await self._send(peer, Shutdown(reason=reason))

    def stats(self) -> dict:
        latencies = [lat for pv in self.published.values() for lat in pv.ack_latency.values()]
        applies = [s for pv in self.published.values() for s in pv.apply_seconds.values()]
        return {"rollouts": len(self.peers),
                "weight_push_latency_s": float(np.mean(latencies)) if latencies else 0.0,
                "weight_apply_s": float(np.mean(applies)) if applies else 0.0,
                "rejected_messages": float(sum(self.endpoint.rejections.values())),
                "discarded_batches": float(sum(self.discarded.values())),
                "duplicate_answers": float(self.discarded["duplicate_answer"]),
                "dropped_rollouts": float(self.dropped_peers),
                "weight_bytes_sent": float(self.fanout.bytes_sent),
                "applied_versions": self.applied_versions()}

    def applied_versions(self) -> dict[str, list[int]]:
        """Weight versions each rollout acknowledged (with a matching fingerprint)."""
        return {p.producer_id: list(p.acked_versions) for p in self.peers.values()}

    # ------------------------------------------------------------------ receive loop
    async def serve(self) -> None:
        try:
            await self._serve()
        except Exception as exc:  # noqa: BLE001 - surfaced to the driver through collect()
            self.failure = RolloutFailure(f"the learner's receive loop failed: {type(exc).__name__}: {exc}")
            log.exception("receive loop failed")
            async with self.changed:
                self.changed.notify_all()
        finally:
            self.fanout.close()  # weight streams wait for credits that only this loop takes in

    async def _serve(self) -> None:
        while True:
            identity, envelope = await self.endpoint.recv()
            peer = self.peers.get(identity)
            message = envelope.body
            if isinstance(message, Hello):
                await self._on_hello(identity, envelope.producer_id, message)
            elif peer is None:
                # before its hello, or after it was dropped (it is told to rejoin)
                self._discard("unknown_peer", f"{envelope.kind} from {identity!r}, not a connected rollout")
                continue
            else:
                peer.last_seen = time.monotonic()
                if isinstance(message, PackedBatch):
                    self._on_batch(peer, message)
                elif isinstance(message, WeightAck):
                    self._on_ack(peer, message)
                elif isinstance(message, WeightCredit):
                    self._on_credit(peer, message)
                elif isinstance(message, RolloutError):
                    log.error("%s reported: %s", peer.producer_id, message.message)
                    if message.fatal:
                        # The process is going away; its work goes to the others (or to its restart).
                        self._drop(peer, "reported a fatal error")
                elif not isinstance(message, Heartbeat):
                    self._discard("unexpected_kind", f"{envelope.kind} from {peer.producer_id}")
            await self._dispatch()
            async with self.changed:
                self.changed.notify_all()

    async def _on_hello(self, identity: bytes, producer_id: str, hello: Hello) -> None:
        try:
            self.fanout.check_hello(identity, hello.engine_info)
        except MembershipError as exc:
            await self._turn_away(identity, producer_id, exc)
            return
        now = time.monotonic()
        if identity in self.peers:
            # A restarted process with the same identity: its old grants go back to the queue.
            self._requeue(list(self.peers[identity].grants.values()))
        peer = self.peers[identity] = Peer(identity, producer_id, now, now, now)
        log.info("rollout %s connected (%d total)", producer_id, len(self.peers))
        relay_address = hello.engine_info.get("relay_address")
        self.fanout.connected(identity, producer_id.split("@", 1)[0], relay_address if isinstance(relay_address, str) else None)
        await self.fanout.welcome(identity)
        if self.latest is not None:
            await self.fanout.send_direct(identity, self.latest)

    async def _turn_away(self, identity: bytes, producer_id: str, refusal: MembershipError) -> None:
        """A rollout that may not join: the run stops (a fatal refusal), or that rollout is told to stop."""
        if refusal.fatal:
            self.failure = RolloutFailure(f"rollout {producer_id} {refusal}")
            return
        self._discard("refused_rollout", f"{producer_id} {refusal}")
        with contextlib.suppress(PeerUnreachableError):
            await self.endpoint.send(identity, Shutdown(reason=f"refused: {refusal}"),
                                     weight_version=self.latest.version if self.latest else -1)

    def _on_batch(self, peer: Peer, batch: PackedBatch) -> None:
        if batch.grant_id in self.answered:  # a straggler's grant that another rollout answered first
            self.answered.discard(batch.grant_id)
            self._discard("duplicate_answer", f"{peer.producer_id} answered grant {batch.grant_id} after another rollout")
            return
        grant = peer.grants.get(batch.grant_id)
        if grant is None:
            self._discard("unknown_grant", f"batch for grant {batch.grant_id} that {peer.producer_id} does not hold")
            return
        problem = _mismatch(grant, batch, peer)
        if problem:
            # Inconsistent data from our own rollout is a bug, not noise: stop the run loudly.
            self.failure = RolloutFailure(f"{peer.producer_id}, grant {grant.grant_id}: {problem}")
            return
        del peer.grants[batch.grant_id]
        peer.last_progress = time.monotonic()
        self.handed_out_at.pop(batch.grant_id, None)
        if batch.grant_id in self.duplicated:
            self.duplicated.discard(batch.grant_id)
            self.answered.add(batch.grant_id)
            for other in self.peers.values():  # the other holder is free for new work
                other.grants.pop(batch.grant_id, None)
        (self.eval_batches if grant.evaluation else self.batches[grant.step]).append(batch)

    def _on_ack(self, peer: Peer, ack: WeightAck) -> None:
        published = self.published.get(ack.version)
        if published is None:
            self._discard("unknown_version", f"{peer.producer_id} acked unpublished version {ack.version}")
            return
        if ack.fingerprint != published.fingerprint:
            self.failure = RolloutFailure(
                f"{peer.producer_id} applied weight version {ack.version} with fingerprint {ack.fingerprint}, "
                f"expected {published.fingerprint}: the weights it loaded are not the ones sent")
            return
        peer.applied_version = max(peer.applied_version, ack.version)
        peer.last_progress = time.monotonic()
        peer.acked_versions.append(ack.version)
        published.ack_latency[peer.producer_id] = time.monotonic() - published.sent_at
        published.apply_seconds[peer.producer_id] = ack.apply_seconds

    def _on_credit(self, peer: Peer, credit: WeightCredit) -> None:
        try:
            self.fanout.credit(peer.identity, credit)
        except ProtocolError as exc:
            self._discard("bad_credit", f"{peer.producer_id}: {exc.message}")

    # ------------------------------------------------------------------ helpers
    async def _dispatch(self) -> None:
        await self._resend_to_orphans()
        for peer in sorted(self.peers.values(), key=lambda p: len(p.grants)):
            while len(peer.held(evaluation=False)) < MAX_GRANTS_PER_PEER and peer.identity in self.peers:
                if self.pending:
                    grant = self.pending.popleft()
                    self.handed_out_at[grant.grant_id] = time.monotonic()
                else:
                    grant = self._straggling_grant(peer)
                    if grant is None:
                        break
                await self._hand_out(peer, grant)
        while self.eval_pending and self.peers:  # each to the rollout holding the fewest evaluation prompts
            peer = min(self.peers.values(), key=lambda p: sum(len(g.prompts) for g in p.held(evaluation=True)))
            await self._hand_out(peer, self.eval_pending.popleft())

    async def _hand_out(self, peer: Peer, grant: WorkGrant) -> None:
        if not peer.grants:
            peer.last_progress = time.monotonic()  # an idle rollout's clock starts with its work
        peer.grants[grant.grant_id] = grant
        await self._send(peer, grant)

    def _straggling_grant(self, idle: Peer) -> WorkGrant | None:
        """The oldest grant another rollout has held for longer than straggler_timeout_s and that no
        second rollout holds yet (None when stragglers are not re-issued or there is none)."""
        if not self.straggler_timeout_s:
            return None
        now = time.monotonic()
        held = [(self.handed_out_at[g], grant) for p in self.peers.values() if p is not idle
                for g, grant in p.grants.items()
                if not grant.evaluation and g not in self.duplicated and g not in idle.grants]
        old = [(t, grant) for t, grant in held if now - t > self.straggler_timeout_s]
        if not old:
            return None
        grant = min(old, key=lambda item: item[0])[1]
        self.duplicated.add(grant.grant_id)
        log.warning("grant %d held for %.0f s (transport.straggler_timeout_s): also handing it to %s",
                    grant.grant_id, now - self.handed_out_at[grant.grant_id], idle.producer_id)
        return grant

    async def _next_change(self, remaining: float) -> None:
        """Wait (holding `changed`) for the next accepted message, at most `remaining` seconds and
        at most 1 s, so that the caller re-checks failures, silent peers and its deadline often."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))

    async def _send(self, peer: Peer, message) -> None:
        """Send to one rollout; one that has gone away is dropped and its grants go back to the queue."""
        version = self.latest.version if self.latest else -1
        try:
            await self.endpoint.send(peer.identity, message, weight_version=version)
        except PeerUnreachableError:
            self._drop(peer, "is unreachable")

    def _drop(self, peer: Peer, why: str) -> None:
        """Forget a rollout; the grants it had not answered (and no other rollout holds) go back to
        the front of the queue."""
        log.error("rollout %s %s; re-issuing its %d unanswered grant(s)", peer.producer_id, why, len(peer.grants))
        self.peers.pop(peer.identity, None)
        held_elsewhere = {g for p in self.peers.values() for g in p.grants}
        self.duplicated -= held_elsewhere & set(peer.grants)  # the other holder's answer is now the only one
        self._requeue([g for g in peer.grants.values() if g.grant_id not in held_elsewhere])
        peer.grants.clear()
        self.dropped_peers += 1
        try:
            self.fanout.check_departure()
        except MembershipError as exc:
            self.failure = RolloutFailure(f"rollout {peer.producer_id} {why}; {exc}")
        self.orphaned |= set(self.fanout.orphans(peer.identity, {p.identity: p.applied_version for p in self.peers.values()}))

    async def _resend_to_orphans(self) -> None:
        """The latest version, straight to each rollout a dropped relay parent cut off from it."""
        while self.orphaned:
            identity = self.orphaned.pop()
            if identity in self.peers and self.latest is not None:
                log.warning("sending weight version %d straight to %s: cut off from its relay parent",
                            self.latest.version, self.peers[identity].producer_id)
                await self.fanout.send_direct(identity, self.latest)

    async def _send_to(self, identity: bytes, message) -> None:
        peer = self.peers.get(identity)
        if peer is not None:
            await self._send(peer, message)

    def _requeue(self, grants: list[WorkGrant]) -> None:
        """Put grants back at the front of their queues (training or evaluation), in their order."""
        for queue, evaluation in ((self.pending, False), (self.eval_pending, True)):
            queue.extendleft(reversed([g for g in grants if g.evaluation == evaluation]))

    async def _drop_peers_without_progress(self) -> None:
        """Drop rollouts that are silent, hold work they could generate but make no progress, or do not
        apply a published version in time. The live but stuck ones are told to rejoin: they abandon
        their work and say hello again, catching up on the current weights."""
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.peer_timeout_s:
                self._drop(peer, f"has been silent for {now - peer.last_seen:.0f} s")
                continue
            why = self._why_stuck(peer, now)
            if why:
                self._drop(peer, why)
                with contextlib.suppress(PeerUnreachableError):
                    await self.endpoint.send(peer.identity, Shutdown(reason=f"dropped: {why}", rejoin=True),
                                             weight_version=self.latest.version if self.latest else -1)

    def _why_stuck(self, peer: Peer, now: float) -> str | None:
        runnable = any(g.min_weight_version <= peer.applied_version for g in peer.grants.values())
        if runnable and now - peer.last_progress > self.progress_timeout_s:
            return (f"made no progress for {now - peer.last_progress:.0f} s on work it could generate "
                    f"(transport.progress_timeout_s {self.progress_timeout_s:g})")
        applied = {p.identity: p.applied_version for p in self.peers.values()}
        for pv in reversed(self.published.values()):
            if pv.version <= peer.applied_version:
                break
            if self.fanout.upstream_of_stuck(peer.identity, pv.version, applied):
                continue  # the rollout relaying it to this one has not applied it either: that one is stuck
            started = self.fanout.ack_clock_start(peer.identity, pv.version, pv.sent_at)
            if now - started > self.ack_timeout_s and peer.connected_at < pv.sent_at:
                if self.fanout.second_chance(peer.identity, pv.version):
                    self.orphaned.add(peer.identity)  # its relay parent did not pass the version on
                    return None
                return (f"did not apply weight version {pv.version} within {self.ack_timeout_s:g} s "
                        f"(transport.weight_ack_timeout_s)")
        return None

    def _check_enough_rollouts(self) -> None:
        """Stop the run when fewer than min_live_rollouts stay connected for longer than peer_timeout_s."""
        if len(self.peers) >= self.min_live_rollouts:
            self.too_few_since = None
            return
        self.too_few_since = self.too_few_since or time.monotonic()
        if time.monotonic() - self.too_few_since > self.peer_timeout_s:
            self.failure = RolloutFailure(
                f"only {len(self.peers)} rollout(s) connected for {self.peer_timeout_s:g} s, fewer than "
                f"transport.min_live_rollouts {self.min_live_rollouts}")
            raise self.failure

    def _discard(self, reason: str, detail: str) -> None:
        """Count a discarded message; log the first few of each reason, then at powers of two, so a
        flood cannot turn into a flood of log records."""
        self.discarded[reason] += 1
        n = self.discarded[reason]
        if worth_logging(n):
            log.warning("discarded message (%s, %d so far): %s", reason, n, detail)

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure


def _mismatch(grant: WorkGrant, batch: PackedBatch, peer: Peer) -> str | None:
    """Why `batch` is not a complete, correctly versioned answer to `grant` (None if it is)."""
    expected_ids = np.repeat([p.prompt_id for p in grant.prompts], grant.n_samples)
    if batch.num_sequences != len(expected_ids) or not np.array_equal(batch.prompt_ids, expected_ids):
        return f"expected {grant.n_samples} samples of prompts {[p.prompt_id for p in grant.prompts]} in order"
    if batch.evaluation != grant.evaluation:
        return f"evaluation flag {batch.evaluation} differs from its grant's"
    if not np.array_equal(batch.sample_indices, np.tile(np.arange(grant.n_samples), len(grant.prompts))):
        return "sample indices do not run 0..n-1 within each prompt"
    for b, spec in enumerate(np.repeat(np.arange(len(grant.prompts)), grant.n_samples)):
        prompt = batch.tokens[batch.cu_seqlens[b]: batch.cu_seqlens[b] + batch.prompt_lens[b]]
        if not np.array_equal(prompt, grant.prompts[spec].token_ids):
            return f"sequence {b} does not start with the granted prompt"
    versions = set(batch.weight_versions.tolist()) | set(batch.last_weight_versions.tolist())
    if min(versions) < grant.min_weight_version:
        return f"generated with weight version {min(versions)} < required {grant.min_weight_version}"
    unacked = versions - set(peer.acked_versions)
    if unacked:
        return f"generated with weight version(s) {sorted(unacked)} the rollout never acknowledged"
    return None
