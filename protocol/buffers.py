"""Raw bytes: zero-copy byte views of buffers and tensors, and the length-prefixed frame list that
stores one wire message's frames in a single blob (recordings, broadcasts between learner ranks)."""

from __future__ import annotations

import struct
import sys
from typing import Any, Callable, Sequence

__all__ = ["byte_view", "tensor_bytes", "FrameListError", "frame_list_parts", "read_frame_list", "split_frame_list"]

# A frame list: the frame count, then each frame after its length (little-endian).
_FRAME_COUNT = struct.Struct("<I")
_FRAME_LENGTH = struct.Struct("<Q")


def byte_view(data: Any) -> memoryview:
    """1-D unsigned-byte memoryview of a C-contiguous buffer (no copy); ValueError if not contiguous."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if view.format == "B" and view.ndim == 1:
        return view
    if view.nbytes == 0:
        return memoryview(b"")
    return view.cast("B")


def tensor_bytes(tensor: Any) -> memoryview:
    """The raw little-endian bytes of a torch tensor, bfloat16 included (which numpy cannot hold).

    No copy when the tensor is contiguous. This package never imports torch: whoever holds a
    tensor has loaded it already, so its ``uint8`` dtype is taken from the loaded module.
    """
    torch = sys.modules["torch"]
    return byte_view(tensor.detach().contiguous().view(torch.uint8).numpy())


class FrameListError(ValueError):
    """A frame list's frame count cannot be right (its length prefixes alone do not fit)."""


def frame_list_parts(frames: Sequence[Any]) -> list[bytes | memoryview]:
    """``frames`` (bytes-like) as a frame list: ``u32 count, then (u64 length, bytes)`` per frame.

    Returns the parts, the frames themselves uncopied, to hand to ``writev`` or ``b"".join``.
    """
    views = [byte_view(frame) for frame in frames]
    parts: list[bytes | memoryview] = [_FRAME_COUNT.pack(len(views))]
    for view in views:
        parts += [_FRAME_LENGTH.pack(view.nbytes), view]
    return parts


def read_frame_list(read: Callable[[int, str], Any], available: int) -> list[Any]:
    """Read a frame list through ``read(n, what)`` (which returns exactly ``n`` bytes or raises).

    ``available``: the bytes left where the list is read from; a count whose length prefixes alone
    could not fit in them raises :class:`FrameListError` before any frame is read.
    """
    (count,) = _FRAME_COUNT.unpack(read(_FRAME_COUNT.size, "frame count"))
    if count * _FRAME_LENGTH.size > available - _FRAME_COUNT.size:
        raise FrameListError(f"{count} frames cannot fit in {available - _FRAME_COUNT.size} bytes")
    frames = []
    for i in range(count):
        (n,) = _FRAME_LENGTH.unpack(read(_FRAME_LENGTH.size, f"frame {i} length"))
        frames.append(read(n, f"frame {i}"))
    return frames


def split_frame_list(data: Any) -> list[memoryview]:
    """The frames of a frame list held in one buffer (zero-copy views); ValueError if it is inconsistent."""
    view = byte_view(data)
    pos = 0

    def read(n: int, what: str) -> memoryview:
        nonlocal pos
        if n > view.nbytes - pos:
            raise FrameListError(f"frame list: {what} needs {n} bytes, {view.nbytes - pos} left")
        pos += n
        return view[pos - n: pos]

    frames = read_frame_list(read, view.nbytes)
    if pos != view.nbytes:
        raise FrameListError(f"frame list: {view.nbytes - pos} trailing bytes")
    return frames
