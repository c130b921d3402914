"""ZeroMQ CURVE on the transport's sockets: the learner's server side (with its ZAP allow-list) and
the rollout's client side (with its handshake monitor). The key files themselves: :mod:`protocol.keys`.

The ZAP handler is pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`, bound inside the
endpoint's own context, not the asyncio authenticator: ZAP requests are answered in a thread of
their own, so handshakes complete while the learner's event loop is busy (decoding a large batch,
publishing weights) and whether or not a loop is running (the endpoint is created and closed
synchronously, and may outlive the loop it was created under); with
:class:`zmq.auth.asyncio.AsyncioAuthenticator` a handshake would wait for the loop and the endpoint
could only be created inside a running loop. The handler's sockets are plain (sync) sockets of the
endpoint's context: the endpoint stops it before terminating that context.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .keys import CurveClientKeys, CurveServerKeys

__all__ = ["ZAP_DOMAIN", "CURVE_FRAME_OVERHEAD", "CurveHandshakeError", "setup_curve_server",
           "setup_curve_client", "HandshakeWatcher"]

#: ZAP domain of the learner's CURVE server socket.
ZAP_DOMAIN = "streamrlhf"

#: A CURVE MESSAGE command wraps each frame in 33 bytes ("\x07MESSAGE", 8-byte nonce, 16-byte MAC,
#: 1 flags byte); libzmq applies ZMQ_MAXMSGSIZE to that wrapped frame.
CURVE_FRAME_OVERHEAD = 33

# A CURVE client gives up after this many handshakes in a row cut short by the learner (libzmq retries
# those; a protocol error or a refusal it detects itself ends the connection at once).
_HANDSHAKE_FAILURES_FATAL = 3


class CurveHandshakeError(ConnectionError):
    """The CURVE handshake with the learner failed: this rollout's key was refused, or the learner's
    public key (or the learner's CURVE setting) does not match."""


def _require_curve_support() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("CURVE requested but this libzmq has no CURVE support (zmq.has('curve') is False)")


def setup_curve_server(ctx: zmq.Context, sock: zmq.Socket, curve: CurveServerKeys,
                       on_denied: Callable[[bytes], None]) -> Any:
    """Make ``sock`` a CURVE server; with ``curve.allowed_clients``, start a ZAP handler admitting
    only those keys (``on_denied(z85_key)`` is called, in the handler's thread, for each refusal).

    Returns the ZAP handler thread (None without an allow-list): stop it before terminating ``ctx``.
    A client's messages carry the name of its key file as their ZMQ "User-Id" property.
    """
    _require_curve_support()
    auth = None
    if curve.allowed_clients is not None:
        from zmq.auth.thread import ThreadAuthenticator

        allowed = frozenset(curve.allowed_clients)
        names = dict(curve.allowed_clients)

        class _AllowList:
            def callback(self, domain: str, key: bytes) -> bool:  # runs in the authenticator thread
                if key in allowed:
                    return True
                on_denied(key)
                return False

        class _Authenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:  # ZMQ "User-Id" of its messages
                z85_key = z85.encode(client_public_key)
                return names.get(z85_key, z85_key.decode("ascii"))

        auth = _Authenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        auth.start()  # binds inproc://zeromq.zap.01 in the endpoint's own context
        auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList())
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):  # fail closed if the handler were ever missing
            try:
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            except zmq.ZMQError:
                pass
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    return auth


def setup_curve_client(sock: zmq.Socket, curve: CurveClientKeys) -> None:
    """Make ``sock`` a CURVE client that accepts only the server holding ``curve.server_public_key``."""
    _require_curve_support()
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)


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


class HandshakeWatcher:
    """Watches a CURVE client socket's handshakes (a socket monitor) to tell when they definitely failed.

    Once the learner has refused the client's key (libzmq then stops reconnecting, and a send would
    wait forever), or after ``_HANDSHAKE_FAILURES_FATAL`` failed handshakes in a row without a
    successful one, or after a handshake protocol error (wrong learner key, learner without CURVE),
    :meth:`check` raises :class:`CurveHandshakeError` saying so.
    """

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, curve: CurveClientKeys, address: str, who: str) -> None:
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        endpoint = f"inproc://rollout-client-monitor-{id(self):x}"
        sock.monitor(endpoint, events)
        self._sock = sock
        self._monitor = zmq.Context.shadow(ctx.underlying).socket(zmq.PAIR)  # plain: polled without awaiting
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(endpoint)
        self._curve = curve
        self._address = address
        self._who = who
        self._failures = 0
        self._error: str | None = None

    def check(self) -> None:
        """Raise :class:`CurveHandshakeError` if the CURVE handshake has definitely failed."""
        while self._error is None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self._note(event["event"], event["value"])
        if self._error is not None:
            raise CurveHandshakeError(f"{self._who}: {self._error}")

    def _note(self, kind: int, value: int) -> None:
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._failures = 0
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._error = (
                f"the learner at {self._address} refused this rollout's CURVE public key "
                f"{self._curve.public_key.decode()} (ZAP status {value}): it is not in the learner's allow-list; "
                f"copy this rollout's .key file into the learner's transport.curve_dir and restart the learner")
        else:
            # A protocol error detected here ends the connection for good (libzmq does not
            # reconnect after one); a handshake cut short by the learner ("no detail") is retried.
            self._failures += 1
            if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or self._failures >= _HANDSHAKE_FAILURES_FATAL:
                self._error = (
                    f"the CURVE handshake with {self._address} failed ({self._failures} attempt(s), "
                    f"last: {_event_name(kind)}, {_protocol_error_name(value) if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else value}): "
                    f"the learner's public key {self._curve.server_public_key.decode()} is not the key of the "
                    f"learner listening there, or that learner does not use CURVE")

    def close(self) -> None:
        """Stop monitoring (before the socket and its context close)."""
        try:
            self._sock.disable_monitor()
        finally:
            self._monitor.close(linger=0)
