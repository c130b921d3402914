"""Wire codec: messages <-> lists of frames (bytes-like), for ZeroMQ multipart messages.

Wire format (schema version ``SCHEMA_VERSION``, 8 today)
--------------------------------------------------------
Frame 0 is a msgpack map::

    {"schema_version": SCHEMA_VERSION, "kind": str, "run_id": str, "producer_id": str,
     "seq": int, "weight_version": int,
     "body": {<scalar / small fields of the message>},
     "arrays": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]}

Versioning: a decoder accepts exactly its own ``SCHEMA_VERSION``, and every field is required
and checked, so any change to a message's fields or to their allowed values bumps the version
(8: the learner invites a rollout into the NCCL weight group, ``weight_group_invite``;
7: a rollout credits each streamed weight bucket it has let go of, ``weight_credit``;
6: weight updates may also be streamed, a header then one message per bucket, and relayed between
rollouts; 5: work grants and packed batches say whether they are for evaluation, temperature 0 is greedy;
4: sampling specs carry min_new_tokens; 3: stop strings, and shutdowns say whether to rejoin;
2: packed batches carry the last weight version of each sequence).

Frame ``i >= 1`` holds the raw little-endian C-order bytes of ``arrays[i-1]``
(numpy arrays, WorkGrant prompt tokens concatenated into one array, and each
WeightUpdate bucket as a ``uint8`` array named ``"bucket"``; a WeightBucket's bytes as one named
``"data"``).  Numbers never
travel as msgpack lists and nothing is ever pickled.

What goes where follows from the message classes (:mod:`protocol.messages`): each field's wire
spec (:mod:`protocol.schema`) says whether it is a body entry or frames and which values it may
hold; the rules between fields are in :mod:`protocol.invariants`.

``encode`` is zero-copy for arrays (the returned frames are memoryviews of the
message's arrays / buckets; do not mutate them until they are sent).
``decode`` validates everything (see :func:`decode`) and returns arrays that
are **read-only zero-copy numpy views of the received frames**: they keep the
frames alive; copy them if you need writable or long-lived independent data.

Hostile input: every size is checked against :class:`DecodeLimits` before
anything proportional to it is allocated -- frame count / frame lengths first,
then msgpack is unpacked with ``max_*_len`` limits (so a forged length prefix
cannot make msgpack allocate), then declared array shapes are checked against
the limits and the actual frame lengths (computed with Python ints, no
overflow) before any numpy view is created.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack
import numpy as np

from .buffers import byte_view
from .checks import check_int, check_list, check_str, short, type_name
from .dtypes import ARRAY_DTYPES
from .errors import ProtocolError
from .invariants import LOGPROB_SLACK
from .limits import DEFAULT_LIMITS, DecodeLimits
from .messages import MESSAGE_TYPES, SCHEMA_VERSION, Envelope
from .schema import WireMap, check_fields, decode_fields, encode_fields

__all__ = ["DecodeLimits", "DEFAULT_LIMITS", "LOGPROB_SLACK", "encode", "decode", "validate"]


def _kind_of(msg: Any) -> str:
    kind = getattr(type(msg), "KIND", "")
    if MESSAGE_TYPES.get(kind) is not type(msg):
        raise ProtocolError("unknown_kind", f"not a protocol message: {type_name(msg)}")
    return kind


def validate(msg: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Check every type, range and invariant of a message; raise :class:`ProtocolError` if any fails."""
    check_fields(msg, _kind_of(msg), limits)


# =========================================================================== encode


def _frame_of(value: Any, dtype: str) -> tuple[list[int], memoryview]:
    """Zero-copy 1-D byte view of an array / buffer plus its shape (copies only if not contiguous LE)."""
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value, dtype=ARRAY_DTYPES[dtype])
        return [int(d) for d in arr.shape], byte_view(arr)
    try:
        view = byte_view(value)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_type", f"{dtype} frame: expected a C-contiguous bytes-like object ({exc})") from None
    return [view.nbytes], view


