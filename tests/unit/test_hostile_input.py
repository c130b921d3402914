"""Hostile input against a LIVE learner socket: a LearnerEndpoint + RolloutHub serving a legitimate
(scripted) rollout while a raw ZeroMQ DEALER in another process floods the same port with malformed
messages; plus a frame over max_frame_bytes (dropped by ZMQ_MAXMSGSIZE) and a peer that never reads.

The attack is generated from a seeded random generator (deterministic, reproducible by seed). Every
attack message has an expected rejection reason: fixed by its category where the category determines
it (wrong schema version -> "schema_version", NaN log-probs -> "non_finite", ...), otherwise the
codec's own verdict on it (random bytes, truncated headers, mutated fields; a mutation that happens
to be valid is not used), so the test checks that the live path counts every single message, under
the right reason, while the hub keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sys
import time
import tracemalloc
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from learner.hub.rollout_hub import RolloutHub
from protocol.codec import DecodeLimits, decode, encode
from protocol.errors import REASON_CODES, ProtocolError
from protocol.messages import (SCHEMA_VERSION, Heartbeat, Hello, PackedBatch, PromptSpec, RolloutError,
                               SamplingSpec, WeightAck, WeightCredit, WeightUpdate, WorkGrant, pack_weight_buckets)
from protocol.transport import LearnerEndpoint, PeerBackloggedError, PeerUnreachableError, RolloutClient
from protocol.weights import weight_fingerprint
from tests.unit.batches import answer, training_batches

pytestmark = pytest.mark.timeout(60)

RUN = "hostile-run"
VOCAB = 64
LIMITS = DecodeLimits(vocab_size=VOCAB, max_frame_bytes=1 << 20)
TIMEOUT = 10.0
ATTACKER = "attacker"
SEQ_ANCHOR = 1_000_000  # seq of the one valid message the attacker sends first; later seqs at or below it replay
SEED = 20240607
N_ATTACK = 3000
N_FORGED = 600
MEMORY_BOUND = 64 << 20
SAMPLING = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4, stop_token_ids=[2], seed=0)


# --------------------------------------------------------------------------- legitimate traffic


def make_update(version: int, bucket_bytes: int = 64, pad: int = 0) -> WeightUpdate:
    rng = np.random.default_rng(version)
    arrays = [("embed.weight", "float32", (4, 3), rng.standard_normal((4, 3)).astype(np.float32)),
              ("head.weight", "int32", (2, 2), np.arange(4, dtype=np.int32) + version)]
    if pad:
        arrays.append(("pad", "float32", (pad,), np.zeros(pad, np.float32)))
    metas, buckets = pack_weight_buckets(arrays, bucket_bytes=bucket_bytes)
    upd = WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint={})
    fp = weight_fingerprint({m.name: upd.tensor_bytes(m) for m in metas})
    return WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint=fp)


def make_grant(grant_id: int, step: int = 0, n: int = 2) -> WorkGrant:
    ids = (100 * grant_id, 100 * grant_id + 1)
    prompts = [PromptSpec(prompt_id=pid, token_ids=np.array([1, 3 + pid % 50, 4 + k], np.int32), label=str(pid))
               for k, pid in enumerate(ids)]
    return WorkGrant(grant_id=grant_id, step=step, min_weight_version=0, n_samples=n, sampling=SAMPLING,
                     prompts=prompts)


class LegitRollout:
    """A rollout reduced to its protocol: Hello, acknowledge weights, answer every grant correctly."""

    def __init__(self, address: str, producer_id: str):
        self.client = RolloutClient(address, RUN, producer_id)
        self.version = -1
        self.answered: list[int] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.client.send(Hello(engine_info={"engine": "scripted"}), weight_version=self.version)
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            msg = (await self.client.recv()).body
            if isinstance(msg, WeightUpdate):
                await self.client.send(WeightAck(version=msg.version, fingerprint=msg.fingerprint, apply_seconds=0.0),
                                       weight_version=self.version)
                self.version = msg.version
            elif isinstance(msg, WorkGrant):
                await self.client.send(answer(msg, self.version), weight_version=self.version)
                self.answered.append(msg.grant_id)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            assert self.task.cancelled(), f"legit rollout loop failed: {self.task.exception()!r}"
        self.client.close()


@contextlib.asynccontextmanager
async def serving(limits: DecodeLimits = LIMITS, **endpoint_kwargs):
    endpoint = LearnerEndpoint(RUN, limits=limits, **endpoint_kwargs)
    hub = RolloutHub(endpoint, ack_timeout_s=60.0)
    server = asyncio.create_task(hub.serve())
    try:
        yield endpoint, hub, server
        assert not server.done(), f"serve() stopped: {server.exception()!r}"
        assert hub.failure is None, hub.failure
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        endpoint.close()


async def run_steps(hub: RolloutHub, first_step: int, steps: int, grants_per_step: int = 2) -> None:
    for step in range(first_step, first_step + steps):
        grants = [make_grant(1000 * step + g, step) for g in range(grants_per_step)]
        hub.offer(grants)
        batches = await training_batches(hub, step, grants_per_step, timeout_s=TIMEOUT)
        assert [b.grant_id for b in batches] == [g.grant_id for g in grants]
        for batch, grant in zip(batches, grants):
            assert batch == answer(grant, 0)


async def eventually(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- the attack


def frames_of(msg, *, producer_id: str = ATTACKER, run_id: str = RUN, seq: int = SEQ_ANCHOR + 1,
              validate: bool = True) -> list[bytes]:
    return [bytes(f) for f in encode(msg, run_id=run_id, producer_id=producer_id, seq=seq, weight_version=0,
                                     validate=validate, limits=LIMITS)]


def oracle(frames: list[bytes]) -> str | None:
    """The reason the endpoint must reject `frames` from the attacker's socket (None: it would accept)."""
    try:
        env = decode(frames, limits=LIMITS, expected_run_id=RUN)
    except ProtocolError as exc:
        return exc.reason_code
    if env.producer_id != ATTACKER:
        return "producer_id"
    if env.seq <= SEQ_ANCHOR and not isinstance(env.body, Hello):
        return "seq"
    return None


