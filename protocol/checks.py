"""Type and range checks of single values, raising :class:`ProtocolError` that say what and where.

``path`` names the value in messages (``work_grant.sampling.top_p``); every check returns the
value it accepted (converted to its plain Python type where one exists).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import ProtocolError
from .limits import DecodeLimits

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def type_name(value: Any) -> str:
    return type(value).__name__


def short(value: Any) -> str:
    """``repr`` cut to 60 characters: hostile input must not blow up an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first(mask: np.ndarray) -> int:
    """Index of the first true entry of a boolean mask that has one."""
    return int(np.argmax(mask))


def check_int(path: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ProtocolError("bad_type", f"{path}: expected int, got {type_name(value)} ({short(value)})")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ProtocolError("bad_value", f"{path}: {value} does not fit in int64")
    if lo is not None and value < lo:
        raise ProtocolError("bad_value", f"{path}: expected >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ProtocolError("bad_value", f"{path}: expected <= {hi}, got {value}")
    return value


def check_float(path: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError("bad_type", f"{path}: expected float, got {type_name(value)} ({short(value)})")
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError("non_finite", f"{path}: expected a finite number, got {value}")
    return value


def check_str(path: str, value: Any, limits: DecodeLimits) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_type", f"{path}: expected str, got {type_name(value)} ({short(value)})")
    if len(value) > limits.max_string_len:
        raise ProtocolError("too_large", f"{path}: string of length {len(value)} > max_string_len {limits.max_string_len}")
    return value


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError("bad_type", f"{path}: expected bool, got {type_name(value)} ({short(value)})")
    return bool(value)


def check_list(path: str, value: Any, max_len: int) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError("bad_type", f"{path}: expected list, got {type_name(value)} ({short(value)})")
    if len(value) > max_len:
        raise ProtocolError("too_large", f"{path}: {len(value)} entries > limit {max_len}")
    return value


def check_map(path: str, value: Any, limits: DecodeLimits) -> dict:
    """A map with string keys."""
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{path}: expected map, got {type_name(value)} ({short(value)})")
    if len(value) > limits.max_map_len:
        raise ProtocolError("too_large", f"{path}: {len(value)} entries > max_map_len {limits.max_map_len}")
    for key in value:
        check_str(f"{path} key", key, limits)
    return value


def check_array(path: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A 1-D numpy array of exactly ``dtype``."""
    if not isinstance(value, np.ndarray):
        raise ProtocolError("bad_type", f"{path}: expected numpy array, got {type_name(value)}")
    if value.dtype != dtype:
        raise ProtocolError("bad_dtype", f"{path}: expected dtype {dtype.name}, got {value.dtype}")
    if value.ndim != 1:
        raise ProtocolError("bad_shape", f"{path}: expected a 1-D array, got shape {value.shape}")
    return value


def check_token_id(path: str, token: int, limits: DecodeLimits) -> None:
    if token < 0 or (limits.vocab_size is not None and token >= limits.vocab_size):
        raise ProtocolError("out_of_bounds", f"{path}: token id {token} outside [0, {limits.vocab_size})")


def check_token_ids(path: str, tokens: np.ndarray, limits: DecodeLimits) -> None:
    """Every token id of an integer array is >= 0 (and < ``limits.vocab_size`` when set)."""
    if tokens.size == 0:
        return
    if tokens.min() < 0:
        i = first(tokens < 0)
        raise ProtocolError("out_of_bounds", f"{path}[{i}]: token id {int(tokens[i])} < 0")
    if limits.vocab_size is not None and tokens.max() >= limits.vocab_size:
        i = first(tokens >= limits.vocab_size)
        raise ProtocolError(
            "out_of_bounds", f"{path}[{i}]: token id {int(tokens[i])} >= vocab_size {limits.vocab_size}"
        )


def check_buffer(path: str, value: Any) -> int:
    """A C-contiguous bytes-like object; returns its length in bytes."""
    try:
        view = memoryview(value)
    except TypeError:
        raise ProtocolError("bad_type", f"{path}: expected a bytes-like object, got {type_name(value)}") from None
    if not view.c_contiguous:
        raise ProtocolError("bad_type", f"{path}: buffer is not C-contiguous")
    return view.nbytes
