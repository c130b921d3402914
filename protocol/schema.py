"""Message schema: each dataclass field of a message says how it travels and what it may hold.

A message field is declared once, ``name: type = wire(Spec(...))``; its :class:`Spec` gives

* ``check``: the type and range checks (the same on the sender and the receiver),
* ``encode`` / ``decode``: where the value goes on the wire (a msgpack body entry, or raw frames),
* ``coerce``: the conversion done when a message is built (arrays to their dtype).

:func:`check_fields`, :func:`encode_fields` and :func:`decode_fields` walk a class's fields in
declaration order (so the msgpack body keeps the order of the fields). Rules between fields (lengths
that must agree, masks, offsets) are a class's ``INVARIANTS`` (see :mod:`protocol.invariants`),
run after its fields' own checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Collection

import numpy as np

from .checks import (check_array, check_bool, check_buffer, check_float, check_int, check_list, check_map,
                     check_str, check_token_id, short, type_name)
from .dtypes import ARRAY_DTYPES
from .errors import ProtocolError
from .limits import DecodeLimits

__all__ = ["wire", "Spec", "Int", "TokenId", "Float", "Str", "Bool", "Optional", "Choice", "List", "Map",
           "Scalar", "Nested", "Shape", "Array", "Ragged", "Buffers", "Schema", "WireMap",
           "wire_fields", "check_fields", "encode_fields", "decode_fields"]

#: (name, wire dtype, ndarray or bytes-like): the raw frames of a message, in order.
Arrays = list[tuple[str, str, Any]]


def wire(spec: Spec, **kwargs: Any) -> Any:
    """A dataclass field travelling as ``spec`` says (``kwargs`` go to :func:`dataclasses.field`)."""
    return field(metadata={"wire": spec}, **kwargs)


class WireMap:
    """Reads the required fields of a msgpack map, remembering which were used."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError("bad_type", f"{path}: expected map, got {type_name(value)} ({short(value)})")
        self.d = value
        self.path = path
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        if key not in self.d:
            raise ProtocolError("missing_field", f"{self.path}.{key}: missing required field")
        self.used.add(key)
        return self.d[key]

    def done(self) -> None:
        extra = [k for k in self.d if k not in self.used]
        if extra:
            raise ProtocolError("unknown_field", f"{self.path}: unexpected field(s) {short(extra)}")


# =========================================================================== specs


class Spec:
    """A field in the msgpack body, its value sent as it is; subclasses narrow what it may hold."""

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        """Raise :class:`ProtocolError` unless ``value`` is allowed here."""

    def coerce(self, path: str, value: Any) -> Any:
        """The value a message holds when built with ``value``."""
        return value

    def to_wire(self, value: Any) -> Any:
        return value

    def from_wire(self, path: str, raw: Any, arrays: Any) -> Any:
        return raw

    def encode(self, name: str, value: Any, body: dict, arrays: Arrays) -> None:
        body[name] = self.to_wire(value)

    def decode(self, name: str, path: str, body: WireMap, arrays: Any) -> Any:
        return self.from_wire(f"{path}.{name}", body[name], arrays)


@dataclass(frozen=True)
class Int(Spec):
    lo: int | None = None
    hi: int | None = None

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        check_int(path, value, self.lo, self.hi)

    def to_wire(self, value: Any) -> int:
        return int(value)


class TokenId(Int):
    """A token id: >= 0, and below ``limits.vocab_size`` when that is set."""

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        check_token_id(path, check_int(path, value), limits)


