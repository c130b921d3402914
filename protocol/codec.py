"""Wire codec: messages <-> lists of frames (bytes-like), for ZeroMQ multipart messages.

Wire format (schema version 5)
------------------------------
Frame 0 is a msgpack map::

    {"schema_version": 5, "kind": str, "run_id": str, "producer_id": str,
     "seq": int, "weight_version": int,
     "body": {<scalar / small fields of the message>},
     "arrays": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]}

Versioning: a decoder accepts exactly its own ``SCHEMA_VERSION``, and every field is required
and checked, so any change to a message's fields or to their allowed values bumps the version
(5: work grants and packed batches say whether they are for evaluation, temperature 0 is greedy;
4: sampling specs carry min_new_tokens; 3: stop strings, and shutdowns say whether to rejoin;
2: packed batches carry the last weight version of each sequence).

Frame ``i >= 1`` holds the raw little-endian C-order bytes of ``arrays[i-1]``
(numpy arrays, WorkGrant prompt tokens concatenated into one array, and each
WeightUpdate bucket as a ``uint8`` array named ``"bucket"``).  Numbers never
travel as msgpack lists and nothing is ever pickled.

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

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack
import numpy as np

from .buffers import byte_view
from .dtypes import ARRAY_DTYPES as _WIRE_DTYPES, WEIGHT_DTYPES
from .errors import ProtocolError
from .messages import (
    FINISH_REASONS,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Envelope,
    Heartbeat,
    Hello,
    PackedBatch,
    PromptSpec,
    RolloutError,
    SamplingSpec,
    Shutdown,
    TensorMeta,
    WeightAck,
    WeightUpdate,
    WorkGrant,
)

__all__ = ["DecodeLimits", "DEFAULT_LIMITS", "LOGPROB_SLACK", "encode", "decode", "validate"]

#: Response-token behaviour log-probs may exceed 0 by at most this (float noise).
LOGPROB_SLACK = 1e-4

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds enforced by :func:`decode` (and by ``encode(validate=True)``).

    ``vocab_size``: when set, every token id must lie in ``[0, vocab_size)``
    (token ids are always required to be >= 0).  ``max_frame_bytes`` is also
    what the transport sets as ZMQ_MAXMSGSIZE (a per-frame limit in libzmq).
    """

    max_frames: int = 1024
    max_frame_bytes: int = 1 << 31
    max_total_bytes: int = 1 << 36
    max_header_bytes: int = 64 << 20
    max_tokens: int = 1 << 24
    max_sequences: int = 1 << 16
    max_string_len: int = 1 << 16
    max_map_len: int = 1 << 16
    max_tensors: int = 1 << 16
    max_ndim: int = 8
    vocab_size: int | None = None

    @property
    def max_array_len(self) -> int:
        """Longest msgpack array allowed in the header."""
        return max(self.max_sequences, self.max_tensors, self.max_frames, self.max_ndim) + 1


DEFAULT_LIMITS = DecodeLimits()


# =========================================================================== small helpers


