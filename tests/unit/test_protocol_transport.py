"""Transport tests over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from protocol import (
    DecodeLimits,
    Heartbeat,
    Hello,
    LearnerEndpoint,
    PackedBatch,
    PeerUnreachableError,
    PromptSpec,
    ProtocolError,
    RolloutClient,
    SamplingSpec,
    Shutdown,
    WorkGrant,
    encode,
    free_tcp_port,
)

RUN = "run-t"
TIMEOUT = 5.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_batch() -> PackedBatch:
    return PackedBatch(
        grant_id=1,
        step=0,
        tokens=np.array([3, 4, 5, 6, 7, 8, 9], np.int32),
        cu_seqlens=np.array([0, 3, 7], np.int32),
        prompt_lens=np.array([1, 2], np.int32),
        loss_mask=np.array([0, 1, 1, 0, 0, 1, 1], np.uint8),
        behaviour_logprobs=np.array([0, -0.5, -0.25, 0, 0, -1.0, -2.0], np.float32),
        prompt_ids=np.array([10, 11], np.int64),
        sample_indices=np.array([0, 0], np.int32),
        weight_versions=np.array([0, 0], np.int32),
        last_weight_versions=np.array([0, 0], np.int32),
        finish_reasons=["stop", "length"],
        labels=[None, "x"],
        gen_seconds=0.1,
    )


def make_grant() -> WorkGrant:
    return WorkGrant(
        grant_id=2,
        step=1,
        min_weight_version=0,
        n_samples=2,
        sampling=SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=16, stop_token_ids=[1], seed=None),
        prompts=[PromptSpec(prompt_id=10, token_ids=np.array([3, 4], np.int32), label="a")],
    )


async def wait_until(predicate, timeout: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_hello_batch_then_work_grant_and_everything_closed():
    fds_before = open_fds()
    async with LearnerEndpoint(RUN) as ep:
        assert ep.address.startswith("tcp://127.0.0.1:")
        async with RolloutClient(ep.address, RUN, "rollout-0") as client:
            await client.send(Hello(engine_info={"engine": "vllm", "tp": 1}), weight_version=0)
            batch = make_batch()
            await client.send(batch, weight_version=0)

            peer, env = await ep.recv(timeout=TIMEOUT)
            assert peer == b"rollout-0"
            assert isinstance(env.body, Hello) and env.run_id == RUN and env.seq == 0
            peer, env = await ep.recv(timeout=TIMEOUT)
            assert env.body == batch and env.seq == 1 and env.producer_id == "rollout-0"

            grant = make_grant()
            await ep.send(peer, grant, weight_version=4)
            reply = await client.recv(timeout=TIMEOUT)
            assert reply.body == grant
            assert (reply.producer_id, reply.weight_version, reply.seq) == ("learner", 4, 0)
        assert client.closed and client.context.closed and client.socket.closed
    assert ep.closed and ep.context.closed and ep.socket.closed
    assert ep.rejections == {}
    assert open_fds() == fds_before, "file descriptors leaked"


async def test_endpoint_survives_garbage_and_serves_valid_client():
    seen = []
    ctx = zmq.asyncio.Context()
    try:
        async with LearnerEndpoint(RUN, on_reject=lambda peer, err: seen.append((peer, err.reason_code))) as ep:
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.setsockopt(zmq.ROUTING_ID, b"evil")
            raw.connect(ep.address)
            pending = asyncio.ensure_future(ep.recv(timeout=TIMEOUT))
            valid_other_run = encode(Heartbeat(state="x"), run_id="other-run", producer_id="evil", seq=0, weight_version=0)
            spoofed = encode(Heartbeat(state="x"), run_id=RUN, producer_id="rollout-1", seq=0, weight_version=0)
            garbage = [
                [b"garbage"],
                [b"\xc1\xc1\xc1", b"more", b"frames"],
                [b""],
                [msgpack.packb({"schema_version": 99})],
                [msgpack.packb({"kind": "x"})] * 3,
                [bytes(f) for f in valid_other_run],
                [bytes(f) for f in spoofed],
            ]
            for frames in garbage:
                await raw.send_multipart(frames)
            await wait_until(lambda: sum(ep.rejections.values()) == len(garbage))
            assert not pending.done()
            assert ep.rejections["bad_msgpack"] == 3  # garbage, 0xc1, empty header
            assert ep.rejections["missing_field"] == 1
            assert ep.rejections["schema_version"] == 1
            assert ep.rejections["run_id"] == 1
            assert ep.rejections["producer_id"] == 1
            assert len(seen) == len(garbage) and all(peer == b"evil" for peer, _ in seen)

            async with RolloutClient(ep.address, RUN, "rollout-1") as client:
                await client.send(Hello(engine_info={}), weight_version=0)
                peer, env = await pending
                assert peer == b"rollout-1" and isinstance(env.body, Hello)
                # replayed / non-increasing seq from the same producer is rejected, Hello resets it
                await client.send(Heartbeat(state="ok"), weight_version=0)
                assert (await ep.recv(timeout=TIMEOUT))[1].seq == 1
                client._seq = 1
                await client.send(Heartbeat(state="replay"), weight_version=0)
                await client.send(Heartbeat(state="fresh"), weight_version=0)
                peer, env = await ep.recv(timeout=TIMEOUT)
                assert env.body == Heartbeat(state="fresh") and ep.rejections["seq"] == 1
                await ep.send(peer, Shutdown(reason="bye"), weight_version=0)
                assert (await client.recv(timeout=TIMEOUT)).body == Shutdown(reason="bye")
            raw.close(linger=0)
    finally:
        ctx.term()


async def test_oversized_frame_is_dropped_by_zmq_and_endpoint_keeps_serving():
    limits = DecodeLimits(max_frame_bytes=4096)
    ctx = zmq.asyncio.Context()
    try:
        async with LearnerEndpoint(RUN, limits=limits) as ep:
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(ep.address)
            await raw.send_multipart([b"\x00" * 100_000])  # > MAXMSGSIZE: libzmq disconnects the peer
            async with RolloutClient(ep.address, RUN, "rollout-2", limits=limits) as client:
                await client.send(make_batch(), weight_version=0)
                peer, env = await ep.recv(timeout=TIMEOUT)
                assert peer == b"rollout-2" and isinstance(env.body, PackedBatch)
            assert ep.rejections == {}
            raw.close(linger=0)
    finally:
        ctx.term()


async def test_recv_timeouts_and_unknown_peer():
    async with LearnerEndpoint(RUN, port=free_tcp_port()) as ep:
        async with RolloutClient(ep.address, RUN, "rollout-3") as client:
            with pytest.raises(TimeoutError, match="rollout-3"):
                await client.recv(timeout=0.05)
            with pytest.raises(TimeoutError, match="no valid message"):
                await ep.recv(timeout=0.05)
            with pytest.raises(PeerUnreachableError, match="nobody"):
                await ep.send(b"nobody", Shutdown(reason="x"), weight_version=0)
            with pytest.raises(ProtocolError):  # sender-side validation
                await client.send(Heartbeat(state=123), weight_version=0)


async def test_client_rejects_message_from_other_run():
    async with LearnerEndpoint("other-run") as ep, RolloutClient(ep.address, RUN, "rollout-4") as client:
        pending = asyncio.ensure_future(ep.recv())
        await client.send(Hello(engine_info={}), weight_version=0)
        await wait_until(lambda: ep.rejections["run_id"] == 1)
        pending.cancel()
        # the endpoint never accepted the peer, but it is connected and can be addressed
        await ep.send(b"rollout-4", Shutdown(reason="x"), weight_version=0)
        with pytest.raises(ProtocolError) as info:
            await client.recv(timeout=TIMEOUT)
        assert info.value.reason_code == "run_id" and client.rejections["run_id"] == 1


def test_sync_close_and_free_port():
    port = free_tcp_port()
    assert 0 < port < 65536
    ep = LearnerEndpoint(RUN, port=port)
    assert ep.address == f"tcp://127.0.0.1:{port}"
    ep.close()
    ep.close()  # idempotent
    assert ep.context.closed
    with pytest.raises(ValueError):
        RolloutClient("tcp://127.0.0.1:1", RUN, "")
