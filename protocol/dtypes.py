"""Dtype names shared by learner and rollout: weight tensors on the wire, message arrays, model dtypes.

Names are torch's (``torch.<name>`` is the tensor dtype); numpy, which has no bfloat16, holds a
bfloat16 tensor's raw 2-byte pattern as ``uint16``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["WEIGHT_DTYPES", "numpy_storage_dtype", "ARRAY_DTYPES", "FLOAT_DTYPES", "float_dtype_name"]

#: Allowed weight tensor dtypes -> item size in bytes.
WEIGHT_DTYPES: Mapping[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}

# numpy dtype used to *store* / view each weight dtype (bfloat16 -> its uint16 bit pattern).
_STORAGE_DTYPES: Mapping[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}

#: Dtypes of the arrays messages carry (one raw frame each) -> their little-endian numpy dtype.
ARRAY_DTYPES: Mapping[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("<u1"),
    "float32": np.dtype("<f4"),
}

#: Floating dtypes a model (learner parameters, vLLM engine) can run in.
FLOAT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_FLOAT_ALIASES: Mapping[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """Little-endian numpy dtype holding a weight dtype (``bfloat16`` -> ``uint16`` bit pattern)."""
    try:
        return _STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported weight dtype {dtype!r}; allowed: {sorted(WEIGHT_DTYPES)}") from None


def float_dtype_name(dtype: str) -> str:
    """One of :data:`FLOAT_DTYPES` from it or its short name (fp32, bf16, fp16; any case)."""
    name = _FLOAT_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted([*FLOAT_DTYPES, *_FLOAT_ALIASES])}")
    return name
