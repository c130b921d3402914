"""protocol.buffers: byte views of buffers and tensors, and the frame list's refusals."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from protocol.buffers import FrameListError, byte_view, frame_list_parts, split_frame_list, tensor_bytes


def test_byte_view_is_a_flat_uncopied_view():
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    view = byte_view(arr)
    assert view.format == "B" and view.ndim == 1 and view.nbytes == 24
    arr[0, 0] = 7
    assert view[0] == 7  # no copy
    assert byte_view(np.zeros(0, np.float32)).nbytes == 0


def test_byte_view_refuses_a_strided_buffer():
    with pytest.raises(ValueError, match="not C-contiguous"):
        byte_view(np.arange(10, dtype=np.int32)[::2])


def test_tensor_bytes_of_bfloat16_are_its_bit_pattern():
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    assert bytes(tensor_bytes(t)) == t.view(torch.int16).numpy().tobytes()
    # 1.0 in bfloat16 is 0x3F80 (little-endian: 80 3F)
    assert bytes(tensor_bytes(t))[:2] == b"\x80\x3f"
    strided = torch.arange(6, dtype=torch.float32)[::2]
    assert bytes(tensor_bytes(strided)) == np.array([0, 2, 4], np.float32).tobytes()


def test_frame_list_layout_is_count_then_length_prefixed_frames():
    blob = b"".join(frame_list_parts([b"ab", b""]))
    assert blob == struct.pack("<I", 2) + struct.pack("<Q", 2) + b"ab" + struct.pack("<Q", 0)


@pytest.mark.parametrize("blob, problem", [
    (struct.pack("<I", 1) + struct.pack("<Q", 5) + b"abc", "frame 0 needs 5 bytes, 3 left"),
    (struct.pack("<I", 1) + struct.pack("<Q", 1) + b"ab", "1 trailing bytes"),
    (struct.pack("<I", 1000) + struct.pack("<Q", 0), "1000 frames cannot fit in 8 bytes"),
    (b"\x01\x00", "frame count needs 4 bytes, 2 left"),
])
def test_split_frame_list_refuses_an_inconsistent_blob(blob, problem):
    with pytest.raises(FrameListError, match=problem):
        split_frame_list(blob)