def encode(
    msg: Any,
    *,
    run_id: str,
    producer_id: str,
    seq: int,
    weight_version: int,
    validate: bool = True,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> list[bytes | memoryview]:
    """Encode a message into frames: ``[msgpack header, raw array frame, ...]``.

    With ``validate=True`` (default) the message is first checked exactly like
    :func:`decode` would (same reason codes), so contract violations surface at
    the sender.  Array frames are zero-copy memoryviews of the message's arrays.
    """
    kind = _kind_of(msg)
    check_str("header.run_id", run_id, limits)
    check_str("header.producer_id", producer_id, limits)
    check_int("header.seq", seq, lo=0)
    check_int("header.weight_version", weight_version, lo=-1)  # -1: the sender holds no published weights yet
    if validate:
        check_fields(msg, kind, limits)
    arrays: list[tuple[str, str, Any]] = []
    body = encode_fields(msg, arrays)
    descriptors = []
    frames: list[bytes | memoryview] = []
    for name, dtype, value in arrays:
        shape, view = _frame_of(value, dtype)
        descriptors.append({"name": name, "dtype": dtype, "shape": shape})
        frames.append(view)
    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "run_id": run_id,
        "producer_id": producer_id,
        "seq": int(seq),
        "weight_version": int(weight_version),
        "body": body,
        "arrays": descriptors,
    }
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("bad_type", f"{kind}: header cannot be msgpack-encoded: {exc}") from None
    return [packed, *frames]


# =========================================================================== decode


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ProtocolError("bad_msgpack", "header: duplicate key in a msgpack map")
    return out


class _ArrayFrames:
    """Array descriptors + frames; hands out read-only numpy views in declared order."""

    def __init__(self, kind: str, descriptors: Any, frames: list[memoryview], limits: DecodeLimits) -> None:
        descriptors = check_list(f"{kind}.arrays", descriptors, limits.max_frames)
        if len(descriptors) != len(frames):
            raise ProtocolError(
                "frame_count",
                f"{kind}: header declares {len(descriptors)} array frame(s) but {len(frames)} followed the header",
            )
        self.kind = kind
        self.items: list[tuple[str, str, list[int], memoryview]] = []
        for i, raw in enumerate(descriptors):
            path = f"{kind}.arrays[{i}]"
            desc = WireMap(raw, path)
            name = check_str(f"{path}.name", desc["name"], limits)
            dtype = desc["dtype"]
            if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
                raise ProtocolError("bad_dtype", f"{path} ({name!r}).dtype: expected one of {sorted(ARRAY_DTYPES)}, got {short(dtype)}")
            shape = check_list(f"{path} ({name!r}).shape", desc["shape"], limits.max_ndim)
            desc.done()
            nbytes = ARRAY_DTYPES[dtype].itemsize
            for d, dim in enumerate(shape):
                nbytes *= check_int(f"{path} ({name!r}).shape[{d}]", dim, lo=0)
            if nbytes > limits.max_frame_bytes:
                raise ProtocolError(
                    "too_large", f"{path} ({name!r}): declared {dtype} {shape} = {nbytes} bytes > max_frame_bytes {limits.max_frame_bytes}"
                )
            if nbytes != frames[i].nbytes:
                raise ProtocolError(
                    "length_mismatch",
                    f"{path} ({name!r}): declared {dtype} {shape} = {nbytes} bytes but frame {i + 1} has {frames[i].nbytes} bytes",
                )
            self.items.append((name, dtype, shape, frames[i]))
        self.pos = 0

    def _next(self, name: str) -> tuple[str, str, list[int], memoryview]:
        if self.pos >= len(self.items):
            raise ProtocolError("missing_field", f"{self.kind}.arrays[{self.pos}]: missing array {name!r}")
        item = self.items[self.pos]
        if item[0] != name:
            raise ProtocolError("missing_field", f"{self.kind}.arrays[{self.pos}]: expected array {name!r}, got {item[0]!r}")
        self.pos += 1
        return item

    def take(self, name: str, dtype: str) -> np.ndarray:
        _, got_dtype, shape, view = self._next(name)
        path = f"{self.kind}.arrays[{self.pos - 1}] ({name!r})"
        if got_dtype != dtype:
            raise ProtocolError("bad_dtype", f"{path}: expected dtype {dtype}, got {got_dtype}")
        if len(shape) != 1:
            raise ProtocolError("bad_shape", f"{path}: expected a 1-D shape, got {shape}")
        return np.frombuffer(view, dtype=ARRAY_DTYPES[dtype])  # read-only: view is read-only

    def take_buffers(self, name: str) -> list[memoryview]:
        out = []
        while self.pos < len(self.items) and self.items[self.pos][0] == name:
            _, dtype, shape, view = self._next(name)
            if dtype != "uint8" or len(shape) != 1:
                raise ProtocolError("bad_dtype", f"{self.kind}.arrays[{self.pos - 1}] ({name!r}): expected 1-D uint8, got {dtype} {shape}")
            out.append(view)
        return out

    def done(self) -> None:
        if self.pos != len(self.items):
            raise ProtocolError("unknown_field", f"{self.kind}.arrays[{self.pos}]: unexpected array {self.items[self.pos][0]!r}")


