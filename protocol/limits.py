"""Bounds every decoded (and, by default, every encoded) message must stay within."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeLimits", "DEFAULT_LIMITS"]


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds enforced by :func:`protocol.codec.decode` (and by ``encode(validate=True)``).

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

    @property
    def max_buckets(self) -> int:
        """Most weight buckets in one message (one frame each, after the header frame)."""
        return self.max_frames - 1


DEFAULT_LIMITS = DecodeLimits()