class AttackFactory:
    """Seeded generators, one per category; each returns (frames, fixed reason or None = codec's verdict)."""

    def __init__(self, seed: int, big_share: float = 0.03):
        self.rng = random.Random(seed)
        self.big = bytes(LIMITS.max_frame_bytes)  # a real frame of the largest size the transport lets through
        self.big_share = big_share  # share of forged_length messages that carry one

    # valid building blocks -------------------------------------------------
    def batch(self) -> PackedBatch:
        return answer(make_grant(self.rng.randrange(1000), n=self.rng.randint(1, 3)), 0)

    def valid(self, *, with_arrays: bool = False, hello: bool = True) -> object:
        kinds = [self.batch, lambda: make_grant(self.rng.randrange(100)), lambda: make_update(self.rng.randrange(5))]
        if not with_arrays:
            kinds += [lambda: Heartbeat(state="idle"),
                      lambda: WeightAck(version=0, fingerprint={"a": "b"}, apply_seconds=0.1),
                      lambda: WeightCredit(version=0, index=self.rng.randrange(3)),
                      lambda: RolloutError(message="boom", fatal=True)]
            if hello:
                kinds.append(lambda: Hello(engine_info={"engine": "evil"}))
        return self.rng.choice(kinds)()

    @staticmethod
    def header(frames: list[bytes]) -> dict:
        return msgpack.unpackb(frames[0], raw=False)

    @staticmethod
    def rehead(frames: list[bytes], header: dict) -> list[bytes]:
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]]

    # categories --------------------------------------------------------------
    def random_bytes(self):
        return [self.rng.randbytes(self.rng.randrange(0, 200)) for _ in range(self.rng.randint(1, 4))], None

    def truncated(self):
        frames = frames_of(self.valid(with_arrays=True))
        mode = self.rng.random()
        if mode < 0.4:
            frames[0] = frames[0][: self.rng.randrange(len(frames[0]))]
            return frames, None  # usually bad_msgpack; a cut right after a complete sub-object may read otherwise
        if mode < 0.7:
            i = self.rng.randrange(1, len(frames))
            frames[i] = frames[i][: self.rng.randrange(len(frames[i]))]
            return frames, "length_mismatch"
        del frames[self.rng.randrange(1, len(frames)):]
        return frames, "frame_count"

    def schema_version(self):
        frames = frames_of(self.valid())
        h = self.header(frames)
        h["schema_version"] = self.rng.choice([0, SCHEMA_VERSION - 1, SCHEMA_VERSION + 1, 99, -1, 2**40, "1", 1.0, None, True, [1]])
        return self.rehead(frames, h), "schema_version"

    def forged_length(self):
        r = self.rng.random()
        if r < 0.5:  # an array descriptor claiming gigabytes (or exabytes) over a small frame
            frames = frames_of(self.valid(with_arrays=True))
            h = self.header(frames)
            d = self.rng.choice(h["arrays"])
            d["shape"] = self.rng.choice([[2**31], [2**40], [2**62], [2**31, 2**31], [2**20, 2**20, 2**20]])
            return self.rehead(frames, h), "too_large"
        if r < 0.75:  # msgpack containers whose length prefix claims billions of entries
            return [self.rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\x00", b"\xdd\x7f\xff\xff\xff\x90",
                                     b"\x81\xa4kind\xdd\xff\xff\xff\xff"])], "too_large"
        frames = frames_of(self.batch())
        h = self.header(frames)
        i = self.rng.randrange(len(h["arrays"]))
        if r < 1 - self.big_share:  # a few elements more than the frame holds
            h["arrays"][i]["shape"] = [h["arrays"][i]["shape"][0] + self.rng.randint(1, 1000)]
            return self.rehead(frames, h), "length_mismatch"
        frames[i + 1] = self.big  # a real 1 MiB frame where the header declares a few bytes
        return frames, "length_mismatch"

    def wrong_dtype(self):
        frames = frames_of(self.batch())
        h = self.header(frames)
        d = self.rng.choice(h["arrays"])
        if d["dtype"] in ("int32", "float32") and self.rng.random() < 0.5:
            d["dtype"] = {"int32": "float32", "float32": "int32"}[d["dtype"]]  # same size: caught per field
        else:
            d["dtype"] = self.rng.choice(["float64", "int8", "bool", "<i4", "bfloat16", "object", 7, None, ["int32"]])
        return self.rehead(frames, h), "bad_dtype"

    def nan_logprobs(self):
        batch = self.batch()
        lps = batch.behaviour_logprobs.copy()
        j = self.rng.choice(np.flatnonzero(batch.loss_mask).tolist())
        lps[j] = self.rng.choice([np.nan, np.inf, -np.inf])
        return frames_of(dataclasses.replace(batch, behaviour_logprobs=lps), validate=False), "non_finite"

    def beyond_vocab(self):
        batch = self.batch()
        tokens = batch.tokens.copy()
        tokens[self.rng.randrange(tokens.size)] = self.rng.choice([VOCAB, VOCAB + 1, 10**6, 2**31 - 1, -1, -(2**31)])
        return frames_of(dataclasses.replace(batch, tokens=tokens), validate=False), "out_of_bounds"

    def replayed_seq(self):
        seq = self.rng.choice([SEQ_ANCHOR, SEQ_ANCHOR - 1, self.rng.randrange(SEQ_ANCHOR), 0])
        return frames_of(self.valid(hello=False), seq=seq), "seq"

    def other_run(self):
        run_id = self.rng.choice(["other-run", "", RUN + "-2", RUN.upper(), RUN + "\x00"])
        return frames_of(self.valid(), run_id=run_id), "run_id"

    def spoofed_producer(self):
        producer = self.rng.choice(["rollout-0", "learner", "attacker2", "ATTACKER", "rollout-0\x00"])
        return frames_of(self.valid(), producer_id=producer), "producer_id"  # a spoofed Hello included

    def mutated(self):
        """Random field-level mutations of a valid header (the codec decides the reason)."""
        frames = frames_of(self.valid())
        h = self.header(frames)
        for _ in range(self.rng.randint(1, 3)):
            h = self._mutate(h)
        return self.rehead(frames, h), None

    def _mutate(self, obj):
        if isinstance(obj, dict) and obj:
            obj = dict(obj)
            key = self.rng.choice(list(obj))
            r = self.rng.random()
            if r < 0.25:
                del obj[key]
            elif r < 0.6:
                obj[key] = self._mutate(obj[key])
            elif r < 0.8:
                obj[key] = self._junk()
            else:
                obj[self.rng.choice(["extra", "Kind", "body2", "__class__"])] = self._junk()
            return obj
        if isinstance(obj, list) and obj:
            obj = list(obj)
            i = self.rng.randrange(len(obj))
            obj[i] = self._mutate(obj[i]) if self.rng.random() < 0.5 else self._junk()
            return obj
        return self._junk()

    def _junk(self):
        return self.rng.choice([None, -1, 0, 2**62, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "x", "",
                                [], {}, True, [2**40, 2**40], {"a": [1]}, "packed_batch", "weight_update"])

    CATEGORIES = ("random_bytes", "truncated", "schema_version", "forged_length", "wrong_dtype", "nan_logprobs",
                  "beyond_vocab", "replayed_seq", "other_run", "spoofed_producer", "mutated")

    def build(self, n: int, categories: tuple[str, ...] = CATEGORIES) -> list[tuple[str, list[bytes], str]]:
        """n attack messages (category, frames, expected reason), shuffled; each checked against the codec."""
        out = []
        while len(out) < n:
            category = categories[len(out) % len(categories)]
            frames, fixed = getattr(self, category)()
            verdict = oracle(frames)
            if verdict is None:
                continue  # a mutation that happened to produce a valid message: not an attack
            assert fixed is None or verdict == fixed, f"{category}: the codec says {verdict!r}, expected {fixed!r}"
            out.append((category, frames, verdict))
        self.rng.shuffle(out)
        return out


