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
nothing it sends reaches ``recv`` and nothing can be sent to it (the ZAP
handler and the client's handshake monitor: :mod:`protocol.curve`).  Without
``curve`` nothing changes (plain TCP; use it on 127.0.0.1 only, see
:func:`protocol.network_policy.check_transport_security`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Any, Callable

import zmq
import zmq.asyncio

from .codec import DEFAULT_LIMITS, DecodeLimits, decode, encode
from .curve import CURVE_FRAME_OVERHEAD, HandshakeWatcher, setup_curve_client, setup_curve_server
from .errors import ProtocolError
from .keys import CurveClientKeys, CurveServerKeys
from .log_throttle import LOG_FIRST, worth_logging
from .messages import Envelope, Hello

__all__ = [
    "LearnerEndpoint",
    "RolloutClient",
    "PeerUnreachableError",
    "PeerBackloggedError",
    "free_tcp_port",
    "written",
]

log = logging.getLogger(__name__)

RejectCallback = Callable[[bytes, ProtocolError], None]

# How often `written` looks at a tracker: a bucket takes milliseconds to write out.
TRACKER_POLL_S = 0.001


class PeerUnreachableError(ConnectionError):
    """The learner tried to send to a peer identity that is not (or no longer) connected."""


class PeerBackloggedError(PeerUnreachableError):
    """The learner tried to send to a peer that has not read its last SNDHWM messages (stuck or hostile)."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on ``host`` (racy by nature; prefer binding to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def written(tracker: zmq.MessageTracker, timeout_s: float, what: str) -> None:
    """Return once ZeroMQ has let go of a tracked message (``RolloutClient.send(track=True)``);
    TimeoutError naming ``what`` after ``timeout_s`` seconds. Polls: pyzmq signals it from its own thread."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not tracker.done:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not written out within {timeout_s:g} s")
        await asyncio.sleep(TRACKER_POLL_S)


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
    _handshakes: HandshakeWatcher | None = None  # RolloutClient with CURVE

    def _open(self, kind: int, limits: DecodeLimits, rcvhwm: int, sndhwm: int, curve: bool = False) -> None:
        self._ctx = zmq.asyncio.Context()
        self._closed = False
        try:
            self._sock = self._ctx.socket(kind)
            self._sock.setsockopt(zmq.LINGER, 0)
            overhead = CURVE_FRAME_OVERHEAD if curve else 0
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
            if self._handshakes is not None:
                self._handshakes.close()
                self._handshakes = None
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
        if worth_logging(count):
            more = "" if count <= LOG_FIRST else f" ({count} rejections with this reason so far; not all logged)"
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
                self._auth = setup_curve_server(self._ctx, self._sock, curve, self._note_curve_denied)
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

    def _note_curve_denied(self, key: bytes) -> None:  # runs in the ZAP handler's thread
        self.curve_denied += 1  # one writer (that thread); readers only read
        n = self.curve_denied
        if worth_logging(n):
            log.warning("LearnerEndpoint(%s): refused a CURVE client whose public key %s is not in "
                        "the allow-list (%d refusals so far)", self.address, key.decode("ascii"), n)

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
    a send would wait forever), after a few failed handshakes in a row, or
    after a handshake protocol error (wrong learner key, learner without
    CURVE), ``send`` and ``recv`` raise
    :class:`protocol.curve.CurveHandshakeError` saying so (see
    :class:`protocol.curve.HandshakeWatcher`).
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
                setup_curve_client(self._sock, curve)
                self._handshakes = HandshakeWatcher(self._ctx, self._sock, curve, address,
                                                    f"RolloutClient({producer_id!r})")
            self._sock.connect(address)
        except BaseException:
            self.close()
            raise

    def _check_handshake(self) -> None:
        """Raise :class:`CurveHandshakeError` if the CURVE handshake has definitely failed."""
        if self._handshakes is not None and not self._closed:
            self._handshakes.check()

    async def send(self, msg: Any, weight_version: int, *, track: bool = False) -> zmq.MessageTracker | None:
        """Send ``msg`` to the learner, stamped with run_id, producer_id, next seq and ``weight_version``.

        ``track``: return a tracker that is done once ZeroMQ has written the message out and let go
        of its frames (:func:`written`); the message's buffers are held until then.
        """
        self._check_handshake()
        frames = encode(msg, run_id=self.run_id, producer_id=self.producer_id, seq=self._seq, weight_version=weight_version)
        self._seq += 1
        # ZeroMQ writes a message's frames in order: the last frame's tracker covers them all
        return await self._sock.send_multipart(frames, copy=False, track=track)

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
