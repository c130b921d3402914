"""Small asyncio transports over ZeroMQ (pyzmq ``zmq.asyncio``).

* :class:`LearnerEndpoint` binds a ROUTER socket; every rollout connects a
  :class:`RolloutClient` (DEALER, routing id = ``producer_id``).
* Each endpoint / client owns its own zmq context and socket and closes both
  deterministically (``close()`` or ``async with``), with linger 0.
* Frames are the codec's frames: ROUTER sees ``[peer_id, header, arrays...]``.
* Sends are zero-copy for large frames (``copy=False``): do not mutate arrays /
  buckets of a message after passing it to ``send``.
* Each object is meant to be used from one asyncio task for receiving
  (concurrent ``recv`` calls on the same object are not supported).

Safety: ZMQ_MAXMSGSIZE is set to ``limits.max_frame_bytes`` (libzmq checks it
per frame and drops the connection of a peer that exceeds it, before
allocating the frame; with CURVE the check sees the encrypted frame, so the
33 bytes of CURVE framing are added to it); RCVHWM / SNDHWM bound the queues
(in messages); the ROUTER uses ROUTER_MANDATORY so sending to an unknown /
disconnected peer raises :class:`PeerUnreachableError` instead of silently
dropping.  ``LearnerEndpoint.recv`` yields to the event loop after every
message it takes off the socket, so a peer flooding it (with garbage or with
valid messages) cannot starve the other coroutines of the learner's loop;
rejections are counted exactly but logged rate-limited (the first few per
reason code, then at powers of two), so a flood cannot flood the logs.

Authentication and encryption (ZeroMQ CURVE, optional): pass
``curve=CurveServerKeys(...)`` to :class:`LearnerEndpoint` and
``curve=CurveClientKeys(...)`` to :class:`RolloutClient` (see
:mod:`protocol.keys`; ``transport.curve_dir`` in the run config).  The learner
is then a CURVE server: every connection is encrypted and the learner
authenticated by its public key.  With an allow-list of client public keys, a
ZAP handler admits only those clients; a client without keys, with another
key, or with the wrong server public key never completes the handshake, so
nothing it sends reaches ``recv`` and nothing can be sent to it.

The ZAP handler is pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`,
bound inside the endpoint's own context, not the asyncio authenticator: ZAP
requests are answered in a thread of their own, so handshakes complete while
the learner's event loop is busy (decoding a large batch, publishing weights)
and whether or not a loop is running (the endpoint is created and closed
synchronously, and may outlive the loop it was created under); with
:class:`zmq.auth.asyncio.AsyncioAuthenticator` a handshake would wait for the
loop and the endpoint could only be created inside a running loop.  The
handler's sockets are plain (sync) sockets of the endpoint's context, which
it stops before terminating that context.  Without ``curve`` nothing changes
(plain TCP; use it on 127.0.0.1 only, see :func:`check_transport_security`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .codec import DEFAULT_LIMITS, DecodeLimits, decode, encode
from .config import ConfigError
from .errors import ProtocolError
from .keys import CurveClientKeys, CurveServerKeys
from .messages import Envelope, Hello

__all__ = [
    "LearnerEndpoint",
    "RolloutClient",
    "PeerUnreachableError",
    "PeerBackloggedError",
    "free_tcp_port",
    "CurveServerKeys",
    "CurveClientKeys",
    "InsecureTransportError",
    "CurveHandshakeError",
    "check_transport_security",
    "is_loopback_host",
    "ZAP_DOMAIN",
]

log = logging.getLogger(__name__)

RejectCallback = Callable[[bytes, ProtocolError], None]


#: ZAP domain of the learner's CURVE server socket.
ZAP_DOMAIN = "streamrlhf"

# A CURVE MESSAGE command wraps each frame in 33 bytes ("\x07MESSAGE", 8-byte nonce, 16-byte MAC,
# 1 flags byte); libzmq applies ZMQ_MAXMSGSIZE to that wrapped frame.
_CURVE_FRAME_OVERHEAD = 33

# A CURVE client gives up after this many handshakes in a row cut short by the learner (libzmq retries
# those; a protocol error or a refusal it detects itself ends the connection at once).
_HANDSHAKE_FAILURES_FATAL = 3

# Rejections logged in full per reason code before logging only at powers of two.
_LOG_FIRST_REJECTIONS = 10


class PeerUnreachableError(ConnectionError):
    """The learner tried to send to a peer identity that is not (or no longer) connected."""


class PeerBackloggedError(PeerUnreachableError):
    """The learner tried to send to a peer that has not read its last SNDHWM messages (stuck or hostile)."""


class CurveHandshakeError(ConnectionError):
    """The CURVE handshake with the learner failed: this rollout's key was refused, or the learner's
    public key (or the learner's CURVE setting) does not match."""


class InsecureTransportError(ConfigError):
    """The transport would accept unauthenticated connections from the network."""


def _event_name(value: int) -> str:
    try:
        return zmq.Event(value).name
    except ValueError:
        return str(value)


def _protocol_error_name(value: int) -> str:
    for name in dir(zmq):
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name
    return str(value)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (``127.0.0.0/8``, ``::1``); False for anything
    else, including ``0.0.0.0`` / ``*`` (every interface) and host or interface names (not resolved)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport_security(cfg: Any) -> bool:
    """Refuse to run unauthenticated plain TCP off the loopback interface.

    ``cfg`` is a ``TransportConfig`` (or a ``RunConfig``, whose ``transport``
    section is used).  Raises :class:`InsecureTransportError` when
    ``curve_required_off_loopback`` is true, ``curve_dir`` is empty and
    ``bind_host`` or ``learner_host`` is not a loopback address; raises
    ``ConfigError`` when ``curve_dir`` is set but is not a directory.  Returns
    whether CURVE is on.
    """
    t = getattr(cfg, "transport", cfg)
    curve_dir = str(getattr(t, "curve_dir", "") or "")
    if curve_dir:
        if not Path(curve_dir).is_dir():
            raise ConfigError(f"transport.curve_dir {curve_dir!r} is not a directory; generate the keys with "
                              f"`python -m protocol.keys generate {curve_dir} --name learner --name rollout-0 ...`")
        return True
    if not getattr(t, "curve_required_off_loopback", True):
        return False
    for key in ("bind_host", "learner_host"):
        host = str(getattr(t, key))
        if not is_loopback_host(host):
            raise InsecureTransportError(
                f"transport.{key} is {host!r}, not a loopback address, and CURVE is off: any host that can "
                f"reach the port could feed the learner samples or take its work and weights. Generate keys "
                f"with `python -m protocol.keys generate KEYDIR --name learner --name rollout-0 --name rollout-1` "
                f"(one rollout-N per rollout process) and pass --transport.curve_dir KEYDIR to every process, "
                f"or bind to 127.0.0.1, or (on a network you trust completely) set "
                f"--transport.curve_required_off_loopback false.")
    return False


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on ``host`` (racy by nature; prefer binding to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")


async def _recv_frames(sock: zmq.asyncio.Socket, deadline: float | None, what: str) -> list[zmq.Frame]:
    """Receive one multipart message, raising TimeoutError at ``deadline`` (loop time)."""
    if deadline is not None:
        remaining = deadline - asyncio.get_running_loop().time()
        events = await sock.poll(timeout=max(0, int(remaining * 1000)), flags=zmq.POLLIN)
        if not events & zmq.POLLIN:
            raise TimeoutError(what)
    return await sock.recv_multipart(copy=False)


class _Owned:
    """Owns one context + socket; deterministic close."""

    _ctx: zmq.asyncio.Context
    _sock: zmq.asyncio.Socket

    _auth: Any = None  # ZAP authenticator thread (LearnerEndpoint with a CURVE allow-list)
    _monitor: Any = None  # handshake monitor (RolloutClient with CURVE): a plain socket of our context

    def _open(self, kind: int, limits: DecodeLimits, rcvhwm: int, sndhwm: int, curve: bool = False) -> None:
        self._ctx = zmq.asyncio.Context()
        self._closed = False
        try:
            self._sock = self._ctx.socket(kind)
            self._sock.setsockopt(zmq.LINGER, 0)
            overhead = _CURVE_FRAME_OVERHEAD if curve else 0
            self._sock.setsockopt(zmq.MAXMSGSIZE, int(limits.max_frame_bytes) + overhead)
            self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
            self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        except BaseException:
            self._ctx.destroy(linger=0)
            self._closed = True
            raise

    @property
    def context(self) -> zmq.asyncio.Context:
        return self._ctx

    @property
    def socket(self) -> zmq.asyncio.Socket:
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket and terminate the owned context. Idempotent.

        Unsent messages are dropped at once by default; with ``linger_s`` > 0 close waits up to that
        long for them to reach the network (a learner's last Shutdown, for one).
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._monitor is not None:
                try:
                    self._sock.disable_monitor()
                finally:
                    self._monitor.close(linger=0)
                    self._monitor = None
        finally:
            self._close_rest(linger_s)

    def _close_rest(self, linger_s: float) -> None:
        try:
            self._sock.close(linger=int(linger_s * 1000))
        finally:
            try:
                if self._auth is not None:
                    self._auth.stop()  # its sockets live in our context: stop it before term()
                    self._auth = None
            finally:
                self._ctx.term()

    def _record(self, peer: bytes, exc: ProtocolError) -> None:
        self.rejections[exc.reason_code] += 1
        count = self.rejections[exc.reason_code]
        if count <= _LOG_FIRST_REJECTIONS or count & (count - 1) == 0:
            more = "" if count <= _LOG_FIRST_REJECTIONS else f" ({count} rejections with this reason so far; not all logged)"
            log.warning("%s rejected a message from %r: %s%s", type(self).__name__, peer, exc, more)
        if self._on_reject is not None:
            try:
                self._on_reject(peer, exc)
            except Exception:  # a faulty callback must not kill the receive loop
                log.exception("on_reject callback failed")

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


class LearnerEndpoint(_Owned):
    """Learner side: a bound ROUTER socket that receives from many rollouts.

    ``address``: full zmq endpoint to bind (e.g. ``"tcp://0.0.0.0:5555"``);
    otherwise ``tcp://{host}:{port}``, and ``port`` 0/None binds a random free
    port.  ``.address`` is the actually bound endpoint.

    ``recv`` never raises on a bad message: it counts it in
    ``.rejections[reason_code]``, calls ``on_reject(peer, error)`` and keeps
    receiving.  Besides the codec checks it rejects messages whose run_id is
    not ``run_id`` ("run_id"), whose header producer_id is not the peer's
    routing id ("producer_id"), and (``check_seq``) whose seq does not exceed
    the last accepted seq of that peer ("seq"; a Hello resets it, so a
    restarted rollout must start with Hello).

    ``curve``: make the ROUTER a CURVE server with this key pair; with
    ``curve.allowed_clients`` set, only those client public keys are admitted
    (a ZAP handler thread, see the module docstring).  ``None``: plain TCP.
    """

    def __init__(
        self,
        run_id: str,
        *,
        address: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        producer_id: str = "learner",
        limits: DecodeLimits = DEFAULT_LIMITS,
        rcvhwm: int = 1000,
        sndhwm: int = 1000,
        on_reject: RejectCallback | None = None,
        check_seq: bool = True,
        curve: CurveServerKeys | None = None,
    ) -> None:
        if curve is not None and not isinstance(curve, CurveServerKeys):
            raise TypeError(f"curve must be CurveServerKeys or None, got {type(curve).__name__}")
        self.run_id = run_id
        self.producer_id = producer_id
        self.limits = limits
        self.curve = curve
        self.rejections: Counter[str] = Counter()
        self._on_reject = on_reject
        self._check_seq = check_seq
        # Called with (peer, frames) for every accepted message before recv returns it (recording).
        self.on_accept: Callable[[bytes, list[zmq.Frame]], None] | None = None
        self._last_seq: dict[bytes, int] = {}
        self._seq = 0
        self.address = ""
        #: Handshakes refused because the client's public key is not in the allow-list.
        self.curve_denied = 0
        self._open(zmq.ROUTER, limits, rcvhwm, sndhwm, curve=curve is not None)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if curve is not None:
                self._setup_curve_server(curve)
            if address is not None:
                self._sock.bind(address)
            elif port:
                self._sock.bind(f"tcp://{host}:{int(port)}")
            else:
                self._sock.bind_to_random_port(f"tcp://{host}")
            self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise

    def _setup_curve_server(self, curve: CurveServerKeys) -> None:
        if not zmq.has("curve"):
            raise RuntimeError("CURVE requested but this libzmq has no CURVE support (zmq.has('curve') is False)")
        if curve.allowed_clients is not None:
            from zmq.auth.thread import ThreadAuthenticator

            allowed = frozenset(curve.allowed_clients)
            names = dict(curve.allowed_clients)
            endpoint = self

            class _AllowList:
                def callback(self, domain: str, key: bytes) -> bool:  # runs in the authenticator thread
                    if key in allowed:
                        return True
                    endpoint.curve_denied += 1  # one writer (this thread); readers only read
                    n = endpoint.curve_denied
                    if n <= _LOG_FIRST_REJECTIONS or n & (n - 1) == 0:
                        log.warning("LearnerEndpoint(%s): refused a CURVE client whose public key %s is not in "
                                    "the allow-list (%d refusals so far)", endpoint.address, key.decode("ascii"), n)
                    return False

            class _Authenticator(ThreadAuthenticator):
                def curve_user_id(self, client_public_key: bytes) -> str:  # ZMQ "User-Id" of its messages
                    z85_key = z85.encode(client_public_key)
                    return names.get(z85_key, z85_key.decode("ascii"))

            self._auth = _Authenticator(self._ctx, log=logging.getLogger(f"{__name__}.zap"))
            self._auth.start()  # binds inproc://zeromq.zap.01 in this endpoint's own context
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList())
            self._sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):  # fail closed if the handler were ever missing
                try:
                    self._sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                except zmq.ZMQError:
                    pass
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
        self._sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)

    async def recv(self, timeout: float | None = None) -> tuple[bytes, Envelope]:
        """Next valid message as ``(peer_identity, envelope)``; invalid ones are counted and skipped.

        Raises ``TimeoutError`` if no valid message arrives within ``timeout`` seconds.
        Yields to the event loop after every message taken off the socket, valid or not.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            frames = await _recv_frames(
                self._sock, deadline, f"LearnerEndpoint({self.address}): no valid message within {timeout}s"
            )
            # An already-queued message completes the await without a trip through the event loop:
            # without this, a peer that keeps the queue full would starve every other coroutine.
            await asyncio.sleep(0)
            peer = frames[0].bytes
            try:
                env = decode(frames[1:], limits=self.limits, expected_run_id=self.run_id)
                if env.producer_id.encode() != peer:
                    raise ProtocolError(
                        "producer_id", f"header.producer_id {env.producer_id!r} does not match the peer routing id {peer!r}"
                    )
                self._check_key_binding(env.producer_id, frames[1])
                last = self._last_seq.get(peer)
                if self._check_seq and last is not None and env.seq <= last and not isinstance(env.body, Hello):
                    raise ProtocolError("seq", f"header.seq: expected > {last} for producer {env.producer_id!r}, got {env.seq}")
            except ProtocolError as exc:
                self._record(peer, exc)
                continue
            self._last_seq[peer] = env.seq
            if self.on_accept is not None:
                self.on_accept(peer, frames[1:])
            return peer, env

    def _check_key_binding(self, producer_id: str, frame: zmq.Frame) -> None:
        """With a CURVE allow-list, the client key NAME.key may only speak as producer NAME or NAME@...:
        one rollout's key cannot be used to pass as another rollout."""
        if self.curve is None or self.curve.allowed_clients is None:
            return
        key_name = frame.get("User-Id")  # set by the ZAP handler: the name of the client's key file
        if producer_id.split("@", 1)[0] != key_name:
            raise ProtocolError("producer_id", f"header.producer_id {producer_id!r} was sent with the CURVE key "
                                               f"{key_name!r}, which may only send as {key_name!r} or {key_name}@...")

    async def send(self, peer: bytes, msg: Any, weight_version: int) -> None:
        """Send ``msg`` to the rollout whose routing id is ``peer``.

        Raises :class:`PeerUnreachableError` when no such peer is connected,
        and its subclass :class:`PeerBackloggedError` when the peer's queue is
        full (``sndhwm`` messages it has not read): never waits for a peer, so
        one that stops reading (stuck or hostile) cannot stall the caller, and
        the error reaches the caller as a peer problem, not as ``zmq.Again``.
        """
        frames = encode(msg, run_id=self.run_id, producer_id=self.producer_id, seq=self._seq, weight_version=weight_version)
        self._seq += 1
        try:
            await self._sock.send_multipart([bytes(peer), *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachableError(
                    f"LearnerEndpoint({self.address}): peer {bytes(peer)!r} is not connected (ROUTER_MANDATORY)"
                ) from exc
            if exc.errno == zmq.EAGAIN:
                raise PeerBackloggedError(
                    f"LearnerEndpoint({self.address}): peer {bytes(peer)!r} has not read its last "
                    f"{self._sock.getsockopt(zmq.SNDHWM)} messages (send queue full)"
                ) from exc
            raise


class RolloutClient(_Owned):
    """Rollout side: a DEALER socket connected to the learner, routing id = ``producer_id``.

    ``recv`` raises :class:`ProtocolError` for an invalid message from the
    learner (after counting it in ``.rejections`` and calling ``on_reject``),
    including reason "run_id" for a message of another run.

    ``curve``: connect as a CURVE client with this key pair, accepting only a
    learner that holds the secret key of ``curve.server_public_key``.
    ``None``: plain TCP.  With CURVE the client watches its handshakes:
    once the learner has refused its key (libzmq then stops reconnecting, and
    a send would wait forever), or after
    ``_HANDSHAKE_FAILURES_FATAL`` failed handshakes in a row without a
    successful one or after a handshake protocol error (wrong learner key,
    learner without CURVE), ``send`` and
    ``recv`` raise :class:`CurveHandshakeError` saying so (a protocol error
    seen by the client ends the connection at once: libzmq does not retry it).
    """

    def __init__(
        self,
        address: str,
        run_id: str,
        producer_id: str,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        rcvhwm: int = 1000,
        sndhwm: int = 1000,
        on_reject: RejectCallback | None = None,
        curve: CurveClientKeys | None = None,
    ) -> None:
        if curve is not None and not isinstance(curve, CurveClientKeys):
            raise TypeError(f"curve must be CurveClientKeys or None, got {type(curve).__name__}")
        identity = producer_id.encode()
        if not 1 <= len(identity) <= 255 or identity.startswith(b"\x00"):
            raise ValueError(f"producer_id must be 1..255 UTF-8 bytes not starting with NUL, got {producer_id!r}")
        self.address = address
        self.run_id = run_id
        self.producer_id = producer_id
        self.limits = limits
        self.curve = curve
        self.rejections: Counter[str] = Counter()
        self._on_reject = on_reject
        self._seq = 0
        self._open(zmq.DEALER, limits, rcvhwm, sndhwm, curve=curve is not None)
        try:
            self._sock.setsockopt(zmq.ROUTING_ID, identity)
            if curve is not None:
                if not zmq.has("curve"):
                    raise RuntimeError("CURVE requested but this libzmq has no CURVE support (zmq.has('curve') is False)")
                self._sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public_key)
                self._sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
                self._sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
                self._watch_handshakes()
            self._sock.connect(address)
        except BaseException:
            self.close()
            raise

    def _watch_handshakes(self) -> None:
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        endpoint = f"inproc://rollout-client-monitor-{id(self):x}"
        self._sock.monitor(endpoint, events)
        self._monitor = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PAIR)  # plain: polled without awaiting
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(endpoint)
        self._handshake_failures = 0
        self._handshake_error: str | None = None

    def _check_handshake(self) -> None:
        """Raise :class:`CurveHandshakeError` if the CURVE handshake has definitely failed."""
        if self._monitor is None or self._closed:
            return
        while self._handshake_error is None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failures = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._handshake_error = (
                    f"the learner at {self.address} refused this rollout's CURVE public key "
                    f"{self.curve.public_key.decode()} (ZAP status {value}): it is not in the learner's allow-list; "
                    f"copy this rollout's .key file into the learner's transport.curve_dir and restart the learner")
            else:
                # A protocol error detected here ends the connection for good (libzmq does not
                # reconnect after one); a handshake cut short by the learner ("no detail") is retried.
                self._handshake_failures += 1
                if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or self._handshake_failures >= _HANDSHAKE_FAILURES_FATAL:
                    self._handshake_error = (
                        f"the CURVE handshake with {self.address} failed ({self._handshake_failures} attempt(s), "
                        f"last: {_event_name(kind)}, {_protocol_error_name(value) if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else value}): "
                        f"the learner's public key {self.curve.server_public_key.decode()} is not the key of the "
                        f"learner listening there, or that learner does not use CURVE")
        if self._handshake_error is not None:
            raise CurveHandshakeError(f"RolloutClient({self.producer_id!r}): {self._handshake_error}")

    async def send(self, msg: Any, weight_version: int) -> None:
        """Send ``msg`` to the learner, stamped with run_id, producer_id, next seq and ``weight_version``."""
        self._check_handshake()
        frames = encode(msg, run_id=self.run_id, producer_id=self.producer_id, seq=self._seq, weight_version=weight_version)
        self._seq += 1
        await self._sock.send_multipart(frames, copy=False)

    async def recv(self, timeout: float | None = None) -> Envelope:
        """Next message from the learner; ``TimeoutError`` if none within ``timeout`` seconds."""
        _check_timeout(timeout)
        self._check_handshake()
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            frames = await _recv_frames(
                self._sock,
                deadline,
                f"RolloutClient({self.producer_id!r}): no message from the learner at {self.address} within {timeout}s",
            )
        except TimeoutError:
            self._check_handshake()  # a refused handshake explains the silence better
            raise
        try:
            return decode(frames, limits=self.limits, expected_run_id=self.run_id)
        except ProtocolError as exc:
            self._record(self.address.encode(), exc)
            raise
