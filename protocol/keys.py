"""ZeroMQ CURVE keys for the learner <-> rollout transport.

Generate key pairs (one per name; ZeroMQ's certificate format, as written by
:func:`zmq.auth.create_certificates`)::

    python -m protocol.keys generate KEYDIR --name learner --name rollout-0 --name rollout-1

writes ``KEYDIR/NAME.key`` (public key) and ``KEYDIR/NAME.key_secret`` (the
key pair, mode 600) for every name.  Which file goes where (see
:data:`DISTRIBUTION` and ``python -m protocol.keys --help``):

* the learner needs its own ``learner.key_secret`` and, as its allow-list,
  the public ``*.key`` files of every rollout it should admit (a directory:
  with ``transport.curve_dir`` it is that same directory, every ``*.key``
  other than ``learner.key``);
* each rollout needs the learner's public ``learner.key`` and its own
  ``rollout-N.key_secret``;
* a ``*.key_secret`` file never leaves the host of the process it belongs to
  and is readable by its owner only (loading one that others can read warns).

Keys travel as files on paths (copy them with the tool you trust, e.g. scp);
nothing here sends keys over the network.  Revoking a rollout = deleting its
``.key`` file from the learner's allow-list directory and restarting the
learner (the allow-list is read once, when the endpoint starts).

This module depends on pyzmq only (with libsodium CURVE support:
``zmq.has("curve")``).
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = [
    "CurveKeyError",
    "InsecureKeyFileWarning",
    "CurveServerKeys",
    "CurveClientKeys",
    "KeyPairFiles",
    "generate_keys",
    "load_public_key",
    "load_key_pair",
    "load_allowed_clients",
    "server_keys_from_dir",
    "client_keys_from_dir",
    "LEARNER_KEY_NAME",
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "DISTRIBUTION",
    "main",
]

#: Name of the learner's key pair inside ``transport.curve_dir``.
LEARNER_KEY_NAME = "learner"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

DISTRIBUTION = f"""\
How the keys are distributed (by path; nothing is sent over the network):
  learner host : DIR/{LEARNER_KEY_NAME}{SECRET_SUFFIX} (its own key pair) and the rollouts' public
                 keys DIR/rollout-N{PUBLIC_SUFFIX} -- the allow-list: every *{PUBLIC_SUFFIX} file of
                 transport.curve_dir except {LEARNER_KEY_NAME}{PUBLIC_SUFFIX} is admitted, nothing else.
  rollout N    : DIR/{LEARNER_KEY_NAME}{PUBLIC_SUFFIX} (the learner's public key, to authenticate
                 the learner) and its own key pair DIR/rollout-N{SECRET_SUFFIX}.
  On one machine, point every process's --transport.curve_dir at DIR. On several, copy the files
  listed above (scp or your secrets manager) into a directory with the same layout on each host.
  *{SECRET_SUFFIX} files are written with mode 600 and must stay readable by their owner only;
  never copy a {SECRET_SUFFIX} file to another host. Revoke a rollout by deleting its
  {PUBLIC_SUFFIX} file on the learner host and restarting the learner.
