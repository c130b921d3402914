"""ZeroMQ CURVE authentication of the transport, over real sockets on 127.0.0.1, and the key files.

Every negative case (no keys, a key not in the allow-list, the wrong server key) first waits for the
handshake failure the socket monitor reports, so "nothing arrived" is not merely "nothing arrived yet";
each also checks that an authorised client still gets through the same endpoint afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol.config import ConfigError, RunConfig, TransportConfig, add_config_arguments, load_config
from protocol.keys import (CurveClientKeys, CurveKeyError, CurveServerKeys, InsecureKeyFileWarning,
                           client_keys_from_dir, generate_keys, load_allowed_clients, load_key_pair,
                           load_public_key, main as keys_main, server_keys_from_dir)
from protocol.messages import Heartbeat, Hello, PromptSpec, SamplingSpec, WorkGrant
from protocol.codec import DecodeLimits
from protocol.curve import CurveHandshakeError
from protocol.network_policy import InsecureTransportError, check_transport_security, is_loopback_host
from protocol.transport import LearnerEndpoint, PeerUnreachableError, RolloutClient

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE (libsodium)")]

RUN = "sec-run"
TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """learner + two authorised rollouts in one curve_dir; an intruder's valid pair elsewhere."""
    generate_keys(tmp_path / "keys", ["learner", "rollout-0", "rollout-1"])
    generate_keys(tmp_path / "elsewhere", ["intruder"])
    return tmp_path / "keys"


def grant(i: int) -> WorkGrant:
    return WorkGrant(grant_id=i, step=0, min_weight_version=0, n_samples=2,
                     sampling=SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4,
                                           stop_token_ids=[2], seed=i),
                     prompts=[PromptSpec(prompt_id=i, token_ids=np.array([1, 5, 7], np.int32), label=None)])


@contextlib.asynccontextmanager
async def monitored(sock):
    """Collect the socket's monitor events in the background; yields the list of (event, value)."""
    mon = sock.get_monitor_socket()
    events: list[tuple[int, int]] = []

    async def pump():
        while True:
            msg = parse_monitor_message(await mon.recv_multipart())
            events.append((int(msg["event"]), int(msg["value"])))

    task = asyncio.create_task(pump())
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.disable_monitor()
        mon.close(linger=0)


async def wait_event(events: list, event: int | tuple[int, ...], value: int | None = None,
                     timeout: float = TIMEOUT) -> None:
    wanted = event if isinstance(event, tuple) else (event,)
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(e in wanted and (value is None or v == value) for e, v in events):
        assert asyncio.get_running_loop().time() < deadline, f"no monitor event {event} (value {value}): {events}"
        await asyncio.sleep(0.005)


async def round_trips(ep: LearnerEndpoint, client: RolloutClient, n: int = 3) -> None:
    """Hello -> learner, then n WorkGrant (learner -> rollout) / Heartbeat (rollout -> learner) round trips."""
    await client.send(Hello(engine_info={"engine": "test"}), weight_version=-1)
    peer, env = await ep.recv(timeout=TIMEOUT)
    assert peer == client.producer_id.encode() and isinstance(env.body, Hello)
    for i in range(n):
        await ep.send(peer, grant(i), weight_version=0)
        got = await client.recv(timeout=TIMEOUT)
        assert got.body == grant(i) and got.producer_id == "learner"
        await client.send(Heartbeat(state=f"got {i}"), weight_version=0)
        peer2, env = await ep.recv(timeout=TIMEOUT)
        assert peer2 == peer and env.body == Heartbeat(state=f"got {i}")


