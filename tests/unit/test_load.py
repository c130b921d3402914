"""Bounded memory under load: a LIVE LearnerEndpoint + RolloutHub whose rollouts produce far faster than
the learner consumes.

Set-up (real sockets on 127.0.0.1): the learner side (endpoint, hub.serve() task, and a driver coroutine
that plays learner/main.py: publish weights, offer each step's grants with max_staleness 1, collect, then
"train" by sleeping) runs in this process. N_PEERS scripted rollouts run in ONE OTHER process (so they
flood at full speed on another core, and this process's memory is the learner's alone). Each peer says
Hello, acknowledges every weight update, answers every grant it receives at once with a valid PackedBatch
of 32 sequences x 512 tokens (~149 KB on the wire), and between those sends valid PackedBatches nobody
asked for, as fast as its socket takes them: replays of its own earlier answers (grants it no longer
holds) and answers for grant ids >= FUTURE_GRANT_BASE (ids this learner never hands out; a "future" id
the hub might still grant to that peer would race with the grant and be a genuine answer).

Why 512 tokens and not 64: decoding costs ~0.2-0.4 ms per message whatever its size (the checks are
vectorised), so on a busy 2-core machine 32 x 64-token batches (20 KB) reach ~13 MB/s and a flood of
several hundred MB would not fit in the time budget; 32 x 512 tokens reach 45-60 MB/s here with
tracemalloc on (~190 MB/s without it on an idle machine).

Flow control under test: the endpoint and every client use RCVHWM = SNDHWM = HWM messages; a peer's send
blocks when its queue is full, so the flood runs at the learner's decode speed and what waits in the
learner's memory is bounded by the high-water marks; accepted batches are bounded by the grants
(MAX_GRANTS_PER_PEER per rollout; at most MAX_STALENESS + 1 steps offered and not yet collected).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
import threading
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq

from learner.hub.rollout_hub import MAX_GRANTS_PER_PEER, RolloutHub
from protocol.codec import DecodeLimits, encode
from protocol.messages import (Hello, PackedBatch, PromptSpec, SamplingSpec, Shutdown, WeightAck, WeightUpdate,
                               WorkGrant, pack_weight_buckets)
from protocol.transport import LearnerEndpoint, RolloutClient
from protocol.weights import weight_fingerprint
from tests.unit.batches import training_batches

pytestmark = pytest.mark.timeout(60)

RUN = "load-run"
VOCAB = 32000
LIMITS = DecodeLimits(vocab_size=VOCAB, max_frame_bytes=1 << 20)
N_PEERS = 3
HWM = 4                                   # rcvhwm = sndhwm (messages) on the endpoint and on every client
PROMPTS_PER_GRANT, N_SAMPLES = 4, 8       # 32 sequences per PackedBatch
PROMPT_LEN, RESPONSE_LEN = 128, 384        # 512 tokens per sequence
GRANTS_PER_STEP = N_PEERS * MAX_GRANTS_PER_PEER
MAX_STALENESS = 1
TRAIN_SECONDS = 0.25                      # the "trainer": the driver sleeps this long after every collect
# Grants for new steps are offered until the learner has taken in FLOOD_TARGET_BYTES of unsolicited batches
# (330-370 MB in 5.5-7 s at 45-62 MB/s on the 2-core development machine, busy with another job's vLLM
# engines) or FLOOD_WALL_CAP_S has passed, so that the file stays under 20 s on a machine busier still (with
# two more CPU hogs the flood ran at 15-27 MB/s); FLOOD_MIN_BYTES is the floor asserted there, ~8x the RSS bound.
FLOOD_TARGET_BYTES = 300 * 10**6
FLOOD_MIN_BYTES = 100 * 10**6
FLOOD_WALL_CAP_S = 6.5
FUTURE_GRANT_BASE = 10**9
N_FUTURE_TEMPLATES = 8
REPLAY_RING = 8
COLLECT_TIMEOUT = 20.0
# Allowances on top of the configuration-derived bounds (see memory_bounds()): RSS for glibc malloc arenas,
# libzmq and the interpreter (measured growth 0.2-0.8 MiB); traced for asyncio/pyzmq/interpreter objects
# (measured peak ~0.75 MiB). Sensitivity: keeping ~1 KiB per discarded message (pytest's capture of the hub's
# per-discard WARNING, when not silenced) already fails the traced bound (3.4 MiB peak vs 1.74 MiB allowed).
RSS_SLACK = 8 << 20
TRACED_SLACK = 1 << 20
PY_BYTES_PER_MESSAGE = 16 << 10  # Python objects of one decoded PackedBatch (measured ~8 KiB with tracemalloc)
SAMPLING = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=RESPONSE_LEN, stop_token_ids=[2], seed=0)


# --------------------------------------------------------------------------- messages (shared by both processes)


def make_update(version: int) -> WeightUpdate:
    rng = np.random.default_rng(version)
    arrays = [("embed.weight", "float32", (8, 4), rng.standard_normal((8, 4)).astype(np.float32)),
              ("head.weight", "int32", (2, 2), np.arange(4, dtype=np.int32) + version)]
    metas, buckets = pack_weight_buckets(arrays, bucket_bytes=256)
    upd = WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint={})
    fp = weight_fingerprint({m.name: upd.tensor_bytes(m) for m in metas})
    return WeightUpdate(version=version, tensors=metas, buckets=buckets, fingerprint=fp)


def make_grant(grant_id: int, step: int) -> WorkGrant:
    prompts = []
    for k in range(PROMPTS_PER_GRANT):
        pid = grant_id * PROMPTS_PER_GRANT + k
        tokens = np.random.default_rng(pid).integers(3, VOCAB, PROMPT_LEN).astype(np.int32)
        prompts.append(PromptSpec(prompt_id=pid, token_ids=tokens, label=str(pid)))
    return WorkGrant(grant_id=grant_id, step=step, min_weight_version=max(0, step - MAX_STALENESS),
                     n_samples=N_SAMPLES, sampling=SAMPLING, prompts=prompts)


def answer(grant: WorkGrant, version: int) -> PackedBatch:
    """The one valid answer to `grant` (deterministic): each prompt N_SAMPLES times, then RESPONSE_LEN tokens."""
    rng = np.random.default_rng(grant.grant_id)
    b = len(grant.prompts) * grant.n_samples
    prompts = np.repeat(np.stack([p.token_ids for p in grant.prompts]), grant.n_samples, axis=0)
    responses = rng.integers(3, VOCAB, (b, RESPONSE_LEN)).astype(np.int32)
    seq_len = PROMPT_LEN + RESPONSE_LEN
    logprobs = np.zeros((b, seq_len), np.float32)
    logprobs[:, PROMPT_LEN:] = -rng.random((b, RESPONSE_LEN), dtype=np.float32) * 4.0
    mask = np.zeros((b, seq_len), np.uint8)
    mask[:, PROMPT_LEN:] = 1
    return PackedBatch(
        grant_id=grant.grant_id, step=grant.step, tokens=np.concatenate([prompts, responses], axis=1).ravel(),
        cu_seqlens=np.arange(b + 1, dtype=np.int32) * seq_len, prompt_lens=np.full(b, PROMPT_LEN, np.int32),
        loss_mask=mask.ravel(), behaviour_logprobs=logprobs.ravel(),
        prompt_ids=np.repeat([p.prompt_id for p in grant.prompts], grant.n_samples).astype(np.int64),
        sample_indices=np.tile(np.arange(grant.n_samples, dtype=np.int32), len(grant.prompts)),
        weight_versions=np.full(b, version, np.int32), last_weight_versions=np.full(b, version, np.int32), finish_reasons=["length"] * b,
        labels=[p.label for p in grant.prompts for _ in range(grant.n_samples)], gen_seconds=0.5)


def wire_bytes(msg) -> int:
    return sum(len(f) for f in encode(msg, run_id=RUN, producer_id="rollout-0", seq=1, weight_version=0, limits=LIMITS))


# --------------------------------------------------------------------------- the peer process


class FloodingPeer:
    """A rollout reduced to its protocol, plus a flood: between the learner's messages it sends one
    unsolicited (valid) PackedBatch after another, each time the socket takes one (SNDHWM back-pressure)."""

    def __init__(self, address: str, producer_id: str):
        self.producer_id = producer_id
        self.client = RolloutClient(address, RUN, producer_id, limits=LIMITS, rcvhwm=HWM, sndhwm=HWM)
        self.seq = 0
        self.version = -1
        self.waiting: list[WorkGrant] = []      # grants whose min_weight_version this peer has not applied yet
        self.answered: list[int] = []
        self.acked: list[int] = []
        self.replays: collections.deque[list] = collections.deque(maxlen=REPLAY_RING)
        self.futures = [self._encode(answer(make_grant(FUTURE_GRANT_BASE + k, 0), 0), weight_version=0)
                        for k in range(N_FUTURE_TEMPLATES)]
        self.sent: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.blocked = 0  # sends that found the queue full (the learner was the bottleneck)

    def _encode(self, msg, weight_version: int | None = None) -> list:
        self.seq += 1
        return [bytes(f) for f in encode(msg, run_id=RUN, producer_id=self.producer_id, seq=self.seq,
                                         weight_version=self.version if weight_version is None else weight_version,
                                         limits=LIMITS)]

    def _rehead(self, frames: list) -> list:
        """The same message again under this peer's next seq (re-encoding only the msgpack header)."""
        self.seq += 1
        header = msgpack.unpackb(frames[0], raw=False)
        header["seq"] = self.seq
        header["weight_version"] = max(self.version, 0)
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]]

    async def _send(self, frames: list, kind: str) -> None:
        sock = self.client.socket
        try:
            await sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.blocked += 1
            await sock.send_multipart(frames)
        self.sent[kind] += 1
        self.bytes[kind] += sum(len(f) for f in frames)

    async def hello(self) -> None:
        await self._send(self._encode(Hello(engine_info={"engine": "flood", "tp": 1})), "hello")

    async def _answer_ready(self) -> None:
        for grant in [g for g in self.waiting if g.min_weight_version <= self.version]:
            self.waiting.remove(grant)
            frames = self._encode(answer(grant, self.version))
            await self._send(frames, "answer")
            self.answered.append(grant.grant_id)
            self.replays.append(frames)

    async def run(self) -> dict:
        n = 0
        while True:
            while True:  # everything the learner has sent so far
                try:
                    msg = (await self.client.recv(timeout=0)).body
                except TimeoutError:
                    break
                if isinstance(msg, Shutdown):
                    return {"producer_id": self.producer_id, "answered": self.answered, "acked": self.acked,
                            "sent": dict(self.sent), "bytes": dict(self.bytes), "blocked": self.blocked,
                            "waiting": [g.grant_id for g in self.waiting]}
                if isinstance(msg, WeightUpdate):
                    await self._send(self._encode(WeightAck(version=msg.version, fingerprint=msg.fingerprint,
                                                            apply_seconds=0.001)), "ack")
                    self.version = msg.version
                    self.acked.append(msg.version)
                elif isinstance(msg, WorkGrant):
                    self.waiting.append(msg)
                await self._answer_ready()
            n += 1
            if self.replays and n % 2:
                await self._send(self._rehead(self.replays[n % len(self.replays)]), "replay")
            else:
                await self._send(self._rehead(self.futures[n % len(self.futures)]), "future")