"""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GENERATE_HINT = "generate keys with `python -m protocol.keys generate DIR --name learner --name rollout-0 ...`"


class CurveKeyError(ValueError):
    """A CURVE key file is missing, malformed or inconsistent; the message names the file."""


class InsecureKeyFileWarning(UserWarning):
    """A secret key file is readable or writable by users other than its owner."""


@dataclass(frozen=True)
class KeyPairFiles:
    name: str
    public: Path
    secret: Path


@dataclass(frozen=True)
class CurveServerKeys:
    """The learner's CURVE key pair (Z85 text, 40 bytes each) and its client allow-list.

    ``allowed_clients``: Z85 public key -> name of every client admitted, or
    ``None`` for no allow-list (any client that knows the server's public key
    completes the handshake: encrypted, but not authenticated).
    """

    public_key: bytes
    secret_key: bytes
    allowed_clients: Mapping[bytes, str] | None = field(default=None)

    def __post_init__(self) -> None:
        _check_z85("server public key", self.public_key)
        _check_z85("server secret key", self.secret_key)
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise CurveKeyError("server public and secret keys are not a pair")
        if self.allowed_clients is not None:
            for key in self.allowed_clients:
                _check_z85("allowed client key", key)

    @classmethod
    def load(cls, secret_path: str | os.PathLike, allowed_clients_dir: str | os.PathLike | None = None) -> CurveServerKeys:
        """The server key pair from ``NAME.key_secret`` plus, if given, the allow-list directory of ``*.key`` files."""
        public, secret = load_key_pair(secret_path)
        allowed = None
        if allowed_clients_dir is not None:
            allowed = load_allowed_clients(allowed_clients_dir, exclude=(public,))
        return cls(public, secret, allowed)

    def __repr__(self) -> str:  # never print the secret key
        n = "any" if self.allowed_clients is None else len(self.allowed_clients)
        return f"CurveServerKeys(public_key={self.public_key!r}, allowed_clients={n})"


@dataclass(frozen=True)
class CurveClientKeys:
    """A rollout's CURVE key pair and the learner's public key (Z85 text, 40 bytes each)."""

    public_key: bytes
    secret_key: bytes
    server_public_key: bytes

    def __post_init__(self) -> None:
        _check_z85("client public key", self.public_key)
        _check_z85("client secret key", self.secret_key)
        _check_z85("server public key", self.server_public_key)
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise CurveKeyError("client public and secret keys are not a pair")

    @classmethod
    def load(cls, secret_path: str | os.PathLike, server_public_path: str | os.PathLike) -> CurveClientKeys:
        """The client key pair from ``NAME.key_secret`` and the server's public key from ``learner.key``."""
        public, secret = load_key_pair(secret_path)
        return cls(public, secret, load_public_key(server_public_path))

    def __repr__(self) -> str:
        return f"CurveClientKeys(public_key={self.public_key!r}, server_public_key={self.server_public_key!r})"


# --------------------------------------------------------------------------- loading


def _check_z85(what: str, key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != 40:
        raise CurveKeyError(f"{what}: expected 40 bytes of Z85 text, got {type(key).__name__} of length "
                            f"{len(key) if isinstance(key, (bytes, str)) else '?'}")
    try:
        raw = z85.decode(key)
    except Exception:  # noqa: BLE001 - z85 raises KeyError / ValueError on bad characters
        raise CurveKeyError(f"{what}: not valid Z85 text") from None
    if len(raw) != 32:
        raise CurveKeyError(f"{what}: decodes to {len(raw)} bytes, expected 32")
    return key


def _read_certificate(path: str | os.PathLike, kind: str) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.exists():
        raise CurveKeyError(f"CURVE {kind} file {path} does not exist ({_GENERATE_HINT})")
    if not path.is_file():
        raise CurveKeyError(f"CURVE {kind} file {path} is not a regular file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise CurveKeyError(f"{path} is not a ZeroMQ CURVE certificate (no 'public-key = \"...\"' line); "
                            f"expected a file written by `python -m protocol.keys generate`") from None
    except OSError as exc:
        raise CurveKeyError(f"cannot read CURVE {kind} file {path}: {exc}") from None
    try:
        _check_z85(f"{path}: public-key", public)
        if secret is not None:
            _check_z85(f"{path}: secret-key", secret)
    except CurveKeyError as exc:
        raise CurveKeyError(f"malformed CURVE certificate {exc}") from None
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key of a ``NAME.key`` (or ``NAME.key_secret``) certificate file."""
    public, _ = _read_certificate(path, "public key")
    return public


def load_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``NAME.key_secret`` certificate file.

    Raises :class:`CurveKeyError` when the file is missing, malformed, holds no
    secret key (a public ``.key`` file was passed) or its two keys are not a
    pair; warns (:class:`InsecureKeyFileWarning`) when users other than the
    owner can read or write it.
    """
    path = Path(path)
    public, secret = _read_certificate(path, "secret key")
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key: pass the NAME{SECRET_SUFFIX} file of the key pair, "
                            f"not the public NAME{PUBLIC_SUFFIX} file")
    if zmq.curve_public(secret) != public:
        raise CurveKeyError(f"{path}: its public-key is not the public key of its secret-key (corrupted or edited file)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        warnings.warn(f"CURVE secret key file {path} has mode {mode:o}: other users can access it; "
                      f"run `chmod 600 {path}`", InsecureKeyFileWarning, stacklevel=2)
    return public, secret


