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
allocating the frame); RCVHWM / SNDHWM bound the queues (in messages); the
ROUTER uses ROUTER_MANDATORY so sending to an unknown / disconnected peer
raises :class:`PeerUnreachableError` instead of silently dropping.
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
from .errors import ProtocolError
from .messages import Envelope, Hello

__all__ = ["LearnerEndpoint", "RolloutClient", "PeerUnreachableError", "free_tcp_port"]

log = logging.getLogger(__name__)

RejectCallback = Callable[[bytes, ProtocolError], None]


class PeerUnreachableError(ConnectionError):
    """The learner tried to send to a peer identity that is not (or no longer) connected."""


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

    def _open(self, kind: int, limits: DecodeLimits, rcvhwm: int, sndhwm: int) -> None:
        self._ctx = zmq.asyncio.Context()
        self._closed = False
        try:
            self._sock = self._ctx.socket(kind)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, int(limits.max_frame_bytes))
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

    def close(self) -> None:
        """Close the socket (linger 0) and terminate the owned context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.close(linger=0)
        finally:
            self._ctx.term()

    def _record(self, peer: bytes, exc: ProtocolError) -> None:
        self.rejections[exc.reason_code] += 1
        log.warning("%s rejected a message from %r: %s", type(self).__name__, peer, exc)
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
    ) -> None:
        self.run_id = run_id
        self.producer_id = producer_id
        self.limits = limits
        self.rejections: Counter[str] = Counter()
        self._on_reject = on_reject
        self._check_seq = check_seq
        self._last_seq: dict[bytes, int] = {}
        self._seq = 0
        self._open(zmq.ROUTER, limits, rcvhwm, sndhwm)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
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

    async def recv(self, timeout: float | None = None) -> tuple[bytes, Envelope]:
        """Next valid message as ``(peer_identity, envelope)``; invalid ones are counted and skipped.

        Raises ``TimeoutError`` if no valid message arrives within ``timeout`` seconds.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            frames = await _recv_frames(
                self._sock, deadline, f"LearnerEndpoint({self.address}): no valid message within {timeout}s"
            )
            peer = frames[0].bytes
            try:
                env = decode(frames[1:], limits=self.limits, expected_run_id=self.run_id)
                if env.producer_id.encode() != peer:
                    raise ProtocolError(
                        "producer_id", f"header.producer_id {env.producer_id!r} does not match the peer routing id {peer!r}"
                    )
                last = self._last_seq.get(peer)
                if self._check_seq and last is not None and env.seq <= last and not isinstance(env.body, Hello):
                    raise ProtocolError("seq", f"header.seq: expected > {last} for producer {env.producer_id!r}, got {env.seq}")
            except ProtocolError as exc:
                self._record(peer, exc)
                continue
            self._last_seq[peer] = env.seq
            return peer, env

    async def send(self, peer: bytes, msg: Any, weight_version: int) -> None:
        """Send ``msg`` to the rollout whose routing id is ``peer``.

        Raises :class:`PeerUnreachableError` when no such peer is connected.
        """
        frames = encode(msg, run_id=self.run_id, producer_id=self.producer_id, seq=self._seq, weight_version=weight_version)
        self._seq += 1
        try:
            await self._sock.send_multipart([bytes(peer), *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachableError(
                    f"LearnerEndpoint({self.address}): peer {bytes(peer)!r} is not connected (ROUTER_MANDATORY)"
                ) from exc
            raise


class RolloutClient(_Owned):
    """Rollout side: a DEALER socket connected to the learner, routing id = ``producer_id``.

    ``recv`` raises :class:`ProtocolError` for an invalid message from the
    learner (after counting it in ``.rejections`` and calling ``on_reject``),
    including reason "run_id" for a message of another run.
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
    ) -> None:
        identity = producer_id.encode()
        if not 1 <= len(identity) <= 255 or identity.startswith(b"\x00"):
            raise ValueError(f"producer_id must be 1..255 UTF-8 bytes not starting with NUL, got {producer_id!r}")
        self.address = address
        self.run_id = run_id
        self.producer_id = producer_id
        self.limits = limits
        self.rejections: Counter[str] = Counter()
        self._on_reject = on_reject
        self._seq = 0
        self._open(zmq.DEALER, limits, rcvhwm, sndhwm)
        try:
            self._sock.setsockopt(zmq.ROUTING_ID, identity)
            self._sock.connect(address)
        except BaseException:
            self.close()
            raise

    async def send(self, msg: Any, weight_version: int) -> None:
        """Send ``msg`` to the learner, stamped with run_id, producer_id, next seq and ``weight_version``."""
        frames = encode(msg, run_id=self.run_id, producer_id=self.producer_id, seq=self._seq, weight_version=weight_version)
        self._seq += 1
        await self._sock.send_multipart(frames, copy=False)

    async def recv(self, timeout: float | None = None) -> Envelope:
        """Next message from the learner; ``TimeoutError`` if none within ``timeout`` seconds."""
        _check_timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        frames = await _recv_frames(
            self._sock,
            deadline,
            f"RolloutClient({self.producer_id!r}): no message from the learner at {self.address} within {timeout}s",
        )
        try:
            return decode(frames, limits=self.limits, expected_run_id=self.run_id)
        except ProtocolError as exc:
            self._record(self.address.encode(), exc)
            raise