def _frame_views(frames: Any, limits: DecodeLimits) -> list[memoryview]:
    if not isinstance(frames, (list, tuple)):
        raise ProtocolError("bad_type", f"frames: expected a list of bytes-like frames, got {type_name(frames)}")
    if not frames:
        raise ProtocolError("frame_count", "frames: empty message (expected a header frame)")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too_large", f"frames: {len(frames)} frames > max_frames {limits.max_frames}")
    views = []
    total = 0
    for i, frame in enumerate(frames):
        try:
            view = byte_view(frame)
        except (TypeError, ValueError) as exc:
            raise ProtocolError("bad_type", f"frame {i}: expected a C-contiguous bytes-like object, got {type_name(frame)} ({exc})") from None
        if view.nbytes > limits.max_frame_bytes:
            raise ProtocolError("too_large", f"frame {i}: {view.nbytes} bytes > max_frame_bytes {limits.max_frame_bytes}")
        total += view.nbytes
        if total > limits.max_total_bytes:
            raise ProtocolError("too_large", f"frames: more than max_total_bytes {limits.max_total_bytes} bytes")
        views.append(view.toreadonly())
    if views[0].nbytes > limits.max_header_bytes:
        raise ProtocolError("too_large", f"frame 0 (header): {views[0].nbytes} bytes > max_header_bytes {limits.max_header_bytes}")
    return views


def _unpack_header(view: memoryview, limits: DecodeLimits) -> Any:
    try:
        return msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_to_dict,
            max_str_len=limits.max_string_len,
            max_bin_len=0,  # the header never carries binary blobs
            max_ext_len=0,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
        )
    except ProtocolError:
        raise
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            raise ProtocolError("too_large", f"frame 0 (header): {exc}") from None
        raise ProtocolError("bad_msgpack", f"frame 0 (header): not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack parser failures of any other kind (nesting, unicode, ...)
        raise ProtocolError("bad_msgpack", f"frame 0 (header): not valid msgpack: {type_name(exc)}: {exc}") from None


def decode(frames: Sequence[Any], *, limits: DecodeLimits = DEFAULT_LIMITS, expected_run_id: str | None = None) -> Envelope:
    """Decode and fully validate one message; raise :class:`ProtocolError` on any problem.

    ``frames`` is a list of bytes-like objects (``bytes``, ``memoryview``,
    ``zmq.Frame``).  Checks, in order: frame count and sizes against
    ``limits``; header msgpack (with unpack limits); schema version; known
    kind; envelope field types; ``run_id`` (when ``expected_run_id`` is
    given); array descriptors vs. frames (count, dtype, shape vs. byte
    length); every body field's presence, type and range; message invariants
    (see :func:`validate`).

    Returned numpy arrays (and WeightUpdate buckets) are read-only zero-copy
    views of ``frames``.
    """
    views = _frame_views(frames, limits)
    header = WireMap(_unpack_header(views[0], limits), "header")
    version = header["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise ProtocolError("schema_version", f"header.schema_version: expected {SCHEMA_VERSION}, got {short(version)}")
    kind = header["kind"]
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_kind", f"header.kind: expected one of {sorted(MESSAGE_TYPES)}, got {short(kind)}")
    run_id = check_str("header.run_id", header["run_id"], limits)
    if expected_run_id is not None and run_id != expected_run_id:
        raise ProtocolError("run_id", f"header.run_id: expected {expected_run_id!r}, got {run_id!r}")
    producer_id = check_str("header.producer_id", header["producer_id"], limits)
    seq = check_int("header.seq", header["seq"], lo=0)
    weight_version = check_int("header.weight_version", header["weight_version"], lo=-1)
    body = WireMap(header["body"], f"{kind}.body")
    arrays = _ArrayFrames(kind, header["arrays"], views[1:], limits)
    header.done()
    msg = decode_fields(MESSAGE_TYPES[kind], body, arrays, kind)
    arrays.done()
    check_fields(msg, kind, limits)
    return Envelope(
        schema_version=version,
        kind=kind,
        run_id=run_id,
        producer_id=producer_id,
        seq=seq,
        weight_version=weight_version,
        body=msg,
    )