async def _run_peers(address: str, n_peers: int) -> None:
    peers = [FloodingPeer(address, f"rollout-{i}") for i in range(n_peers)]
    try:
        for peer in peers:
            await peer.hello()
        print("ready", flush=True)
        reports = await asyncio.gather(*(peer.run() for peer in peers))
        print(json.dumps(reports), flush=True)
        # keep the connections (and what is still queued in them) until the learner has counted everything
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        for peer in peers:
            peer.client.close()


def run_peers(address: str, n_peers: int) -> None:
    """Entry point of the peer process."""
    asyncio.run(_run_peers(address, n_peers))


PEER_SCRIPT = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("load_peers", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.run_peers(sys.argv[2], int(sys.argv[3]))
"""


@contextlib.asynccontextmanager
async def peer_process(address: str, n_peers: int):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PEER_SCRIPT, __file__, address, str(n_peers),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", line
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"release\n")
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --------------------------------------------------------------------------- measurement


def memory_bounds(msg_bytes: int) -> tuple[int, int, dict[str, int]]:
    """(RSS bound, tracemalloc bound, parts): what the learner may hold beyond its state when the measurement
    starts, derived from the configuration. Messages that may be in the learner at once:"""
    msgs = {
        # libzmq: each peer's inbound pipe holds at most RCVHWM whole messages, plus the one its decoder is
        # assembling (the peer's own SNDHWM queue lives in the peer process; kernel socket buffers are not RSS)
        "zmq_inbound": N_PEERS * (HWM + 1),
        # accepted answers waiting for collect(): every grant of the steps offered and not collected yet
        # (decoded arrays are zero-copy views: they keep their frames alive)
        "accepted": (MAX_STALENESS + 1) * GRANTS_PER_STEP,
        # the message serve() has in hand and the one its decoder's checks copy (token ids widened, diffs)
        "in_hand": 2,
    }
    held = sum(msgs.values())
    rss = held * msg_bytes + RSS_SLACK
    # tracemalloc sees no libzmq buffers: only the Python side of each message, plus decode's temporaries
    traced = held * PY_BYTES_PER_MESSAGE + msgs["in_hand"] * msg_bytes + TRACED_SLACK
    return rss, traced, msgs


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


class RssPeak:
    """Peak RSS over a window: VmHWM after resetting it (clear_refs 5) where the kernel allows, else the
    largest VmRSS seen by a thread sampling every 2 ms."""

    def __init__(self):
        self.baseline = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if not self.hwm_reset:
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        peak = max(self.sampled, rss_bytes())
        if self.hwm_reset:
            peak = max(peak, rss_bytes("VmHWM"))
        return peak


@contextlib.contextmanager
def quiet_hub_discards():
    """The hub logs every discarded message at WARNING; pytest's log capture would keep each record in this
    process's memory (see test_hub_discards_are_logged_rate_limited). Errors are still logged."""
    logger = logging.getLogger("learner.hub.rollout_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


async def eventually(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- tests


async def test_flood_faster_than_a_slow_learner_keeps_memory_bounded_and_drops_nothing_accepted():
    answer_bytes = wire_bytes(answer(make_grant(0, 0), 0))  # a replay has an answer's size
    future_bytes = wire_bytes(answer(make_grant(FUTURE_GRANT_BASE, 0), 0))  # longer labels
    assert 140_000 < answer_bytes < 160_000 and abs(future_bytes - answer_bytes) < 512
    msg_bytes, spam_bytes = max(answer_bytes, future_bytes), min(answer_bytes, future_bytes)
    rss_bound, traced_bound, held = memory_bounds(msg_bytes)

    endpoint = LearnerEndpoint(RUN, limits=LIMITS, rcvhwm=HWM, sndhwm=HWM)
    hub = RolloutHub(endpoint, ack_timeout_s=30.0)
    server = asyncio.create_task(hub.serve())
    offered: dict[int, list[WorkGrant]] = {}
    collected: dict[int, list[int]] = {}
    next_grant_id = 0

    def offer_step(step: int) -> None:
        nonlocal next_grant_id
        grants = [make_grant(next_grant_id + i, step) for i in range(GRANTS_PER_STEP)]
        next_grant_id += GRANTS_PER_STEP
        offered[step] = grants
        hub.offer(grants)

    rss = None
    tracing = False
    try:
        with quiet_hub_discards():
            async with peer_process(endpoint.address, N_PEERS) as proc:
                await eventually(lambda: len(hub.peers) == N_PEERS, 10, "every peer connected")
                await hub.publish(make_update(0))
                offer_step(0)
                offer_step(1)  # version 0 may serve steps 0 .. MAX_STALENESS
                step, collect_waits = 0, []
                started = time.monotonic()
                while step in offered:
                    t0 = time.monotonic()
                    batches = await training_batches(hub, step, GRANTS_PER_STEP, timeout_s=COLLECT_TIMEOUT)
                    collect_waits.append(time.monotonic() - t0)
                    assert [b.grant_id for b in batches] == [g.grant_id for g in offered[step]], f"step {step}"
                    for batch, grant in zip(batches, offered[step]):
                        versions = set(batch.weight_versions.tolist())
                        assert len(versions) == 1 and grant.min_weight_version <= min(versions) <= step
                        assert batch == answer(grant, versions.pop()), f"grant {grant.grant_id} altered"
                    collected[step] = [b.grant_id for b in batches]
                    del batches
                    if step == 0:  # the flood is under way and the pipes are warm: measure from here
                        flood_at_start = hub.discarded["unknown_grant"]
                        rss = RssPeak()
                        tracemalloc.start()
                        tracing = True
                    await asyncio.sleep(TRAIN_SECONDS)  # the slow trainer; serve() keeps receiving meanwhile
                    await hub.publish(make_update(step + 1))
                    flooded = (hub.discarded["unknown_grant"] - flood_at_start) * spam_bytes
                    if flooded < FLOOD_TARGET_BYTES and time.monotonic() - started < FLOOD_WALL_CAP_S:
                        offer_step(step + MAX_STALENESS + 1)
                    step += 1
                flood_seconds = time.monotonic() - started

                # stop the peers, then count what they sent against what the hub took in
                await hub.shutdown_rollouts("load test over")
                reports = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
                spam_sent = sum(r["sent"].get("replay", 0) + r["sent"].get("future", 0) for r in reports)
                await eventually(lambda: hub.discarded["unknown_grant"] >= spam_sent, 20,
                                 f"all {spam_sent} unsolicited batches counted")
                await asyncio.sleep(0.2)  # and nothing more arrives
                _, traced_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                tracing = False
                rss_peak, rss_baseline, rss_hwm_reset = rss.stop(), rss.baseline, rss.hwm_reset
                rss = None
            assert proc.returncode == 0, f"the peer process exited with {proc.returncode}"

        # (4) the hub served throughout
        assert not server.done(), f"serve() stopped: {server.exception()!r}"
        assert hub.failure is None, hub.failure
        assert endpoint.rejections == {}, endpoint.rejections  # every message was valid
        assert hub.dropped_peers == 0 and len(hub.peers) == N_PEERS

        # (2) every answer to a held grant collected exactly once, in grant order, for every step
        steps = len(offered)
        assert sorted(collected) == list(range(steps)) and steps >= 4
        answered = [gid for r in reports for gid in r["answered"]]
        assert sorted(answered) == list(range(next_grant_id)), "every grant answered exactly once"
        assert [gid for s in range(steps) for gid in collected[s]] == list(range(next_grant_id))
        assert not hub.pending and all(not p.grants for p in hub.peers.values())
        assert all(not hub.batches.get(s) for s in range(steps)), "accepted batches left uncollected"
        assert all(r["waiting"] == [] for r in reports)
        for r in reports:
            assert r["sent"]["answer"] == len(r["answered"])
            assert r["acked"] == list(range(steps + 1)), r["acked"]  # every published version, in order

        # (3) sent == collected + discarded, nothing else
        answers_sent = sum(r["sent"]["answer"] for r in reports)
        assert answers_sent == next_grant_id == steps * GRANTS_PER_STEP
        assert hub.discarded == {"unknown_grant": spam_sent}, hub.discarded
        assert all(r["sent"]["replay"] > 0 and r["sent"]["future"] > 0 for r in reports)

        # the rollouts really were faster than the learner: their sends hit the high-water mark
        assert all(r["blocked"] > 0 for r in reports), [r["blocked"] for r in reports]
        flood_bytes = sum(r["bytes"].get("replay", 0) + r["bytes"].get("future", 0) for r in reports)
        measured_flood = (spam_sent - flood_at_start) * spam_bytes
        assert measured_flood >= FLOOD_MIN_BYTES, f"only {measured_flood / 1e6:.0f} MB flooded in {flood_seconds:.1f} s"

        # (1) memory stayed bounded
        rss_growth = rss_peak - rss_baseline
        print(f"\nload: {steps} steps in {flood_seconds:.1f} s, {N_PEERS} peers, HWM {HWM}, message {msg_bytes} B; "
              f"flood {flood_bytes / 1e6:.0f} MB sent ({spam_sent} unsolicited + {answers_sent} answers), "
              f"{measured_flood / 1e6:.0f} MB while measured ({measured_flood / flood_seconds / 1e6:.0f} MB/s); "
              f"blocked sends {[r['blocked'] for r in reports]}; collect wait max {max(collect_waits):.2f} s; "
              f"messages held at most {held}; RSS growth {rss_growth / 2**20:.2f} MiB (bound {rss_bound / 2**20:.2f}, "
              f"VmHWM reset {rss_hwm_reset}), tracemalloc peak {traced_peak / 2**20:.2f} MiB "
              f"(bound {traced_bound / 2**20:.2f})")
        assert rss_growth < rss_bound, f"RSS grew {rss_growth / 2**20:.1f} MiB during the flood"
        assert traced_peak < traced_bound, f"tracemalloc peak {traced_peak / 2**20:.1f} MiB during the flood"
    finally:
        if tracing:
            tracemalloc.stop()
        if rss is not None:
            rss.stop()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        endpoint.close()


class LogFlood(AssertionError):
    """Discarded messages were logged one record each (a flood would become a flood of log records)."""


async def test_hub_discards_are_logged_rate_limited(caplog):
    n = 200
    caplog.set_level(logging.WARNING, logger="learner.hub.rollout_hub")
    endpoint = LearnerEndpoint(RUN, limits=LIMITS, rcvhwm=HWM, sndhwm=HWM)
    hub = RolloutHub(endpoint, ack_timeout_s=30.0)
    server = asyncio.create_task(hub.serve())
    peer = FloodingPeer(endpoint.address, "rollout-0")
    try:
        await peer.hello()
        await eventually(lambda: b"rollout-0" in hub.peers, 10, "hello handled")
        for i in range(n):
            await peer._send(peer._rehead(peer.futures[i % len(peer.futures)]), "future")
        await eventually(lambda: hub.discarded["unknown_grant"] >= n, 20, f"{n} unsolicited batches counted")
        assert hub.discarded == {"unknown_grant": n} and endpoint.rejections == {}
        assert hub.failure is None and not server.done()
        records = [r for r in caplog.records if r.name == "learner.hub.rollout_hub" and "discarded message" in r.getMessage()]
        assert records, "a discarded message is not logged at all"
        allowed = 10 + n.bit_length()  # the endpoint's policy for its own rejections
        if len(records) > allowed:
            raise LogFlood(f"{len(records)} WARNING records for {n} discarded messages (a rate-limited log would "
                           f"write at most {allowed})")
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        peer.client.close()
        endpoint.close()
