"""Rules between the fields of a message: lengths that agree, offsets, masks, log-probs.

Each function is a message class's ``INVARIANTS`` (see :mod:`protocol.schema`): it runs after every
field passed its own type and range checks, so the arrays here have their dtype and are 1-D.
``path`` names the message in errors (``packed_batch``, ``work_grant.sampling``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .checks import check_token_ids, first
from .dtypes import WEIGHT_DTYPES
from .errors import ProtocolError
from .limits import DecodeLimits

__all__ = ["LOGPROB_SLACK", "sampling_spec", "prompt_spec", "work_grant", "packed_batch", "weight_update",
           "weight_header", "weight_bucket", "relay_target", "weight_group_invite"]

#: Response-token behaviour log-probs may exceed 0 by at most this (float noise).
LOGPROB_SLACK = 1e-4


def sampling_spec(sp: Any, path: str, limits: DecodeLimits) -> None:
    if sp.min_new_tokens > sp.max_new_tokens:
        raise ProtocolError("bad_value", f"{path}.min_new_tokens: expected <= max_new_tokens {sp.max_new_tokens}, "
                                         f"got {sp.min_new_tokens}")


def prompt_spec(prompt: Any, path: str, limits: DecodeLimits) -> None:
    if prompt.token_ids.size < 1:
        raise ProtocolError("bad_prompt_len", f"{path}.token_ids: prompt is empty")
    check_token_ids(f"{path}.token_ids", prompt.token_ids, limits)


def work_grant(grant: Any, path: str, limits: DecodeLimits) -> None:
    if sum(prompt.token_ids.size for prompt in grant.prompts) > limits.max_tokens:
        raise ProtocolError("too_large", f"{path}.prompts: more than max_tokens {limits.max_tokens} prompt tokens")


# --------------------------------------------------------------------------- packed batches


def _check_sizes(batch: Any, path: str, limits: DecodeLimits) -> tuple[int, int]:
    """T tokens and B sequences, every per-token and per-sequence field of matching length."""
    n_tok = batch.tokens.size
    if n_tok > limits.max_tokens:
        raise ProtocolError("too_large", f"{path}.tokens: {n_tok} tokens > max_tokens {limits.max_tokens}")
    n_seq = batch.cu_seqlens.size - 1
    if n_seq < 1:
        raise ProtocolError("bad_shape", f"{path}.cu_seqlens: expected B+1 >= 2 entries, got {batch.cu_seqlens.size}")
    if n_seq > limits.max_sequences:
        raise ProtocolError("too_large", f"{path}: {n_seq} sequences > max_sequences {limits.max_sequences}")
    for name in ("prompt_lens", "prompt_ids", "sample_indices", "weight_versions", "last_weight_versions"):
        if getattr(batch, name).size != n_seq:
            raise ProtocolError("length_mismatch", f"{path}.{name}: expected B={n_seq} entries (from cu_seqlens), "
                                                   f"got {getattr(batch, name).size}")
    for name in ("loss_mask", "behaviour_logprobs"):
        if getattr(batch, name).size != n_tok:
            raise ProtocolError("length_mismatch", f"{path}.{name}: expected T={n_tok} entries, got {getattr(batch, name).size}")
    for name in ("finish_reasons", "labels"):
        if len(getattr(batch, name)) != n_seq:
            raise ProtocolError("length_mismatch", f"{path}.{name}: expected B={n_seq} entries, got {len(getattr(batch, name))}")
    return n_tok, n_seq


def _check_offsets(batch: Any, path: str, n_tok: int) -> tuple[np.ndarray, np.ndarray]:
    """``0 = cu[0] < cu[1] < ... < cu[B] = T`` and ``1 <= prompt_len < seq_len``; returns both as int64."""
    cu64 = batch.cu_seqlens.astype(np.int64)
    if cu64[0] != 0:
        raise ProtocolError("bad_cu_seqlens", f"{path}.cu_seqlens[0]: expected 0, got {int(cu64[0])}")
    seq_lens = np.diff(cu64)
    if np.any(seq_lens <= 0):
        b = first(seq_lens <= 0)
        raise ProtocolError(
            "bad_cu_seqlens",
            f"{path}.cu_seqlens: not strictly increasing at index {b + 1} ({int(cu64[b])} -> {int(cu64[b + 1])})",
        )
    if cu64[-1] != n_tok:
        raise ProtocolError("bad_cu_seqlens", f"{path}.cu_seqlens[-1]: expected T={n_tok}, got {int(cu64[-1])}")
    prompt_lens = batch.prompt_lens.astype(np.int64)
    bad = (prompt_lens < 1) | (prompt_lens >= seq_lens)
    if np.any(bad):
        b = first(bad)
        raise ProtocolError(
            "bad_prompt_len",
            f"{path}.prompt_lens[{b}]: expected 1 <= prompt_len < seq_len={int(seq_lens[b])}, got {int(prompt_lens[b])}",
        )
    return cu64, prompt_lens


def _check_versions(batch: Any, path: str) -> None:
    for name in ("sample_indices", "weight_versions"):
        values = getattr(batch, name)
        if np.any(values < 0):
            b = first(values < 0)
            raise ProtocolError("bad_value", f"{path}.{name}[{b}]: expected >= 0, got {int(values[b])}")
    backwards = batch.last_weight_versions < batch.weight_versions
    if np.any(backwards):
        b = first(backwards)
        raise ProtocolError("bad_value", f"{path}.last_weight_versions[{b}]: {int(batch.last_weight_versions[b])} "
                                         f"< weight_versions[{b}] {int(batch.weight_versions[b])}")


def _prompt_tokens(cu64: np.ndarray, prompt_lens: np.ndarray, n_tok: int) -> np.ndarray:
    """bool [T]: true on the prompt tokens of packed sequences (valid offsets, ``1 <= prompt_len < seq_len``).

    Without per-token index arithmetic: +1 at each sequence start, -1 at each prompt end (all
    positions distinct), and a running sum.
    """
    marks = np.zeros(n_tok + 1, dtype=np.int8)
    marks[cu64[:-1]] = 1
    marks[cu64[:-1] + prompt_lens] = -1
    return np.cumsum(marks[:-1], dtype=np.int8).view(np.bool_)


def _check_token_values(batch: Any, path: str, cu64: np.ndarray, prompt_lens: np.ndarray, n_tok: int) -> None:
    """loss_mask is 0/1 and 0 on prompts; log-probs are finite, 0 on prompts, <= 0 (+ slack) on responses."""
    is_prompt = _prompt_tokens(cu64, prompt_lens, n_tok)

    def where(i: int) -> str:
        b = int(np.searchsorted(cu64, i, side="right")) - 1
        return f"token {i} (sequence {b}, position {i - int(cu64[b])}, prompt_len {int(prompt_lens[b])})"

    mask = batch.loss_mask
    if np.any(mask > 1):
        i = first(mask > 1)
        raise ProtocolError("bad_loss_mask", f"{path}.loss_mask[{i}]: expected 0 or 1, got {int(mask[i])}")
    on_prompt = (mask != 0) & is_prompt
    if np.any(on_prompt):
        raise ProtocolError("bad_loss_mask", f"{path}.loss_mask: 1 on prompt {where(first(on_prompt))}")

    logprobs = batch.behaviour_logprobs
    finite = np.isfinite(logprobs)
    if not np.all(finite):
        i = first(~finite)
        raise ProtocolError("non_finite", f"{path}.behaviour_logprobs: {float(logprobs[i])} at {where(i)}")
    bad = (logprobs != 0) & is_prompt
    if np.any(bad):
        i = first(bad)
        raise ProtocolError(
            "bad_logprobs", f"{path}.behaviour_logprobs: expected 0 on prompt tokens, got {float(logprobs[i])} at {where(i)}"
        )
    bad = (logprobs > LOGPROB_SLACK) & ~is_prompt
    if np.any(bad):
        i = first(bad)
        raise ProtocolError(
            "bad_logprobs", f"{path}.behaviour_logprobs: expected <= 0 on response tokens, got {float(logprobs[i])} at {where(i)}"
        )


def packed_batch(batch: Any, path: str, limits: DecodeLimits) -> None:
    """Sizes agree, offsets and prompt lengths are valid, token ids in range, versions ordered,
    loss mask and behaviour log-probs consistent with the prompt / response split."""
    n_tok, _ = _check_sizes(batch, path, limits)
    cu64, prompt_lens = _check_offsets(batch, path, n_tok)
    check_token_ids(f"{path}.tokens", batch.tokens, limits)
    _check_versions(batch, path)
    _check_token_values(batch, path, cu64, prompt_lens, n_tok)


# --------------------------------------------------------------------------- weight updates


def weight_update(update: Any, path: str, limits: DecodeLimits) -> None:
    """Tensor names are unique; each tensor's bytes match its dtype and shape, lie inside its bucket
    and overlap no other tensor's."""
    _tensor_layout(update.tensors, [memoryview(bucket).nbytes for bucket in update.buckets], path)