async def assert_shut_out(ep: LearnerEndpoint, client: RolloutClient) -> None:
    """Nothing the client sent reaches recv, and the learner cannot address it."""
    # queued (plain client, which keeps reconnecting), refused (CURVE client that knows it failed)
    # or blocked (no connection left to queue on)
    with contextlib.suppress(CurveHandshakeError, TimeoutError):
        await asyncio.wait_for(client.send(Heartbeat(state="let me in"), weight_version=0), 0.5)
    with pytest.raises(TimeoutError):
        await ep.recv(timeout=0.3)
    with pytest.raises(PeerUnreachableError):
        await ep.send(client.producer_id.encode(), grant(99), weight_version=0)
    with pytest.raises((TimeoutError, CurveHandshakeError)):
        await client.recv(timeout=0.1)
    assert ep.rejections == {}  # refused at the handshake, never decoded


async def hello_maybe_refused(client: RolloutClient) -> None:
    """Send Hello from a client whose handshake will fail; libzmq may have failed it already (it runs the
    handshake in its own thread right after connect), in which case send raises at once."""
    with contextlib.suppress(CurveHandshakeError):
        await client.send(Hello(engine_info={}), weight_version=-1)


async def handshake_error(client: RolloutClient) -> CurveHandshakeError:
    """The CurveHandshakeError the client raises once it has seen its handshake fail."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        try:
            await client.recv(timeout=0.05)
        except CurveHandshakeError as exc:
            with pytest.raises(CurveHandshakeError):  # and from then on on every call
                await client.send(Heartbeat(state="again"), weight_version=0)
            return exc
        except TimeoutError:
            assert asyncio.get_running_loop().time() < deadline, "the client never reported the failed handshake"


# --------------------------------------------------------------------------- CURVE over real sockets


async def test_authorised_clients_round_trip_over_curve_and_everything_is_closed(keydir):
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    server_keys = server_keys_from_dir(keydir)
    assert set(server_keys.allowed_clients.values()) == {"rollout-0", "rollout-1"}  # not the learner's own key
    async with LearnerEndpoint(RUN, curve=server_keys) as ep:
        assert ep.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE and ep.socket.getsockopt(zmq.CURVE_SERVER) == 1
        async with RolloutClient(ep.address, RUN, "rollout-0", curve=client_keys_from_dir(keydir, "rollout-0")) as a, \
                RolloutClient(ep.address, RUN, "rollout-1", curve=client_keys_from_dir(keydir, "rollout-1")) as b:
            assert a.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
            await round_trips(ep, a)
            await round_trips(ep, b)
        assert ep.rejections == {} and ep.curve_denied == 0
    assert ep.closed and ep.context.closed and ep._auth is None
    assert a.closed and a._handshakes is None and b.closed
    assert threading.active_count() == threads_before, "the ZAP authenticator thread was not stopped"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"


async def test_a_client_key_cannot_speak_for_another_producer(keydir):
    async with LearnerEndpoint(RUN, curve=server_keys_from_dir(keydir)) as ep:
        # rollout-1's key, claiming to be rollout-0: every message rejected as a producer_id mismatch
        async with RolloutClient(ep.address, RUN, "rollout-0@elsewhere:1",
                                 curve=client_keys_from_dir(keydir, "rollout-1")) as impostor:
            for _ in range(3):
                await impostor.send(Hello(engine_info={}), weight_version=-1)
            with pytest.raises(TimeoutError):
                await ep.recv(timeout=0.5)
            assert ep.rejections == {"producer_id": 3}
        async with RolloutClient(ep.address, RUN, "rollout-1@host:7",
                                 curve=client_keys_from_dir(keydir, "rollout-1")) as honest:
            await round_trips(ep, honest)


async def test_curve_without_allow_list_encrypts_but_admits_any_client_key(keydir, tmp_path):
    public, secret = load_key_pair(keydir / "learner.key_secret")
    async with LearnerEndpoint(RUN, curve=CurveServerKeys(public, secret, None)) as ep:
        assert ep._auth is None
        intruder = CurveClientKeys.load(tmp_path / "elsewhere" / "intruder.key_secret", keydir / "learner.key")
        async with RolloutClient(ep.address, RUN, "anyone", curve=intruder) as client:
            await round_trips(ep, client, n=1)


async def test_client_without_keys_can_neither_deliver_nor_receive(keydir):
    async with LearnerEndpoint(RUN, curve=server_keys_from_dir(keydir)) as ep:
        async with monitored(ep.socket) as events:
            async with RolloutClient(ep.address, RUN, "plain") as plain:
                await plain.send(Hello(engine_info={}), weight_version=-1)
                # whichever side notices the mechanism mismatch first, the server's handshake fails
                await wait_event(events, (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL))
                await assert_shut_out(ep, plain)
        async with RolloutClient(ep.address, RUN, "rollout-0", curve=client_keys_from_dir(keydir, "rollout-0")) as ok:
            await round_trips(ep, ok, n=1)
        assert ep.curve_denied == 0  # refused by the mechanism mismatch, before any ZAP request


async def test_valid_key_pair_not_in_allow_list_is_refused(keydir, tmp_path):
    intruder = CurveClientKeys.load(tmp_path / "elsewhere" / "intruder.key_secret", keydir / "learner.key")
    async with LearnerEndpoint(RUN, curve=server_keys_from_dir(keydir)) as ep:
        async with monitored(ep.socket) as events:
            async with RolloutClient(ep.address, RUN, "rollout-0", curve=intruder) as client:  # even a known id
                await hello_maybe_refused(client)
                await wait_event(events, zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)  # the ZAP handler said no
                await assert_shut_out(ep, client)
                assert ep.curve_denied >= 1
                error = str(await handshake_error(client))
                assert "refused" in error and "allow-list" in error and intruder.public_key.decode() in error
        async with RolloutClient(ep.address, RUN, "rollout-0", curve=client_keys_from_dir(keydir, "rollout-0")) as ok:
            await round_trips(ep, ok, n=1)


async def test_client_with_the_wrong_server_public_key_gets_nothing(keydir, tmp_path):
    own = client_keys_from_dir(keydir, "rollout-0")
    wrong_server = load_public_key(tmp_path / "elsewhere" / "intruder.key")
    async with LearnerEndpoint(RUN, curve=server_keys_from_dir(keydir)) as ep:
        async with monitored(ep.socket) as events:
            mistaken = CurveClientKeys(own.public_key, own.secret_key, wrong_server)
            async with RolloutClient(ep.address, RUN, "rollout-0", curve=mistaken) as client:
                await hello_maybe_refused(client)
                await wait_event(events, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
                await assert_shut_out(ep, client)
                error = str(await handshake_error(client))
                assert "handshake" in error and "is not the key of the learner" in error and wrong_server.decode() in error
        async with RolloutClient(ep.address, RUN, "rollout-0", curve=own) as ok:
            await round_trips(ep, ok, n=1)


async def test_plain_endpoint_refuses_a_curve_client(keydir):
    """A rollout configured for CURVE never talks to a learner that is not a CURVE server (no downgrade)."""
    async with LearnerEndpoint(RUN) as ep, \
            RolloutClient(ep.address, RUN, "rollout-0", curve=client_keys_from_dir(keydir, "rollout-0")) as client:
        await hello_maybe_refused(client)
        with pytest.raises(TimeoutError):
            await ep.recv(timeout=0.3)
        with pytest.raises(PeerUnreachableError):
            await ep.send(b"rollout-0", grant(0), weight_version=0)
        assert "does not use CURVE" in str(await handshake_error(client))


async def test_max_frame_bytes_is_exact_under_curve(keydir):
    """libzmq applies MAXMSGSIZE to the encrypted frame: the endpoint adds CURVE's 33 bytes back, so a
    frame of exactly max_frame_bytes is delivered and one byte more gets its sender disconnected."""
    limit = 4096
    limits = DecodeLimits(max_frame_bytes=limit)
    async with LearnerEndpoint(RUN, limits=limits, curve=server_keys_from_dir(keydir)) as ep:
        async with monitored(ep.socket) as events:
            async with RolloutClient(ep.address, RUN, "rollout-0", limits=limits,
                                     curve=client_keys_from_dir(keydir, "rollout-0")) as a:
                await a.socket.send_multipart([b"\xc1" * limit])  # delivered: the codec rejects it
                with pytest.raises(TimeoutError):
                    await ep.recv(timeout=0.3)
                assert ep.rejections == {"bad_msgpack": 1}
                await a.socket.send_multipart([b"\xc1" * (limit + 1)])  # dropped by libzmq
                await wait_event(events, zmq.EVENT_DISCONNECTED)
            async with RolloutClient(ep.address, RUN, "rollout-1", limits=limits,
                                     curve=client_keys_from_dir(keydir, "rollout-1")) as b:
                await round_trips(ep, b, n=1)
        assert ep.rejections == {"bad_msgpack": 1}


def test_endpoint_and_client_check_the_key_types():
    with pytest.raises(TypeError, match="CurveServerKeys"):
        LearnerEndpoint(RUN, curve=b"not keys")
    with pytest.raises(TypeError, match="CurveClientKeys"):
        RolloutClient("tcp://127.0.0.1:1", RUN, "r", curve=("a", "b"))


# --------------------------------------------------------------------------- key files and the CLI


def test_keys_cli_writes_pairs_with_private_secret_files(tmp_path):
    out = tmp_path / "k"
    res = subprocess.run([sys.executable, "-m", "protocol.keys", "generate", str(out),
                          "--name", "learner", "--name", "rollout-0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["learner.key", "learner.key_secret",
                                                     "rollout-0.key", "rollout-0.key_secret"]
    for name in ("learner", "rollout-0"):
        assert stat.S_IMODE((out / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o644
        public, secret = load_key_pair(out / f"{name}.key_secret")
        assert load_public_key(out / f"{name}.key") == public and zmq.curve_public(secret) == public
        assert secret not in (out / f"{name}.key").read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    # existing keys are never overwritten silently
    assert keys_main(["generate", str(out), "--name", "rollout-0"]) == 2
    old = load_public_key(out / "rollout-0.key")
    assert keys_main(["generate", str(out), "--name", "rollout-0", "--force"]) == 0
    assert load_public_key(out / "rollout-0.key") != old
    assert stat.S_IMODE((out / "rollout-0.key_secret").stat().st_mode) == 0o600


def test_keys_help_explains_distribution(capsys):
    with pytest.raises(SystemExit) as exc:
        keys_main(["generate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("learner.key_secret", "learner.key", "rollout-N.key_secret", "allow-list", "curve_dir", "600"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        keys_main(["--help"])
    assert "rollout-N.key" in capsys.readouterr().out


def test_generate_rejects_bad_names(tmp_path):
    for names in ([], ["../escape"], [".hidden"], ["a/b"], ["x", "x"]):
        with pytest.raises(CurveKeyError):
            generate_keys(tmp_path, names)
    assert list(tmp_path.iterdir()) == []


def test_loading_errors_are_clear(tmp_path, keydir):
    with pytest.raises(CurveKeyError, match="does not exist.*protocol.keys generate"):
        load_key_pair(tmp_path / "missing.key_secret")
    with pytest.raises(CurveKeyError, match="does not exist"):
        load_public_key(tmp_path / "missing.key")
    with pytest.raises(CurveKeyError, match="not a regular file"):
        load_public_key(tmp_path)
    junk = tmp_path / "junk.key"
    junk.write_text("this is not a certificate\n")
    with pytest.raises(CurveKeyError, match="not a ZeroMQ CURVE certificate"):
        load_public_key(junk)
    short = tmp_path / "short.key"
    short.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(CurveKeyError, match="malformed"):
        load_public_key(short)
    with pytest.raises(CurveKeyError, match="holds no secret key.*key_secret"):
        load_key_pair(keydir / "rollout-0.key")
    # a secret file whose public key was swapped for another one
    swapped = tmp_path / "swapped.key_secret"
    other = load_public_key(keydir / "rollout-1.key").decode()
    text = (keydir / "rollout-0.key_secret").read_text()
    mine = load_public_key(keydir / "rollout-0.key").decode()
    swapped.write_text(text.replace(mine, other))
    os.chmod(swapped, 0o600)
    with pytest.raises(CurveKeyError, match="not the public key of its secret-key"):
        load_key_pair(swapped)
    with pytest.raises(CurveKeyError, match="no client public keys"):
        empty = tmp_path / "empty"
        empty.mkdir()
        load_allowed_clients(empty)
    with pytest.raises(CurveKeyError, match="no client public keys"):  # only the server's own key
        learner_only = tmp_path / "learner-only"
        generate_keys(learner_only, ["learner"])
        server_keys_from_dir(learner_only)
    with pytest.raises(CurveKeyError, match="does not exist"):
        load_allowed_clients(tmp_path / "nowhere")
    with pytest.raises(CurveKeyError, match="not a pair"):
        a, b = load_key_pair(keydir / "rollout-0.key_secret"), load_key_pair(keydir / "rollout-1.key_secret")
        CurveClientKeys(a[0], b[1], a[0])
    assert "secret" not in repr(server_keys_from_dir(keydir)).lower()


def test_secret_file_readable_by_others_warns(keydir):
    path = keydir / "rollout-0.key_secret"
    os.chmod(path, 0o644)
    with pytest.warns(InsecureKeyFileWarning, match="chmod 600"):
        load_key_pair(path)
    os.chmod(path, 0o600)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_key_pair(path)


# --------------------------------------------------------------------------- configuration


def test_check_transport_security(tmp_path):
    assert check_transport_security(TransportConfig()) is False  # loopback default: fine without CURVE
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert check_transport_security(TransportConfig(bind_host=host, learner_host=host)) is False
    for host in ("0.0.0.0", "*", "192.168.1.5", "eth0", "::", "learner.example"):
        assert not is_loopback_host(host)
    with pytest.raises(InsecureTransportError) as exc:
        check_transport_security(TransportConfig(bind_host="0.0.0.0"))
    msg = str(exc.value)
    assert "transport.bind_host" in msg and "0.0.0.0" in msg and "python -m protocol.keys generate" in msg
    assert "--transport.curve_dir" in msg and isinstance(exc.value, ConfigError)
    with pytest.raises(InsecureTransportError, match="learner_host"):
        check_transport_security(RunConfig(transport=TransportConfig(learner_host="10.0.0.2")))
    assert check_transport_security(TransportConfig(bind_host="0.0.0.0", curve_required_off_loopback=False)) is False
    generate_keys(tmp_path / "k", ["learner", "rollout-0"])
    assert check_transport_security(TransportConfig(bind_host="0.0.0.0", curve_dir=str(tmp_path / "k"))) is True
    with pytest.raises(ConfigError, match="not a directory.*protocol.keys generate"):
        check_transport_security(TransportConfig(bind_host="0.0.0.0", curve_dir=str(tmp_path / "missing")))


def test_new_config_fields_have_help_and_parse(tmp_path):
    import argparse
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(TransportConfig)}
    for name in ("curve_dir", "curve_required_off_loopback"):
        assert len(fields[name].metadata["help"]) > 20
    cfg = load_config(overrides={"transport.curve_dir": str(tmp_path), "transport.curve_required_off_loopback": "false"})
    assert cfg.transport.curve_dir == str(tmp_path) and cfg.transport.curve_required_off_loopback is False
    assert RunConfig().transport.curve_dir == "" and RunConfig().transport.curve_required_off_loopback is True
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "--transport.curve_dir" in parser.format_help()