def load_allowed_clients(directory: str | os.PathLike, *, exclude: Sequence[bytes] = ()) -> dict[bytes, str]:
    """Allow-list: Z85 public key -> name (file stem) of every ``*.key`` file in ``directory``.

    Keys in ``exclude`` (the server's own public key) are left out.  Raises
    :class:`CurveKeyError` if the directory does not exist, a file is
    malformed, or no client key remains (an empty allow-list would refuse
    every rollout).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CurveKeyError(f"CURVE allow-list directory {directory} does not exist ({_GENERATE_HINT})")
    allowed: dict[bytes, str] = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        key = load_public_key(path)
        if key not in exclude:
            allowed.setdefault(key, path.name[: -len(PUBLIC_SUFFIX)])
    if not allowed:
        raise CurveKeyError(f"no client public keys (*{PUBLIC_SUFFIX}) in the CURVE allow-list directory {directory}; "
                            f"every rollout would be refused ({_GENERATE_HINT})")
    return allowed


def server_keys_from_dir(curve_dir: str | os.PathLike, name: str = LEARNER_KEY_NAME) -> CurveServerKeys:
    """The learner's keys for ``transport.curve_dir``: ``NAME.key_secret``; allow-list = the other ``*.key`` files."""
    curve_dir = Path(curve_dir)
    return CurveServerKeys.load(curve_dir / f"{name}{SECRET_SUFFIX}", allowed_clients_dir=curve_dir)


def client_keys_from_dir(curve_dir: str | os.PathLike, name: str, server_name: str = LEARNER_KEY_NAME) -> CurveClientKeys:
    """A rollout's keys for ``transport.curve_dir``: ``name.key_secret`` and the learner's ``learner.key``."""
    curve_dir = Path(curve_dir)
    return CurveClientKeys.load(curve_dir / f"{name}{SECRET_SUFFIX}", curve_dir / f"{server_name}{PUBLIC_SUFFIX}")


# --------------------------------------------------------------------------- generation


def generate_keys(directory: str | os.PathLike, names: Sequence[str], *, force: bool = False) -> list[KeyPairFiles]:
    """Write ``NAME.key`` (mode 644) and ``NAME.key_secret`` (mode 600) for every name into ``directory``.

    The secret file is created with mode 600 before any key is written into it
    (no window in which another user could read it).  Existing files are an
    error unless ``force``.
    """
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (zmq.has('curve') is False); install pyzmq wheels "
                           "built with libsodium")
    names = list(names)
    if not names:
        raise CurveKeyError("no key names given")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CurveKeyError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' "
                                f"(at most 128, not starting with '.', '_' or '-')")
    if len(set(names)) != len(names):
        raise CurveKeyError(f"duplicate key names in {names}")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = []
    for name in names:
        public, secret = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
        existing = [p for p in (public, secret) if p.exists() or p.is_symlink()]
        if existing and not force:
            raise CurveKeyError(f"{', '.join(map(str, existing))} already exist(s); pass --force to replace")
        for p in existing:
            p.unlink()
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
        zmq.auth.create_certificates(directory, name)  # opens the 600 file with "w": the mode stays
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        out.append(KeyPairFiles(name, public, secret))
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.keys",
        description="ZeroMQ CURVE keys for StreamRLHF's learner <-> rollout transport "
                    "(enable with --transport.curve_dir DIR).",
        epilog=DISTRIBUTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="write a key pair per name: NAME.key (public) and NAME.key_secret (mode 600)",
        description="Write a CURVE key pair per name into DIR: NAME.key (public key) and NAME.key_secret "
                    "(public + secret key, mode 600).",
        epilog=DISTRIBUTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("dir", metavar="DIR", help="directory for the key files (created with mode 700 if missing)")
    gen.add_argument("--name", action="append", dest="names", metavar="NAME",
                     help=f"key pair name, repeatable (default: {LEARNER_KEY_NAME} and rollout-0); "
                          f"the learner's must be '{LEARNER_KEY_NAME}' for transport.curve_dir")
    gen.add_argument("--force", action="store_true", help="replace existing key files of the same names")
    args = parser.parse_args(argv)
    names = args.names or [LEARNER_KEY_NAME, "rollout-0"]
    try:
        written = generate_keys(args.dir, names, force=args.force)
    except (CurveKeyError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for files in written:
        print(f"{files.name}: public {files.public}  secret {files.secret} (mode 600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