def weight_header(header: Any, path: str, limits: DecodeLimits) -> None:
    """The announced buckets fit the limits, and the tensors fit them as in a whole update."""
    for j, size in enumerate(header.bucket_sizes):
        if size > limits.max_frame_bytes:
            raise ProtocolError("too_large", f"{path}.bucket_sizes[{j}]: {size} bytes > max_frame_bytes {limits.max_frame_bytes}")
    if sum(header.bucket_sizes) > limits.max_total_bytes:
        raise ProtocolError("too_large", f"{path}.bucket_sizes: {sum(header.bucket_sizes)} bytes > max_total_bytes "
                                         f"{limits.max_total_bytes}")
    _tensor_layout(header.tensors, header.bucket_sizes, path)


def weight_bucket(bucket: Any, path: str, limits: DecodeLimits) -> None:
    """A bucket index a header can announce (below ``limits.max_buckets``); also a weight credit's."""
    if bucket.index >= limits.max_buckets:
        raise ProtocolError("bad_value", f"{path}.index: {bucket.index} >= max_buckets {limits.max_buckets}")


def relay_target(target: Any, path: str, limits: DecodeLimits) -> None:
    """A TCP address (ZeroMQ syntax): a relay never points at a file or another transport."""
    if not target.address.startswith("tcp://"):
        raise ProtocolError("bad_value", f"{path}.address: expected tcp://host:port, got {target.address[:60]!r}")