def _tn(value: Any) -> str:
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(path: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ProtocolError("bad_type", f"{path}: expected int, got {_tn(value)} ({_short(value)})")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ProtocolError("bad_value", f"{path}: {value} does not fit in int64")
    if lo is not None and value < lo:
        raise ProtocolError("bad_value", f"{path}: expected >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ProtocolError("bad_value", f"{path}: expected <= {hi}, got {value}")
    return value


def _float(path: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError("bad_type", f"{path}: expected float, got {_tn(value)} ({_short(value)})")
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError("non_finite", f"{path}: expected a finite number, got {value}")
    return value


def _str(path: str, value: Any, limits: DecodeLimits) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_type", f"{path}: expected str, got {_tn(value)} ({_short(value)})")
    if len(value) > limits.max_string_len:
        raise ProtocolError("too_large", f"{path}: string of length {len(value)} > max_string_len {limits.max_string_len}")
    return value


def _opt_str(path: str, value: Any, limits: DecodeLimits) -> str | None:
    return None if value is None else _str(path, value, limits)


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError("bad_type", f"{path}: expected bool, got {_tn(value)} ({_short(value)})")
    return bool(value)


def _list(path: str, value: Any, max_len: int) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError("bad_type", f"{path}: expected list, got {_tn(value)} ({_short(value)})")
    if len(value) > max_len:
        raise ProtocolError("too_large", f"{path}: {len(value)} entries > limit {max_len}")
    return value


def _dict(path: str, value: Any, limits: DecodeLimits) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{path}: expected map, got {_tn(value)} ({_short(value)})")
    if len(value) > limits.max_map_len:
        raise ProtocolError("too_large", f"{path}: {len(value)} entries > max_map_len {limits.max_map_len}")
    for key in value:
        _str(f"{path} key", key, limits)
    return value


def _str_dict(path: str, value: Any, limits: DecodeLimits) -> dict[str, str]:
    for key, item in _dict(path, value, limits).items():
        _str(f"{path}[{key!r}]", item, limits)
    return value


def _array(path: str, value: Any, dtype: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ProtocolError("bad_type", f"{path}: expected numpy array, got {_tn(value)}")
    if value.dtype != _WIRE_DTYPES[dtype]:
        raise ProtocolError("bad_dtype", f"{path}: expected dtype {dtype}, got {value.dtype}")
    if value.ndim != 1:
        raise ProtocolError("bad_shape", f"{path}: expected a 1-D array, got shape {value.shape}")
    return value


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_token_ids(path: str, tokens: np.ndarray, limits: DecodeLimits) -> None:
    if tokens.size == 0:
        return
    low = tokens.min()
    if low < 0:
        i = _first(tokens < 0)
        raise ProtocolError("out_of_bounds", f"{path}[{i}]: token id {int(tokens[i])} < 0")
    if limits.vocab_size is not None and tokens.max() >= limits.vocab_size:
        i = _first(tokens >= limits.vocab_size)
        raise ProtocolError(
            "out_of_bounds", f"{path}[{i}]: token id {int(tokens[i])} >= vocab_size {limits.vocab_size}"
        )


def _buffer_len(path: str, value: Any) -> int:
    try:
        view = memoryview(value)
    except TypeError:
        raise ProtocolError("bad_type", f"{path}: expected a bytes-like object, got {_tn(value)}") from None
    if not view.c_contiguous:
        raise ProtocolError("bad_type", f"{path}: buffer is not C-contiguous")
    return view.nbytes


# =========================================================================== validation (shared by encode and decode)


def _validate_hello(msg: Hello, limits: DecodeLimits) -> None:
    info = _dict("hello.engine_info", msg.engine_info, limits)
    for key, value in info.items():
        path = f"hello.engine_info[{key!r}]"
        if isinstance(value, str):
            _str(path, value, limits)
        elif not isinstance(value, (int, float, np.integer, np.floating)):
            raise ProtocolError("bad_type", f"{path}: expected str, int or float, got {_tn(value)} ({_short(value)})")


def _validate_sampling(path: str, sp: Any, limits: DecodeLimits) -> None:
    if not isinstance(sp, SamplingSpec):
        raise ProtocolError("bad_type", f"{path}: expected SamplingSpec, got {_tn(sp)}")
    temperature = _float(f"{path}.temperature", sp.temperature)
    if temperature < 0:
        raise ProtocolError("bad_value", f"{path}.temperature: expected >= 0 (0: greedy), got {temperature}")
    top_p = _float(f"{path}.top_p", sp.top_p)
    if not 0 < top_p <= 1:
        raise ProtocolError("bad_value", f"{path}.top_p: expected 0 < top_p <= 1, got {top_p}")
    _int(f"{path}.top_k", sp.top_k, lo=-1)
    max_new_tokens = _int(f"{path}.max_new_tokens", sp.max_new_tokens, lo=1)
    _int(f"{path}.min_new_tokens", sp.min_new_tokens, lo=0, hi=max_new_tokens)
    stops = _list(f"{path}.stop_token_ids", sp.stop_token_ids, limits.max_array_len)
    for i, tok in enumerate(stops):
        tok = _int(f"{path}.stop_token_ids[{i}]", tok)
        if tok < 0 or (limits.vocab_size is not None and tok >= limits.vocab_size):
            raise ProtocolError(
                "out_of_bounds", f"{path}.stop_token_ids[{i}]: token id {tok} outside [0, {limits.vocab_size})"
            )
    if sp.seed is not None:
        _int(f"{path}.seed", sp.seed)
    for i, text in enumerate(_list(f"{path}.stop_strings", sp.stop_strings, limits.max_array_len)):
        if not _str(f"{path}.stop_strings[{i}]", text, limits):
            raise ProtocolError("bad_value", f"{path}.stop_strings[{i}]: expected a non-empty string")


def _validate_work_grant(msg: WorkGrant, limits: DecodeLimits) -> None:
    p = "work_grant"
    _int(f"{p}.grant_id", msg.grant_id, lo=0)
    _int(f"{p}.step", msg.step, lo=0)
    _int(f"{p}.min_weight_version", msg.min_weight_version, lo=0)
    _int(f"{p}.n_samples", msg.n_samples, lo=1)
    _bool(f"{p}.evaluation", msg.evaluation)
    _validate_sampling(f"{p}.sampling", msg.sampling, limits)
    prompts = _list(f"{p}.prompts", msg.prompts, limits.max_sequences)
    if not prompts:
        raise ProtocolError("bad_value", f"{p}.prompts: expected at least one prompt, got 0")
    total = 0
    for i, prompt in enumerate(prompts):
        path = f"{p}.prompts[{i}]"
        if not isinstance(prompt, PromptSpec):
            raise ProtocolError("bad_type", f"{path}: expected PromptSpec, got {_tn(prompt)}")
        _int(f"{path}.prompt_id", prompt.prompt_id)
        _opt_str(f"{path}.label", prompt.label, limits)
        tokens = _array(f"{path}.token_ids", prompt.token_ids, "int32")
        if tokens.size < 1:
            raise ProtocolError("bad_prompt_len", f"{path}.token_ids: prompt is empty")
        total += tokens.size
        if total > limits.max_tokens:
            raise ProtocolError("too_large", f"{p}.prompts: more than max_tokens {limits.max_tokens} prompt tokens")
        _check_token_ids(f"{path}.token_ids", tokens, limits)


def _validate_packed_batch(msg: PackedBatch, limits: DecodeLimits) -> None:
    p = "packed_batch"
    _int(f"{p}.grant_id", msg.grant_id, lo=0)
    _int(f"{p}.step", msg.step, lo=0)
    arrays = {name: _array(f"{p}.{name}", getattr(msg, name), dt) for name, dt in PackedBatch.ARRAY_DTYPES.items()}
    tokens, cu = arrays["tokens"], arrays["cu_seqlens"]
    n_tok = tokens.size
    if n_tok > limits.max_tokens:
        raise ProtocolError("too_large", f"{p}.tokens: {n_tok} tokens > max_tokens {limits.max_tokens}")
    n_seq = cu.size - 1
    if n_seq < 1:
        raise ProtocolError("bad_shape", f"{p}.cu_seqlens: expected B+1 >= 2 entries, got {cu.size}")
    if n_seq > limits.max_sequences:
        raise ProtocolError("too_large", f"{p}: {n_seq} sequences > max_sequences {limits.max_sequences}")
    for name in ("prompt_lens", "prompt_ids", "sample_indices", "weight_versions", "last_weight_versions"):
        if arrays[name].size != n_seq:
            raise ProtocolError(
                "length_mismatch", f"{p}.{name}: expected B={n_seq} entries (from cu_seqlens), got {arrays[name].size}"
            )
    for name in ("loss_mask", "behaviour_logprobs"):
        if arrays[name].size != n_tok:
            raise ProtocolError("length_mismatch", f"{p}.{name}: expected T={n_tok} entries, got {arrays[name].size}")
    for name in ("finish_reasons", "labels"):
        n = len(_list(f"{p}.{name}", getattr(msg, name), limits.max_sequences))
        if n != n_seq:
            raise ProtocolError("length_mismatch", f"{p}.{name}: expected B={n_seq} entries, got {n}")
    for b, reason in enumerate(msg.finish_reasons):
        if not isinstance(reason, str):
            raise ProtocolError("bad_type", f"{p}.finish_reasons[{b}]: expected str, got {_tn(reason)}")
        if reason not in FINISH_REASONS:
            raise ProtocolError(
                "bad_value", f"{p}.finish_reasons[{b}]: expected one of {sorted(FINISH_REASONS)}, got {_short(reason)}"
            )
    for b, label in enumerate(msg.labels):
        _opt_str(f"{p}.labels[{b}]", label, limits)
    seconds = _float(f"{p}.gen_seconds", msg.gen_seconds)
    if seconds < 0:
        raise ProtocolError("bad_value", f"{p}.gen_seconds: expected >= 0, got {seconds}")
    _bool(f"{p}.evaluation", msg.evaluation)

    # cu_seqlens: 0 = cu[0] < cu[1] < ... < cu[B] = T
    cu64 = cu.astype(np.int64)
    if cu64[0] != 0:
        raise ProtocolError("bad_cu_seqlens", f"{p}.cu_seqlens[0]: expected 0, got {int(cu64[0])}")
    seq_lens = np.diff(cu64)
    if np.any(seq_lens <= 0):
        b = _first(seq_lens <= 0)
        raise ProtocolError(
            "bad_cu_seqlens",
            f"{p}.cu_seqlens: not strictly increasing at index {b + 1} ({int(cu64[b])} -> {int(cu64[b + 1])})",
        )
    if cu64[-1] != n_tok:
        raise ProtocolError("bad_cu_seqlens", f"{p}.cu_seqlens[-1]: expected T={n_tok}, got {int(cu64[-1])}")

    prompt_lens = arrays["prompt_lens"].astype(np.int64)
    bad = (prompt_lens < 1) | (prompt_lens >= seq_lens)
    if np.any(bad):
        b = _first(bad)
        raise ProtocolError(
            "bad_prompt_len",
            f"{p}.prompt_lens[{b}]: expected 1 <= prompt_len < seq_len={int(seq_lens[b])}, got {int(prompt_lens[b])}",
        )
    _check_token_ids(f"{p}.tokens", tokens, limits)
    for name in ("sample_indices", "weight_versions"):
        if np.any(arrays[name] < 0):
            b = _first(arrays[name] < 0)
            raise ProtocolError("bad_value", f"{p}.{name}[{b}]: expected >= 0, got {int(arrays[name][b])}")
    backwards = arrays["last_weight_versions"] < arrays["weight_versions"]
    if np.any(backwards):
        b = _first(backwards)
        raise ProtocolError("bad_value", f"{p}.last_weight_versions[{b}]: {int(arrays['last_weight_versions'][b])} "
                                         f"< weight_versions[{b}] {int(arrays['weight_versions'][b])}")

    # prompt-token mask without per-token index arithmetic: +1 at each sequence start,
    # -1 at each prompt end (all positions distinct since 1 <= prompt_len < seq_len).
    marks = np.zeros(n_tok + 1, dtype=np.int8)
    marks[cu64[:-1]] = 1
    marks[cu64[:-1] + prompt_lens] = -1
    is_prompt = np.cumsum(marks[:-1], dtype=np.int8).view(np.bool_)

    def where(i: int) -> str:
        b = int(np.searchsorted(cu64, i, side="right")) - 1
        return f"token {i} (sequence {b}, position {i - int(cu64[b])}, prompt_len {int(prompt_lens[b])})"

    mask = arrays["loss_mask"]
    if np.any(mask > 1):
        i = _first(mask > 1)
        raise ProtocolError("bad_loss_mask", f"{p}.loss_mask[{i}]: expected 0 or 1, got {int(mask[i])}")
    on_prompt = (mask != 0) & is_prompt
    if np.any(on_prompt):
        raise ProtocolError("bad_loss_mask", f"{p}.loss_mask: 1 on prompt {where(_first(on_prompt))}")

    logprobs = arrays["behaviour_logprobs"]
    finite = np.isfinite(logprobs)
    if not np.all(finite):
        i = _first(~finite)
        raise ProtocolError("non_finite", f"{p}.behaviour_logprobs: {float(logprobs[i])} at {where(i)}")
    bad = (logprobs != 0) & is_prompt
    if np.any(bad):
        i = _first(bad)
        raise ProtocolError(
            "bad_logprobs", f"{p}.behaviour_logprobs: expected 0 on prompt tokens, got {float(logprobs[i])} at {where(i)}"
        )
    bad = (logprobs > LOGPROB_SLACK) & ~is_prompt
    if np.any(bad):
        i = _first(bad)
        raise ProtocolError(
            "bad_logprobs", f"{p}.behaviour_logprobs: expected <= 0 on response tokens, got {float(logprobs[i])} at {where(i)}"
        )


def _validate_weight_update(msg: WeightUpdate, limits: DecodeLimits) -> None:
    p = "weight_update"
    _int(f"{p}.version", msg.version, lo=0)
    _str_dict(f"{p}.fingerprint", msg.fingerprint, limits)
    buckets = _list(f"{p}.buckets", msg.buckets, limits.max_frames - 1)
    sizes = []
    for j, bucket in enumerate(buckets):
        size = _buffer_len(f"{p}.buckets[{j}]", bucket)
        if size > limits.max_frame_bytes:
            raise ProtocolError("too_large", f"{p}.buckets[{j}]: {size} bytes > max_frame_bytes {limits.max_frame_bytes}")
        sizes.append(size)
    if sum(sizes) > limits.max_total_bytes:
        raise ProtocolError("too_large", f"{p}.buckets: {sum(sizes)} bytes > max_total_bytes {limits.max_total_bytes}")
    tensors = _list(f"{p}.tensors", msg.tensors, limits.max_tensors)
    names: set[str] = set()
    spans: list[list[tuple[int, int, int]]] = [[] for _ in sizes]
    for i, meta in enumerate(tensors):
        path = f"{p}.tensors[{i}]"
        if not isinstance(meta, TensorMeta):
            raise ProtocolError("bad_type", f"{path}: expected TensorMeta, got {_tn(meta)}")
        name = _str(f"{path}.name", meta.name, limits)
        path = f"{p}.tensors[{i}] ({name!r})"
        if name in names:
            raise ProtocolError("bad_value", f"{path}: duplicate tensor name")
        names.add(name)
        dtype = meta.dtype
        if not isinstance(dtype, str) or dtype not in WEIGHT_DTYPES:
            raise ProtocolError("bad_dtype", f"{path}.dtype: expected one of {sorted(WEIGHT_DTYPES)}, got {_short(dtype)}")
        shape = meta.shape
        if not isinstance(shape, tuple):
            raise ProtocolError("bad_type", f"{path}.shape: expected tuple/list of ints, got {_tn(shape)}")
        if len(shape) > limits.max_ndim:
            raise ProtocolError("bad_shape", f"{path}.shape: rank {len(shape)} > max_ndim {limits.max_ndim}")
        numel = 1
        for d, dim in enumerate(shape):
            numel *= _int(f"{path}.shape[{d}]", dim, lo=0)
        bucket = _int(f"{path}.bucket", meta.bucket)
        if not 0 <= bucket < len(sizes):
            raise ProtocolError("out_of_bounds", f"{path}.bucket: {bucket} not in [0, {len(sizes)})")
        offset = _int(f"{path}.offset", meta.offset, lo=0)
        nbytes = _int(f"{path}.nbytes", meta.nbytes, lo=0)
        expected = numel * WEIGHT_DTYPES[dtype]
        if nbytes != expected:
            raise ProtocolError(
                "length_mismatch", f"{path}.nbytes: {dtype} shape {tuple(shape)} needs {expected} bytes, got {nbytes}"
            )
        if offset + nbytes > sizes[bucket]:
            raise ProtocolError(
                "out_of_bounds",
                f"{path}: bytes [{offset}, {offset + nbytes}) outside bucket {bucket} of {sizes[bucket]} bytes",
            )
        if nbytes:
            spans[bucket].append((offset, offset + nbytes, i))
    for bucket, bucket_spans in enumerate(spans):
        bucket_spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(bucket_spans, bucket_spans[1:]):
            if start_b < end_a:
                raise ProtocolError(
                    "overlap", f"{p}.tensors[{a}] and tensors[{b}] overlap in bucket {bucket} (at byte {start_b})"
                )


def _validate_weight_ack(msg: WeightAck, limits: DecodeLimits) -> None:
    _int("weight_ack.version", msg.version, lo=0)
    _str_dict("weight_ack.fingerprint", msg.fingerprint, limits)
    seconds = _float("weight_ack.apply_seconds", msg.apply_seconds)
    if seconds < 0:
        raise ProtocolError("bad_value", f"weight_ack.apply_seconds: expected >= 0, got {seconds}")


def _validate_heartbeat(msg: Heartbeat, limits: DecodeLimits) -> None:
    _str("heartbeat.state", msg.state, limits)


def _validate_shutdown(msg: Shutdown, limits: DecodeLimits) -> None:
    _str("shutdown.reason", msg.reason, limits)
    _bool("shutdown.rejoin", msg.rejoin)


def _validate_rollout_error(msg: RolloutError, limits: DecodeLimits) -> None:
    _str("rollout_error.message", msg.message, limits)
    _bool("rollout_error.fatal", msg.fatal)


_VALIDATORS: dict[type, Callable[[Any, DecodeLimits], None]] = {
    Hello: _validate_hello,
    WorkGrant: _validate_work_grant,
    PackedBatch: _validate_packed_batch,
    WeightUpdate: _validate_weight_update,
    WeightAck: _validate_weight_ack,
    Heartbeat: _validate_heartbeat,
    Shutdown: _validate_shutdown,
    RolloutError: _validate_rollout_error,
}


def validate(msg: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Check every type, range and invariant of a message; raise :class:`ProtocolError` if any fails."""
    validator = _VALIDATORS.get(type(msg))
    if validator is None:
        raise ProtocolError("unknown_kind", f"not a protocol message: {_tn(msg)}")
    validator(msg, limits)


# =========================================================================== encode

_Arrays = list[tuple[str, str, Any]]  # (name, wire dtype, ndarray or bytes-like)


def _enc_hello(msg: Hello) -> tuple[dict, _Arrays]:
    info = {str(k): (v if isinstance(v, str) else v.item() if isinstance(v, np.generic) else v) for k, v in msg.engine_info.items()}
    return {"engine_info": info}, []


def _enc_work_grant(msg: WorkGrant) -> tuple[dict, _Arrays]:
    sp = msg.sampling
    sampling = {
        "temperature": float(sp.temperature),
        "top_p": float(sp.top_p),
        "top_k": int(sp.top_k),
        "max_new_tokens": int(sp.max_new_tokens),
        "min_new_tokens": int(sp.min_new_tokens),
        "stop_token_ids": [int(t) for t in sp.stop_token_ids],
        "seed": None if sp.seed is None else int(sp.seed),
        "stop_strings": [str(s) for s in sp.stop_strings],
    }
    prompts = [{"prompt_id": int(pr.prompt_id), "label": pr.label} for pr in msg.prompts]
    lens = np.array([pr.token_ids.size for pr in msg.prompts], dtype=np.int64)
    cu = np.zeros(len(msg.prompts) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    tokens = np.concatenate([pr.token_ids.reshape(-1) for pr in msg.prompts]) if msg.prompts else np.zeros(0, np.int32)
    body = {
        "grant_id": int(msg.grant_id),
        "step": int(msg.step),
        "min_weight_version": int(msg.min_weight_version),
        "n_samples": int(msg.n_samples),
        "sampling": sampling,
        "prompts": prompts,
        "evaluation": bool(msg.evaluation),
    }
    return body, [("prompt_tokens", "int32", tokens.astype(np.int32, copy=False)), ("prompt_cu_seqlens", "int32", cu)]


def _enc_packed_batch(msg: PackedBatch) -> tuple[dict, _Arrays]:
    body = {
        "grant_id": int(msg.grant_id),
        "step": int(msg.step),
        "finish_reasons": list(msg.finish_reasons),
        "labels": list(msg.labels),
        "gen_seconds": float(msg.gen_seconds),
        "evaluation": bool(msg.evaluation),
    }
    return body, [(name, dt, getattr(msg, name)) for name, dt in PackedBatch.ARRAY_DTYPES.items()]


def _enc_weight_update(msg: WeightUpdate) -> tuple[dict, _Arrays]:
    tensors = [
        {
            "name": m.name,
            "dtype": m.dtype,
            "shape": [int(d) for d in m.shape],
            "bucket": int(m.bucket),
            "offset": int(m.offset),
            "nbytes": int(m.nbytes),
        }
        for m in msg.tensors
    ]
    body = {"version": int(msg.version), "tensors": tensors, "fingerprint": dict(msg.fingerprint)}
    return body, [("bucket", "uint8", b) for b in msg.buckets]


def _enc_weight_ack(msg: WeightAck) -> tuple[dict, _Arrays]:
    body = {"version": int(msg.version), "fingerprint": dict(msg.fingerprint), "apply_seconds": float(msg.apply_seconds)}
    return body, []


_ENCODERS: dict[type, Callable[[Any], tuple[dict, _Arrays]]] = {
    Hello: _enc_hello,
    WorkGrant: _enc_work_grant,
    PackedBatch: _enc_packed_batch,
    WeightUpdate: _enc_weight_update,
    WeightAck: _enc_weight_ack,
    Heartbeat: lambda m: ({"state": m.state}, []),
    Shutdown: lambda m: ({"reason": m.reason, "rejoin": bool(m.rejoin)}, []),
    RolloutError: lambda m: ({"message": m.message, "fatal": bool(m.fatal)}, []),
}


def _frame_of(value: Any, dtype: str) -> tuple[list[int], memoryview]:
    """Zero-copy 1-D byte view of an array / buffer plus its shape (copies only if not contiguous LE)."""
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value, dtype=_WIRE_DTYPES[dtype])
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
    kind = getattr(type(msg), "KIND", "")
    if type(msg) not in _ENCODERS:
        raise ProtocolError("unknown_kind", f"not a protocol message: {_tn(msg)}")
    _str("header.run_id", run_id, limits)
    _str("header.producer_id", producer_id, limits)
    _int("header.seq", seq, lo=0)
    _int("header.weight_version", weight_version, lo=-1)  # -1: the sender holds no published weights yet
    if validate:
        _VALIDATORS[type(msg)](msg, limits)
    body, arrays = _ENCODERS[type(msg)](msg)
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


class _Fields:
    """Reads required fields of a wire map, remembering which were used."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError("bad_type", f"{path}: expected map, got {_tn(value)} ({_short(value)})")
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
            raise ProtocolError("unknown_field", f"{self.path}: unexpected field(s) {_short(extra)}")


class _ArrayFrames:
    """Array descriptors + frames; hands out read-only numpy views in declared order."""

    def __init__(self, kind: str, descriptors: Any, frames: list[memoryview], limits: DecodeLimits) -> None:
        descriptors = _list(f"{kind}.arrays", descriptors, limits.max_frames)
        if len(descriptors) != len(frames):
            raise ProtocolError(
                "frame_count",
                f"{kind}: header declares {len(descriptors)} array frame(s) but {len(frames)} followed the header",
            )
        self.kind = kind
        self.items: list[tuple[str, str, list[int], memoryview]] = []
        for i, raw in enumerate(descriptors):
            path = f"{kind}.arrays[{i}]"
            desc = _Fields(raw, path)
            name = _str(f"{path}.name", desc["name"], limits)
            dtype = desc["dtype"]
            if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
                raise ProtocolError("bad_dtype", f"{path} ({name!r}).dtype: expected one of {sorted(_WIRE_DTYPES)}, got {_short(dtype)}")
            shape = _list(f"{path} ({name!r}).shape", desc["shape"], limits.max_ndim)
            desc.done()
            nbytes = _WIRE_DTYPES[dtype].itemsize
            for d, dim in enumerate(shape):
                nbytes *= _int(f"{path} ({name!r}).shape[{d}]", dim, lo=0)
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
        return np.frombuffer(view, dtype=_WIRE_DTYPES[dtype])  # read-only: view is read-only

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


def _dec_hello(f: _Fields, arrays: _ArrayFrames) -> Hello:
    return Hello(engine_info=f["engine_info"])


def _dec_work_grant(f: _Fields, arrays: _ArrayFrames) -> WorkGrant:
    sf = _Fields(f["sampling"], "work_grant.sampling")
    sampling = SamplingSpec(
        temperature=sf["temperature"],
        top_p=sf["top_p"],
        top_k=sf["top_k"],
        max_new_tokens=sf["max_new_tokens"],
        min_new_tokens=sf["min_new_tokens"],
        stop_token_ids=sf["stop_token_ids"],
        seed=sf["seed"],
        stop_strings=sf["stop_strings"],
    )
    sf.done()
    raw_prompts = f["prompts"]
    if not isinstance(raw_prompts, list):
        raise ProtocolError("bad_type", f"work_grant.prompts: expected list, got {_tn(raw_prompts)}")
    tokens = arrays.take("prompt_tokens", "int32")
    cu = arrays.take("prompt_cu_seqlens", "int32")
    if cu.size != len(raw_prompts) + 1:
        raise ProtocolError(
            "length_mismatch", f"work_grant.prompt_cu_seqlens: expected {len(raw_prompts) + 1} entries, got {cu.size}"
        )
    cu64 = cu.astype(np.int64)
    if cu64[0] != 0 or cu64[-1] != tokens.size or np.any(np.diff(cu64) <= 0):
        raise ProtocolError(
            "bad_cu_seqlens",
            f"work_grant.prompt_cu_seqlens: expected 0 = cu[0] < cu[1] < ... < cu[-1] = {tokens.size} (non-empty prompts), got {_short(cu64.tolist())}",
        )
    prompts = []
    for i, raw in enumerate(raw_prompts):
        pf = _Fields(raw, f"work_grant.prompts[{i}]")
        prompts.append(PromptSpec(prompt_id=pf["prompt_id"], token_ids=tokens[cu64[i] : cu64[i + 1]], label=pf["label"]))
        pf.done()
    return WorkGrant(
        grant_id=f["grant_id"],
        step=f["step"],
        min_weight_version=f["min_weight_version"],
        n_samples=f["n_samples"],
        sampling=sampling,
        prompts=prompts,
        evaluation=f["evaluation"],
    )


def _dec_packed_batch(f: _Fields, arrays: _ArrayFrames) -> PackedBatch:
    kwargs = {name: arrays.take(name, dt) for name, dt in PackedBatch.ARRAY_DTYPES.items()}
    for name in ("grant_id", "step", "finish_reasons", "labels", "gen_seconds", "evaluation"):
        kwargs[name] = f[name]
    return PackedBatch(**kwargs)


def _dec_weight_update(f: _Fields, arrays: _ArrayFrames) -> WeightUpdate:
    raw_tensors = f["tensors"]
    if not isinstance(raw_tensors, list):
        raise ProtocolError("bad_type", f"weight_update.tensors: expected list, got {_tn(raw_tensors)}")
    tensors = []
    for i, raw in enumerate(raw_tensors):
        tf = _Fields(raw, f"weight_update.tensors[{i}]")
        tensors.append(TensorMeta(tf["name"], tf["dtype"], tf["shape"], tf["bucket"], tf["offset"], tf["nbytes"]))
        tf.done()
    return WeightUpdate(
        version=f["version"], tensors=tensors, buckets=arrays.take_buffers("bucket"), fingerprint=f["fingerprint"]
    )


_DECODERS: dict[str, Callable[[_Fields, _ArrayFrames], Any]] = {
    "hello": _dec_hello,
    "work_grant": _dec_work_grant,
    "packed_batch": _dec_packed_batch,
    "weight_update": _dec_weight_update,
    "weight_ack": lambda f, a: WeightAck(version=f["version"], fingerprint=f["fingerprint"], apply_seconds=f["apply_seconds"]),
    "heartbeat": lambda f, a: Heartbeat(state=f["state"]),
    "shutdown": lambda f, a: Shutdown(reason=f["reason"], rejoin=f["rejoin"]),
    "rollout_error": lambda f, a: RolloutError(message=f["message"], fatal=f["fatal"]),
}
assert set(_DECODERS) == set(MESSAGE_TYPES)


def _frame_views(frames: Any, limits: DecodeLimits) -> list[memoryview]:
    if not isinstance(frames, (list, tuple)):
        raise ProtocolError("bad_type", f"frames: expected a list of bytes-like frames, got {_tn(frames)}")
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
            raise ProtocolError("bad_type", f"frame {i}: expected a C-contiguous bytes-like object, got {_tn(frame)} ({exc})") from None
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
        raise ProtocolError("bad_msgpack", f"frame 0 (header): not valid msgpack: {_tn(exc)}: {exc}") from None


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
    header = _Fields(_unpack_header(views[0], limits), "header")
    version = header["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise ProtocolError("schema_version", f"header.schema_version: expected {SCHEMA_VERSION}, got {_short(version)}")
    kind = header["kind"]
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise ProtocolError("unknown_kind", f"header.kind: expected one of {sorted(_DECODERS)}, got {_short(kind)}")
    run_id = _str("header.run_id", header["run_id"], limits)
    if expected_run_id is not None and run_id != expected_run_id:
        raise ProtocolError("run_id", f"header.run_id: expected {expected_run_id!r}, got {run_id!r}")
    producer_id = _str("header.producer_id", header["producer_id"], limits)
    seq = _int("header.seq", header["seq"], lo=0)
    weight_version = _int("header.weight_version", header["weight_version"], lo=-1)
    body = _Fields(header["body"], f"{kind}.body")
    arrays = _ArrayFrames(kind, header["arrays"], views[1:], limits)
    header.done()
    msg = _DECODERS[kind](body, arrays)
    body.done()
    arrays.done()
    _VALIDATORS[type(msg)](msg, limits)
    return Envelope(
        schema_version=version,
        kind=kind,
        run_id=run_id,
        producer_id=producer_id,
        seq=seq,
        weight_version=weight_version,
        body=msg,
    )