@dataclass(frozen=True)
class Float(Spec):
    """A finite number, ``lo <= x`` (or ``above < x``) and ``x <= hi`` where given; ``note`` explains ``lo``."""

    lo: float | None = None
    above: float | None = None
    hi: float | None = None
    note: str = ""

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        x = check_float(path, value)
        if (self.lo is not None and x < self.lo) or (self.above is not None and x <= self.above) \
                or (self.hi is not None and x > self.hi):
            raise ProtocolError("bad_value", f"{path}: expected {self._range(path)}, got {x}")

    def _range(self, path: str) -> str:
        if self.above is None and self.hi is None:
            return f">= {self.lo}{self.note}"
        low = f"{self.above} < " if self.above is not None else f"{self.lo} <= " if self.lo is not None else ""
        high = f" <= {self.hi}" if self.hi is not None else ""
        return f"{low}{path.rsplit('.', 1)[-1]}{high}"

    def to_wire(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class Str(Spec):
    non_empty: bool = False

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if not check_str(path, value, limits) and self.non_empty:
            raise ProtocolError("bad_value", f"{path}: expected a non-empty string")


class Bool(Spec):
    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        check_bool(path, value)

    def to_wire(self, value: Any) -> bool:
        return bool(value)


@dataclass(frozen=True)
class Optional(Spec):
    """``None``, or a value ``spec`` allows."""

    spec: Spec

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if value is not None:
            self.spec.check(path, value, limits)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.spec.to_wire(value)


@dataclass(frozen=True)
class Choice(Spec):
    """One of ``values`` (strings); anything else is refused with reason ``code``."""

    values: Collection[str]
    code: str = "bad_value"

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if not isinstance(value, str):
            raise ProtocolError("bad_type", f"{path}: expected str, got {type_name(value)} ({short(value)})")
        if value not in self.values:
            raise ProtocolError(self.code, f"{path}: expected one of {sorted(self.values)}, got {short(value)}")


@dataclass(frozen=True)
class List(Spec):
    """A list of ``item`` values, at most ``limits.<max_len>`` of them and at least ``min_len``."""

    item: Spec
    max_len: str  # the DecodeLimits attribute bounding the length
    min_len: int = 0

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        check_list(path, value, getattr(limits, self.max_len))
        if len(value) < self.min_len:
            raise ProtocolError("bad_value", f"{path}: expected at least {self.min_len} entries, got {len(value)}")
        for i, item in enumerate(value):
            self.item.check(f"{path}[{i}]", item, limits)

    def to_wire(self, value: Any) -> list:
        return [self.item.to_wire(item) for item in value]

    def from_wire(self, path: str, raw: Any, arrays: Any) -> list:
        if not isinstance(raw, list):
            raise ProtocolError("bad_type", f"{path}: expected list, got {type_name(raw)}")
        return [self.item.from_wire(f"{path}[{i}]", item, arrays) for i, item in enumerate(raw)]


class Scalar(Spec):
    """A string or a number (engine facts)."""

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if isinstance(value, str):
            check_str(path, value, limits)
        elif not isinstance(value, (int, float, np.integer, np.floating)):
            raise ProtocolError("bad_type", f"{path}: expected str, int or float, got {type_name(value)} ({short(value)})")

    def to_wire(self, value: Any) -> Any:
        return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class Map(Spec):
    """A map from strings to ``value`` values."""

    value: Spec

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        for key, item in check_map(path, value, limits).items():
            self.value.check(f"{path}[{key!r}]", item, limits)

    def to_wire(self, value: Any) -> dict:
        return {str(key): self.value.to_wire(item) for key, item in value.items()}


@dataclass(frozen=True)
class Nested(Spec):
    """A :class:`Schema` object, sent as a msgpack map of its fields."""

    cls: type

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if not isinstance(value, self.cls):
            raise ProtocolError("bad_type", f"{path}: expected {self.cls.__name__}, got {type_name(value)}")
        check_fields(value, path, limits)

    def to_wire(self, value: Any) -> dict:
        return encode_fields(value, [])

    def from_wire(self, path: str, raw: Any, arrays: Any) -> Any:
        return decode_fields(self.cls, WireMap(raw, path), arrays, path)


class Shape(Spec):
    """A tensor shape: a tuple of at most ``limits.max_ndim`` sizes >= 0."""

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        if not isinstance(value, tuple):
            raise ProtocolError("bad_type", f"{path}: expected tuple/list of ints, got {type_name(value)}")
        if len(value) > limits.max_ndim:
            raise ProtocolError("bad_shape", f"{path}: rank {len(value)} > max_ndim {limits.max_ndim}")
        for d, dim in enumerate(value):
            check_int(f"{path}[{d}]", dim, lo=0)

    def coerce(self, path: str, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    def to_wire(self, value: Any) -> list[int]:
        return [int(d) for d in value]


@dataclass(frozen=True)
class Array(Spec):
    """A 1-D numpy array of ``dtype`` (a name of :data:`protocol.dtypes.ARRAY_DTYPES`), sent as one raw frame."""

    dtype: str

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        check_array(path, value, ARRAY_DTYPES[self.dtype])

    def coerce(self, path: str, value: Any) -> np.ndarray:
        """``value`` as an array of ``dtype`` (no copy if it is one), refusing to lose integer values."""
        target = np.dtype(self.dtype)
        arr = np.asarray(value)
        if arr.dtype == target:
            return arr
        if arr.size == 0 and arr.dtype.kind in "biuf":
            return arr.astype(target)
        if target.kind in "iu" and arr.dtype.kind in "biu":
            if arr.dtype.kind != "b":
                info = np.iinfo(target)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"{path}: values [{lo}, {hi}] do not fit in {target.name}")
            return arr.astype(target)
        if target.kind == "f" and arr.dtype.kind in "biuf":
            return arr.astype(target)
        raise TypeError(f"{path}: cannot convert an array of dtype {arr.dtype} to {target.name}")

    def encode(self, name: str, value: Any, body: dict, arrays: Arrays) -> None:
        arrays.append((name, self.dtype, value))

    def decode(self, name: str, path: str, body: WireMap, arrays: Any) -> np.ndarray:
        return arrays.take(name, self.dtype)


@dataclass(frozen=True)
class Ragged(Spec):
    """A list of ``item`` objects, each holding one variable-length array (its field ``array``).

    The arrays travel concatenated in frame ``<prefix>_tokens`` with their offsets in
    ``<prefix>_cu_seqlens`` (int32, ``0 = cu[0] < cu[1] < ... < cu[n]``: no array is empty); the
    other fields of each item are a msgpack map in the body.
    """

    item: type
    array: str
    prefix: str
    max_len: str
    min_len: int = 0

    @property
    def _list(self) -> List:
        return List(Nested(self.item), self.max_len, self.min_len)

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        self._list.check(path, value, limits)

    def encode(self, name: str, value: Any, body: dict, arrays: Arrays) -> None:
        dtype = wire_spec(self.item, self.array).dtype
        parts = [getattr(item, self.array).reshape(-1) for item in value]
        cu = np.zeros(len(parts) + 1, dtype=np.int32)
        cu[1:] = np.cumsum([part.size for part in parts])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
        body[name] = [encode_fields(item, [], skip=self.array) for item in value]
        arrays += [(f"{self.prefix}_tokens", dtype, flat.astype(dtype, copy=False)),
                   (f"{self.prefix}_cu_seqlens", "int32", cu)]

    def decode(self, name: str, path: str, body: WireMap, arrays: Any) -> list:
        raw = body[name]
        path = f"{path}.{name}"
        if not isinstance(raw, list):
            raise ProtocolError("bad_type", f"{path}: expected list, got {type_name(raw)}")
        flat = arrays.take(f"{self.prefix}_tokens", wire_spec(self.item, self.array).dtype)
        cu = arrays.take(f"{self.prefix}_cu_seqlens", "int32")
        where = path.rsplit(".", 1)[0] + f".{self.prefix}_cu_seqlens"
        if cu.size != len(raw) + 1:
            raise ProtocolError("length_mismatch", f"{where}: expected {len(raw) + 1} entries, got {cu.size}")
        cu64 = cu.astype(np.int64)
        if cu64[0] != 0 or cu64[-1] != flat.size or np.any(np.diff(cu64) <= 0):
            raise ProtocolError(
                "bad_cu_seqlens",
                f"{where}: expected 0 = cu[0] < cu[1] < ... < cu[-1] = {flat.size} (no empty {self.array}), "
                f"got {short(cu64.tolist())}",
            )
        return [decode_fields(self.item, WireMap(item, f"{path}[{i}]"), arrays, f"{path}[{i}]",
                              given={self.array: flat[cu64[i]: cu64[i + 1]]})
                for i, item in enumerate(raw)]


@dataclass(frozen=True)
class Buffers(Spec):
    """A list of raw byte buffers, each one ``uint8`` frame named ``frame``."""

    frame: str

    def check(self, path: str, value: Any, limits: DecodeLimits) -> None:
        total = 0
        for j, buffer in enumerate(check_list(path, value, limits.max_buckets)):
            size = check_buffer(f"{path}[{j}]", buffer)
            if size > limits.max_frame_bytes:
                raise ProtocolError("too_large", f"{path}[{j}]: {size} bytes > max_frame_bytes {limits.max_frame_bytes}")
            total += size
        if total > limits.max_total_bytes:
            raise ProtocolError("too_large", f"{path}: {total} bytes > max_total_bytes {limits.max_total_bytes}")

    def encode(self, name: str, value: Any, body: dict, arrays: Arrays) -> None:
        arrays += [(self.frame, "uint8", buffer) for buffer in value]

    def decode(self, name: str, path: str, body: WireMap, arrays: Any) -> list[memoryview]:
        return arrays.take_buffers(self.frame)


# =========================================================================== walking a class's fields


class Schema:
    """Base of dataclasses whose every field is declared with :func:`wire`.

    ``INVARIANTS(obj, path, limits)``, when a class sets it, checks the rules between its fields.
    """

    INVARIANTS: ClassVar[Callable[[Any, str, DecodeLimits], None] | None] = None

    def __post_init__(self) -> None:
        for name, spec in wire_fields(type(self)):
            value = getattr(self, name)
            coerced = spec.coerce(name, value)
            if coerced is not value:
                object.__setattr__(self, name, coerced)


@functools.cache
def wire_fields(cls: type) -> tuple[tuple[str, Spec], ...]:
    """``(name, spec)`` of every field of ``cls``, in declaration order."""
    out = []
    for f in fields(cls):
        if "wire" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no wire spec (declare it with protocol.schema.wire)")
        out.append((f.name, f.metadata["wire"]))
    return tuple(out)


def wire_spec(cls: type, name: str) -> Any:
    return dict(wire_fields(cls))[name]


def check_fields(obj: Any, path: str, limits: DecodeLimits) -> None:
    """Check every field of ``obj`` (named ``path``), then its class's invariants."""
    for name, spec in wire_fields(type(obj)):
        spec.check(f"{path}.{name}", getattr(obj, name), limits)
    if type(obj).INVARIANTS is not None:
        type(obj).INVARIANTS(obj, path, limits)


def encode_fields(obj: Any, arrays: Arrays, skip: str = "") -> dict:
    """The msgpack body of ``obj`` (field order); its raw frames are appended to ``arrays``."""
    body: dict = {}
    for name, spec in wire_fields(type(obj)):
        if name != skip:
            spec.encode(name, getattr(obj, name), body, arrays)
    return body


def decode_fields(cls: type, body: WireMap, arrays: Any, path: str, given: dict | None = None) -> Any:
    """Build a ``cls`` from its wire map (every field required, no other allowed) and frames.

    ``given``: values of fields that do not travel in ``body`` (a :class:`Ragged` item's array).
    The result is not checked yet (:func:`check_fields`).
    """
    given = given or {}
    values = {name: given[name] if name in given else spec.decode(name, path, body, arrays)
              for name, spec in wire_fields(cls)}
    body.done()
    return cls(**values)
