"""Network policy: refuse unauthenticated plain TCP off the loopback interface.

Checked at start-up by the learner, the rollouts and the launch scripts (launch/common.sh), before
anything binds or connects.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = ["InsecureTransportError", "check_transport_security", "is_loopback_host", "relay_bind_host"]


class InsecureTransportError(ConfigError):
    """The transport would accept unauthenticated connections from the network."""


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
    ``bind_host``, ``learner_host`` or (with the weight relay on) a given ``relay_host`` is not a
    loopback address, and with ``weight_transfer nccl`` whenever ``bind_host`` or ``learner_host`` is
    not (CURVE does not cover NCCL); raises
    ``ConfigError`` when ``curve_dir`` is set but is not a directory.  Returns
    whether CURVE is on.
    """
    t = getattr(cfg, "transport", cfg)
    _check_nccl_rendezvous(t)
    curve_dir = str(getattr(t, "curve_dir", "") or "")
    if curve_dir:
        if not Path(curve_dir).is_dir():
            raise ConfigError(f"transport.curve_dir {curve_dir!r} is not a directory; generate the keys with "
                              f"`python -m protocol.keys generate {curve_dir} --name learner --name rollout-0 ...`")
        return True
    if not getattr(t, "curve_required_off_loopback", True):
        return False
    relay_host_given = getattr(t, "weight_relay_fanout", 0) and getattr(t, "relay_host", "")
    off = _off_loopback(t, ("bind_host", "learner_host", *(("relay_host",) if relay_host_given else ())))
    if off:
        key, host = off
        raise InsecureTransportError(
            f"transport.{key} is {host!r}, not a loopback address, and CURVE is off: any host that can "
            f"reach the port could feed the learner samples or take its work and weights. Generate keys "
            f"with `python -m protocol.keys generate KEYDIR --name learner --name rollout-0 --name rollout-1` "
            f"(one rollout-N per rollout process) and pass --transport.curve_dir KEYDIR to every process, "
            f"or bind to 127.0.0.1, or (on a network you trust completely) set "
            f"--transport.curve_required_off_loopback false.")
    return False


def _off_loopback(t: Any, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of the host options `keys` of `t` that is not a loopback address, with its value."""
    return next(((key, str(getattr(t, key))) for key in keys if not is_loopback_host(str(getattr(t, key)))), None)


def _check_nccl_rendezvous(t: Any) -> None:
    """With weight_transfer nccl, NCCL's own bootstrap (reached through the unique id the learner hands out
    over ZeroMQ) and its traffic are unauthenticated whatever CURVE does: off loopback they need the same
    explicit trust."""
    if getattr(t, "weight_transfer", "zmq") != "nccl" or not getattr(t, "curve_required_off_loopback", True):
        return
    off = _off_loopback(t, ("bind_host", "learner_host"))
    if off:
        key, host = off
        raise InsecureTransportError(
            f"transport.weight_transfer nccl with transport.{key} {host!r}, not a loopback address: the NCCL "
            f"group's bootstrap connections and its traffic are not authenticated, CURVE or not. "
            f"On a network you trust completely set --transport.curve_required_off_loopback false "
            f"(transport.curve_dir still protects the ZeroMQ side), or use transport.weight_transfer zmq.")


def relay_bind_host(t: Any) -> str:
    """The address a rollout binds its weight relay socket to (``TransportConfig`` `t`): ``relay_host``,
    or else the address of the interface that routes to ``learner_host`` (loopback when the learner is
    on loopback, so the relay is off loopback only where the learner's socket is too)."""
    if t.relay_host:
        return t.relay_host
    if is_loopback_host(t.learner_host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((t.learner_host, int(t.port) or 9))  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])