def weight_group_invite(invite: Any, path: str, limits: DecodeLimits) -> None:
    """An NCCL unique id of its fixed length, and a first rank inside the group."""
    from .messages import NCCL_UNIQUE_ID_BYTES  # the messages module imports this one

    if invite.unique_id.shape != (NCCL_UNIQUE_ID_BYTES,):
        raise ProtocolError("length_mismatch", f"{path}.unique_id: {invite.unique_id.size} bytes, an NCCL unique id "
                                               f"has {NCCL_UNIQUE_ID_BYTES}")
    if invite.first_rank >= invite.world_size:
        raise ProtocolError("bad_value", f"{path}.first_rank: {invite.first_rank} is not a rank of a group of "
                                         f"world_size {invite.world_size}")


def _tensor_layout(tensors: Any, sizes: list[int], path: str) -> None:
    names: set[str] = set()
    spans: list[list[tuple[int, int, int]]] = [[] for _ in sizes]
    for i, meta in enumerate(tensors):
        where = f"{path}.tensors[{i}] ({meta.name!r})"
        if meta.name in names:
            raise ProtocolError("bad_value", f"{where}: duplicate tensor name")
        names.add(meta.name)
        if not 0 <= meta.bucket < len(sizes):
            raise ProtocolError("out_of_bounds", f"{where}.bucket: {meta.bucket} not in [0, {len(sizes)})")
        expected = meta.numel * WEIGHT_DTYPES[meta.dtype]
        if meta.nbytes != expected:
            raise ProtocolError(
                "length_mismatch", f"{where}.nbytes: {meta.dtype} shape {tuple(meta.shape)} needs {expected} bytes, got {meta.nbytes}"
            )
        if meta.offset + meta.nbytes > sizes[meta.bucket]:
            raise ProtocolError(
                "out_of_bounds",
                f"{where}: bytes [{meta.offset}, {meta.offset + meta.nbytes}) outside bucket {meta.bucket} of {sizes[meta.bucket]} bytes",
            )
        if meta.nbytes:
            spans[meta.bucket].append((meta.offset, meta.offset + meta.nbytes, i))
    for bucket, bucket_spans in enumerate(spans):
        bucket_spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(bucket_spans, bucket_spans[1:]):
            if start_b < end_a:
                raise ProtocolError(
                    "overlap", f"{path}.tensors[{a}] and tensors[{b}] overlap in bucket {bucket} (at byte {start_b})"
                )