# The attacker runs in a process of its own, as a real one would: it floods at full speed on another core,
# without sharing this process's GIL, and this process's tracemalloc sees only the learner's memory.
ATTACKER_SCRIPT = r"""
import sys, threading, zmq, msgpack
address, path, min_count, max_count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(path, "rb") as f:
    anchor, messages = msgpack.unpackb(f.read())
legit_done = threading.Event()
def control():
    sys.stdin.readline()          # "legit done"
    legit_done.set()
threading.Thread(target=control, daemon=True).start()
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.ROUTING_ID, b"attacker")
sock.connect(address)
sock.send_multipart(anchor)
print("started", flush=True)
sent = 0
while sent < max_count and not (sent >= min_count and legit_done.is_set()):
    sock.send_multipart(messages[sent % len(messages)])   # blocks while the learner's queue for us is full
    sent += 1
print(sent, flush=True)
sys.stdin.readline()              # keep the connection until the learner has counted everything
sock.close(linger=0)
ctx.term()
"""


class Attacker:
    """The attacker process: a raw DEALER (routing id "attacker") that sends one valid message (the seq
    anchor), then the attack messages in order, cycling, until told that the legitimate session is over and
    at least `min_count` were sent (or `max_count`); it keeps its connection until released."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.sent: int | None = None

    @staticmethod
    def prepare(messages: list[list[bytes]], workdir) -> str:
        """Write the attack for the process to read (before any memory measurement starts)."""
        path = workdir / "attack.msgpack"
        path.write_bytes(msgpack.packb([frames_of(Heartbeat(state="anchor"), seq=SEQ_ANCHOR), messages],
                                       use_bin_type=True))
        return str(path)

    @classmethod
    async def start(cls, address: str, path: str, *, min_count: int, max_count: int):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACKER_SCRIPT, address, path, str(min_count), str(max_count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        attacker = cls(proc)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == b"started\n", line
        except BaseException:
            await attacker.close()
            raise
        return attacker

    @property
    def running(self) -> bool:
        return self.proc.returncode is None and self.sent is None

    async def legit_done(self) -> int:
        """Tell it the legitimate session is over; returns how many attack messages it sent in all."""
        self.proc.stdin.write(b"legit done\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        self.sent = int(line)
        return self.sent

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b"release\nrelease\n")
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def expected_counts(attack, sent: int) -> Counter:
    return Counter(attack[i % len(attack)][2] for i in range(sent))


# --------------------------------------------------------------------------- tests


async def test_hub_keeps_serving_and_counts_every_malformed_message_under_a_flood(tmp_path):
    attack = AttackFactory(SEED).build(N_ATTACK)
    by_category: dict[str, Counter] = {}
    for category, _, reason in attack:
        by_category.setdefault(category, Counter())[reason] += 1
    assert set(by_category) == set(AttackFactory.CATEGORIES)
    for category, reason in (("schema_version", "schema_version"), ("wrong_dtype", "bad_dtype"),
                             ("nan_logprobs", "non_finite"), ("beyond_vocab", "out_of_bounds"),
                             ("replayed_seq", "seq"), ("other_run", "run_id"), ("spoofed_producer", "producer_id")):
        assert set(by_category[category]) == {reason}
    assert by_category["forged_length"]["too_large"] >= 100

    rss_before = rss_bytes()
    attacker = None
    async with serving() as (endpoint, hub, server):
        try:
            await hub.publish(make_update(0))
            path = Attacker.prepare([frames for _, frames, _ in attack], tmp_path)
            attacker = await Attacker.start(endpoint.address, path, min_count=N_ATTACK, max_count=100 * N_ATTACK)
            await eventually(lambda: sum(endpoint.rejections.values()) >= 200, what="attack under way")

            gaps: list[float] = []  # the event loop must stay responsive: longest gap between 10 ms ticks

            async def ticker():
                last = time.perf_counter()
                try:
                    while True:
                        await asyncio.sleep(0.01)
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now
                finally:  # the gap up to cancellation counts too (a short session may see no tick)
                    gaps.append(time.perf_counter() - last)

            ticking = asyncio.create_task(ticker())
            legit = LegitRollout(endpoint.address, "rollout-0")
            try:
                await legit.start()  # connects, says Hello and acknowledges the weights under attack
                rejected_at_start = sum(endpoint.rejections.values())
                await run_steps(hub, 0, steps=4)
                rejected_at_end = sum(endpoint.rejections.values())
                assert attacker.running, "the attack ended before the legitimate session"
                assert hub.applied_versions() == {"rollout-0": [0]}
                assert sorted(legit.answered) == sorted(1000 * s + g for s in range(4) for g in range(2))
            finally:
                ticking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticking
                await legit.close()
            assert rejected_at_end > rejected_at_start, "no attack message was handled during the legitimate session"
            assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.2f} s"

            sent = await attacker.legit_done()
            await eventually(lambda: sum(endpoint.rejections.values()) >= sent, timeout=30,
                             what=f"all {sent} attack messages counted")
            await asyncio.sleep(0.1)  # and nothing more
            assert endpoint.rejections == expected_counts(attack, sent)
            assert set(endpoint.rejections) <= REASON_CODES
            for reason in ("bad_msgpack", "schema_version", "too_large", "length_mismatch", "frame_count",
                           "bad_dtype", "non_finite", "out_of_bounds", "seq", "run_id", "producer_id"):
                assert endpoint.rejections[reason] >= 50, (reason, endpoint.rejections)
            # only the attacker's one valid message (the seq anchor) reached the hub, ignored: it never said Hello
            assert hub.discarded == {"unknown_peer": 1}
            assert set(hub.peers) == {b"rollout-0"}
        finally:
            if attacker is not None:
                await attacker.close()
    assert rss_bytes() - rss_before < 256 << 20


async def test_memory_stays_bounded_under_forged_lengths(tmp_path):
    """Declared lengths of gigabytes to exabytes (array shapes, msgpack container prefixes) and real 1 MiB
    frames under lying headers, traced by tracemalloc while the learner handles them and keeps serving."""
    attack = AttackFactory(SEED + 1, big_share=0.1).build(N_FORGED, categories=("forged_length", "truncated"))
    assert sum(1 for _, frames, _ in attack if any(len(f) == LIMITS.max_frame_bytes for f in frames)) >= 10
    attacker = None
    async with serving() as (endpoint, hub, server):
        try:
            await hub.publish(make_update(0))
            legit = LegitRollout(endpoint.address, "rollout-0")
            await legit.start()
            await run_steps(hub, 0, steps=1)
            path = Attacker.prepare([frames for _, frames, _ in attack], tmp_path)
            tracemalloc.start()
            try:
                attacker = await Attacker.start(endpoint.address, path, min_count=N_FORGED, max_count=N_FORGED)
                await run_steps(hub, 1, steps=1)
                sent = await attacker.legit_done()
                await eventually(lambda: sum(endpoint.rejections.values()) >= sent, timeout=30,
                                 what=f"all {sent} attack messages counted")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            await run_steps(hub, 2, steps=1)
            await legit.close()
            assert sent == N_FORGED and endpoint.rejections == expected_counts(attack, sent)
            assert endpoint.rejections["too_large"] >= N_FORGED // 5
            assert peak < MEMORY_BOUND, f"tracemalloc peak {peak / 2**20:.1f} MiB during the attack"
        finally:
            if attacker is not None:
                await attacker.close()


async def test_frame_over_max_frame_bytes_is_dropped_by_zmq_and_hub_keeps_serving():
    limits = DecodeLimits(vocab_size=VOCAB, max_frame_bytes=64 << 10)
    async with serving(limits) as (endpoint, hub, server):
        await hub.publish(make_update(0))
        first = LegitRollout(endpoint.address, "rollout-0")
        await first.start()
        await run_steps(hub, 0, steps=1)
        mon = endpoint.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        ctx = zmq.asyncio.Context()
        big = ctx.socket(zmq.DEALER)
        try:
            big.setsockopt(zmq.LINGER, 0)
            big.setsockopt(zmq.ROUTING_ID, b"big")
            big.connect(endpoint.address)
            header = frames_of(Heartbeat(state="x"), producer_id="big", seq=0)[0]
            await big.send_multipart([header, bytes(1 << 20)])  # a 1 MiB frame: over MAXMSGSIZE (64 KiB)
            event = parse_monitor_message(await asyncio.wait_for(mon.recv_multipart(), TIMEOUT))
            assert event["event"] == zmq.EVENT_DISCONNECTED  # libzmq cut the peer off before reading the frame
            await run_steps(hub, 1, steps=1)  # the connected rollout is still served
            second = LegitRollout(endpoint.address, "rollout-1")  # and a newcomer too
            await second.start()
            await eventually(lambda: hub.applied_versions().get("rollout-1") == [0], what="rollout-1 acked")
            await run_steps(hub, 2, steps=2)
            await first.close()
            await second.close()
            assert endpoint.rejections == {}, "the oversized frame must never reach the codec"
            assert hub.discarded == {}
        finally:
            endpoint.socket.disable_monitor()
            mon.close(linger=0)
            big.close(linger=0)
            ctx.term()


async def test_a_peer_that_never_reads_cannot_stall_or_kill_the_hub():
    """An (unauthenticated) peer says Hello again and again but never reads: every Hello makes the hub send
    it the latest weights. Once its queue is full the endpoint raises PeerBackloggedError (not zmq.Again,
    and it never waits), the hub drops the peer, and the legitimate rollout keeps being served."""
    async with serving(sndhwm=20) as (endpoint, hub, server):
        await hub.publish(make_update(0, bucket_bytes=1 << 20, pad=16 << 10))  # 64 KiB: fills TCP buffers fast
        legit = LegitRollout(endpoint.address, "rollout-0")
        await legit.start()
        await eventually(lambda: hub.applied_versions().get("rollout-0") == [0], what="rollout-0 acked")
        ctx = zmq.asyncio.Context()
        evil = ctx.socket(zmq.DEALER)
        try:
            evil.setsockopt(zmq.LINGER, 0)
            evil.setsockopt(zmq.RCVHWM, 1)
            evil.setsockopt(zmq.RCVBUF, 4096)
            evil.setsockopt(zmq.ROUTING_ID, b"evil")
            evil.connect(endpoint.address)
            for seq in range(400):
                await evil.send_multipart(frames_of(Hello(engine_info={}), producer_id="evil", seq=seq))
                if seq % 50 == 0:
                    await asyncio.sleep(0.01)
            # the evil peer was dropped at least once for not reading
            with pytest.raises(PeerBackloggedError):
                for _ in range(100):
                    await endpoint.send(b"evil", Heartbeat(state="probe"), weight_version=0)
            await run_steps(hub, 0, steps=3)
            assert not server.done() and hub.failure is None
            await legit.close()
        finally:
            evil.close(linger=0)
            ctx.term()


async def test_send_to_a_peer_that_never_reads_raises_backlogged_never_blocks():
    async with LearnerEndpoint(RUN, sndhwm=5) as endpoint:
        ctx = zmq.asyncio.Context()
        sleeper = ctx.socket(zmq.DEALER)
        try:
            sleeper.setsockopt(zmq.LINGER, 0)
            sleeper.setsockopt(zmq.RCVHWM, 1)
            sleeper.setsockopt(zmq.RCVBUF, 4096)
            sleeper.setsockopt(zmq.ROUTING_ID, b"sleeper")
            sleeper.connect(endpoint.address)
            await sleeper.send_multipart(frames_of(Hello(engine_info={}), producer_id="sleeper", seq=0))
            await endpoint.recv(timeout=TIMEOUT)
            payload = make_update(1, bucket_bytes=1 << 20, pad=16 << 10)
            sent = 0
            with pytest.raises(PeerBackloggedError, match="sleeper"):
                while sent < 10_000:
                    await asyncio.wait_for(endpoint.send(b"sleeper", payload, weight_version=1), 1.0)
                    sent += 1
            assert 5 <= sent < 10_000
            assert issubclass(PeerBackloggedError, PeerUnreachableError)  # the hub's drop-and-requeue path
        finally:
            sleeper.close(linger=0)
            ctx.term()
