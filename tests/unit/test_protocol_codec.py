"""Codec tests: round trips, every rejection reason, allocation bounds, fuzzing."""

from __future__ import annotations

import dataclasses
import math
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    REASON_CODES,
    SCHEMA_VERSION,
    DecodeLimits,
    Envelope,
    Heartbeat,
    Hello,
    PackedBatch,
    PromptSpec,
    ProtocolError,
    RolloutError,
    SamplingSpec,
    Shutdown,
    WeightAck,
    WeightCredit,
    WeightUpdate,
    WorkGrant,
    decode,
    encode,
    pack_weight_buckets,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
HDR = dict(run_id="run-1", producer_id="rollout-0", seq=7, weight_version=3)


# --------------------------------------------------------------------------- fixtures / builders


def make_batch(**overrides) -> PackedBatch:
    # seq 0: prompt [11, 12], response [13, 14, 15]; seq 1: prompt [21], response [22];
    # seq 2: prompt [31, 32, 33], response [34, 35] (last response token not trained)
    kw = dict(
        grant_id=4,
        step=9,
        tokens=np.array([11, 12, 13, 14, 15, 21, 22, 31, 32, 33, 34, 35], dtype=np.int32),
        cu_seqlens=np.array([0, 5, 7, 12], dtype=np.int32),
        prompt_lens=np.array([2, 1, 3], dtype=np.int32),
        loss_mask=np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0], dtype=np.uint8),
        behaviour_logprobs=np.array(
            [0, 0, -0.5, -1.25, -0.0625, 0, -3.5, 0, 0, 0, -0.75, 5e-5], dtype=np.float32
        ),
        prompt_ids=np.array([100, 101, 2**40], dtype=np.int64),
        sample_indices=np.array([0, 1, 0], dtype=np.int32),
        weight_versions=np.array([2, 3, 3], dtype=np.int32),
        last_weight_versions=np.array([2, 4, 3], dtype=np.int32),
        finish_reasons=["stop", "length", "abort"],
        labels=["answer-a", None, "é label"],
        gen_seconds=0.75,
    )
    kw.update(overrides)
    return PackedBatch(**kw)


def make_grant(**overrides) -> WorkGrant:
    kw = dict(
        grant_id=12,
        step=3,
        min_weight_version=2,
        n_samples=4,
        sampling=SamplingSpec(
            temperature=0.7, top_p=0.95, top_k=-1, max_new_tokens=128, stop_token_ids=[2, 7], seed=1234,
            stop_strings=["\n\n", "</answer>"], min_new_tokens=16,
        ),
        prompts=[
            PromptSpec(prompt_id=5, token_ids=np.array([1, 2, 3], dtype=np.int32), label="42"),
            PromptSpec(prompt_id=6, token_ids=np.array([9], dtype=np.int32), label=None),
        ],
    )
    kw.update(overrides)
    return WorkGrant(**kw)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Truncate float32 values to bfloat16 bit patterns (uint16)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


BF16_SOURCE = np.random.default_rng(1).standard_normal(6).astype(np.float32)


def make_weight_update() -> tuple[WeightUpdate, dict]:
    rng = np.random.default_rng(0)
    src = {
        "embed.weight": ("float32", rng.standard_normal((4, 8)).astype(np.float32)),
        "layer.0.w": ("float16", rng.standard_normal((3, 5)).astype(np.float16)),
        "layer.0.b": ("bfloat16", bf16_bits(BF16_SOURCE)),
        "step_counter": ("int64", np.array([2**40, -3], dtype=np.int64)),
        "positions": ("int32", np.arange(5, dtype=np.int32)),
        "empty": ("float32", np.zeros((0, 3), dtype=np.float32)),
    }
    metas, buckets = pack_weight_buckets(
        ((name, dt, arr.shape, arr) for name, (dt, arr) in src.items()), bucket_bytes=160
    )
    upd = WeightUpdate(version=5, tensors=metas, buckets=buckets, fingerprint={"sha": "abc", "n": "6"})
    return upd, src


def roundtrip(msg, **kw) -> Envelope:
    frames = encode(msg, **HDR)
    return decode([bytes(f) for f in frames], **kw)


def header_of(frames) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def with_header(frames, mutate) -> list:
    header = header_of(frames)
    mutate(header)
    return [msgpack.packb(header, use_bin_type=True), *[bytes(f) for f in frames[1:]]]


def reject(frames, code: str, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kw)
    assert info.value.reason_code == code, str(info.value)
    assert info.value.reason_code in REASON_CODES
    return info.value


def bad_batch_frames(**overrides) -> list:
    """Encode a batch that breaks an invariant (skipping sender-side validation)."""
    return [bytes(f) for f in encode(make_batch(**overrides), validate=False, **HDR)]


# --------------------------------------------------------------------------- round trips


def test_roundtrip_packed_batch_every_field():
    batch = make_batch()
    env = roundtrip(batch)
    assert env == Envelope(SCHEMA_VERSION, "packed_batch", "run-1", "rollout-0", 7, 3, batch)
    got = env.body
    assert got == batch
    for name, dtype in PackedBatch.ARRAY_DTYPES.items():
        arr = getattr(got, name)
        assert arr.dtype == np.dtype(dtype) and not arr.flags.writeable, name
    assert got.labels == ["answer-a", None, "é label"]
    assert got.finish_reasons == ["stop", "length", "abort"]
    assert got.num_sequences == 3 and got.num_tokens == 12
    assert got.response_lens.tolist() == [3, 1, 2]
    assert got.seq_lens.tolist() == [5, 2, 5]
    assert got.gen_seconds == 0.75 and got.prompt_ids[2] == 2**40


def test_decoded_arrays_are_readonly_zero_copy_views():
    frames = [bytes(f) for f in encode(make_batch(), **HDR)]
    got = decode(frames).body
    tokens_frame = np.frombuffer(frames[1], dtype=np.uint8)
    assert got.tokens.ctypes.data == tokens_frame.ctypes.data  # same memory, no copy
    with pytest.raises(ValueError):
        got.tokens[0] = 1


def test_encode_is_zero_copy():
    batch = make_batch()
    frames = encode(batch, **HDR)
    assert isinstance(frames[0], bytes)
    view = frames[1 + list(PackedBatch.ARRAY_DTYPES).index("behaviour_logprobs")]
    assert np.frombuffer(view, dtype=np.float32).ctypes.data == batch.behaviour_logprobs.ctypes.data


def test_roundtrip_work_grant():
    grant = make_grant()
    got = roundtrip(grant).body
    assert got == grant
    assert got.prompts[0].token_ids.tolist() == [1, 2, 3] and not got.prompts[0].token_ids.flags.writeable
    assert got.sampling.seed == 1234 and got.sampling.stop_token_ids == [2, 7]
    assert got.sampling.stop_strings == ["\n\n", "</answer>"]
    no_seed = make_grant(sampling=dataclasses.replace(grant.sampling, seed=None, stop_token_ids=[], stop_strings=[]))
    assert roundtrip(no_seed).body == no_seed
    assert grant.evaluation is False
    greedy_evaluation = make_grant(sampling=dataclasses.replace(grant.sampling, temperature=0.0), evaluation=True)
    got = roundtrip(greedy_evaluation).body
    assert got == greedy_evaluation and got.evaluation is True and got.sampling.temperature == 0.0


def test_roundtrip_evaluation_batch_and_reject_a_bad_evaluation_flag():
    batch = make_batch(evaluation=True)
    assert make_batch().evaluation is False and roundtrip(batch).body.evaluation is True
    frames = bad_batch_frames()
    reject(with_header(frames, lambda h: h["body"].update(evaluation=1)), "bad_type")
    reject(with_header(frames, lambda h: h["body"].pop("evaluation")), "missing_field")
    grant = [bytes(f) for f in encode(make_grant(), **HDR)]
    reject(with_header(grant, lambda h: h["body"].update(evaluation="yes")), "bad_type")


def test_roundtrip_weight_update_all_dtypes_two_buckets():
    upd, src = make_weight_update()
    assert len(upd.buckets) >= 2
    assert {m.dtype for m in upd.tensors} == {"float32", "float16", "bfloat16", "int64", "int32"}
    env = roundtrip(upd)
    got = env.body
    assert got == upd and got.tensors == upd.tensors
    assert all(m.offset % 64 == 0 for m in got.tensors if m.nbytes)
    seen = {}
    for meta in got.tensors:
        arr = got.array(meta)
        assert not arr.flags.writeable
        seen[meta.name] = arr
        expected = src[meta.name][1]
        assert arr.shape == expected.shape and np.array_equal(arr, expected), meta.name
    assert set(seen) == set(src)
    # bfloat16: raw bit pattern as uint16; the float values are recovered by shifting into float32
    bits = seen["layer.0.b"]
    assert bits.dtype == np.uint16
    as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.allclose(as_f32, BF16_SOURCE, rtol=1e-2)
    assert bytes(got.tensor_bytes("layer.0.b")) == src["layer.0.b"][1].tobytes()


def test_pack_weight_buckets_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_weight_buckets([("w", "float32", (3,), b"\x00" * 8)], 64)  # 12 bytes needed
    with pytest.raises(ValueError):
        pack_weight_buckets([("w", "float64", (1,), b"\x00" * 8)], 64)
    with pytest.raises(ValueError):
        pack_weight_buckets([("w", "int32", (1,), b"\x00" * 4)] * 2, 64)
    metas, buckets = pack_weight_buckets([("big", "int32", (100,), np.zeros(100, np.int32))], 16)
    assert len(buckets) == 1 and metas[0].nbytes == 400  # oversize tensor gets its own bucket


@pytest.mark.parametrize(
    "msg",
    [
        Hello(engine_info={"engine": "vllm", "tp": 2, "gpu_mem_util": 0.85}),
        WeightAck(version=5, fingerprint={"sha": "abc"}, apply_seconds=0.25),
        WeightCredit(version=5, index=2),
        Heartbeat(state="generating"),
        Shutdown(reason="done"),
        Shutdown(reason="dropped: no progress", rejoin=True),
        RolloutError(message="CUDA OOM", fatal=True),
        RolloutError(message="retrying", fatal=False),
    ],
    ids=lambda m: type(m).__name__,
)
def test_roundtrip_small_messages(msg):
    env = roundtrip(msg)
    assert env.body == msg and env.kind == type(msg).KIND
    assert (env.run_id, env.producer_id, env.seq, env.weight_version) == ("run-1", "rollout-0", 7, 3)


def test_protocol_error_is_picklable_and_informative():
    err = reject(bad_batch_frames(prompt_lens=np.array([2, 2, 3], np.int32)), "bad_prompt_len")
    assert "prompt_lens[1]" in err.message and "seq_len=2" in err.message
    again = pickle.loads(pickle.dumps(err))
    assert again.reason_code == "bad_prompt_len" and again.message == err.message


def test_protocol_package_imports_numpy_only():
    code = (
        "import sys, protocol\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'rollout', 'learner')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- rejections


def test_reject_random_bytes():
    reject([b"\xc1\x00garbage"], "bad_msgpack")
    reject([b"\x93\x01\x02\x03"], "bad_type")  # valid msgpack, but not a map
    reject([], "frame_count")
    reject([12345], "bad_type")
    reject("not a list", "bad_type")


def test_reject_truncated_and_extra_frames():
    frames = bad_batch_frames()
    reject(frames[:-1], "frame_count")
    reject(frames[:1], "frame_count")
    reject([*frames, b"extra"], "frame_count")


def test_reject_header_problems():
    frames = bad_batch_frames()
    reject(with_header(frames, lambda h: h.update(schema_version=SCHEMA_VERSION + 1)), "schema_version")
    reject(with_header(frames, lambda h: h.update(schema_version=True)), "schema_version")
    reject(with_header(frames, lambda h: h.update(kind="packed_batch_v9")), "unknown_kind")
    reject(with_header(frames, lambda h: h.pop("seq")), "missing_field")
    reject(with_header(frames, lambda h: h["body"].pop("gen_seconds")), "missing_field")
    reject(with_header(frames, lambda h: h["body"].update(extra=1)), "unknown_field")
    reject(with_header(frames, lambda h: h.update(seq=-1)), "bad_value")
    reject(with_header(frames, lambda h: h.update(producer_id=5)), "bad_type")
    reject(with_header(frames, lambda h: h["body"].update(grant_id="4")), "bad_type")
    reject(with_header(frames, lambda h: h["body"].update(gen_seconds=float("nan"))), "non_finite")
    reject(with_header(frames, lambda h: h["body"]["finish_reasons"].__setitem__(0, "eos")), "bad_value")
    reject(with_header(frames, lambda h: h["body"]["labels"].pop()), "length_mismatch")
    err = reject(frames, "run_id", expected_run_id="run-2")
    assert "run-2" in err.message and "run-1" in err.message
    assert decode(frames, expected_run_id="run-1").run_id == "run-1"


def test_reject_duplicate_map_keys():
    raw = bytes(bad_batch_frames()[0])
    # msgpack map header 0x88 = 8 entries; add a 9th entry duplicating "kind"
    assert raw[0] == 0x88
    forged = b"\x89" + raw[1:] + msgpack.packb("kind") + msgpack.packb("heartbeat")
    reject([forged, *bad_batch_frames()[1:]], "bad_msgpack")


def test_reject_array_descriptor_problems():
    frames = bad_batch_frames()

    def set_desc(i, **kw):
        return with_header(frames, lambda h: h["arrays"][i].update(**kw))

    reject(set_desc(0, dtype="float32"), "bad_dtype")  # tokens must be int32 (same itemsize: lengths agree)
    reject(set_desc(0, dtype="complex128"), "bad_dtype")
    reject(set_desc(0, shape=[13]), "length_mismatch")
    reject(set_desc(0, shape=[3, 4]), "bad_shape")
    reject(set_desc(0, shape=[-1]), "bad_value")
    reject(set_desc(0, name="toks"), "missing_field")
    reject(with_header(frames, lambda h: h["arrays"][0].pop("shape")), "missing_field")
    truncated = list(frames)
    truncated[1] = truncated[1][:-4]
    reject(truncated, "length_mismatch")


def test_reject_batch_invariants():
    def cases():
        yield "bad_cu_seqlens", dict(cu_seqlens=np.array([0, 5, 4, 12], np.int32))  # not monotone
        yield "bad_cu_seqlens", dict(cu_seqlens=np.array([1, 5, 7, 12], np.int32))
        yield "bad_cu_seqlens", dict(cu_seqlens=np.array([0, 5, 7, 11], np.int32))
        yield "bad_cu_seqlens", dict(cu_seqlens=np.array([0, 5, 5, 12], np.int32))  # empty sequence
        yield "bad_prompt_len", dict(prompt_lens=np.array([2, 2, 3], np.int32))  # prompt_len == seq len
        yield "bad_prompt_len", dict(prompt_lens=np.array([2, 5, 3], np.int32))
        yield "bad_prompt_len", dict(prompt_lens=np.array([0, 1, 3], np.int32))
        mask = make_batch().loss_mask.copy()
        mask[1] = 1  # loss on a prompt token
        yield "bad_loss_mask", dict(loss_mask=mask)
        mask = make_batch().loss_mask.copy()
        mask[2] = 2
        yield "bad_loss_mask", dict(loss_mask=mask)
        for bad in (np.nan, np.inf, -np.inf):
            lp = make_batch().behaviour_logprobs.copy()
            lp[3] = bad
            yield "non_finite", dict(behaviour_logprobs=lp)
        lp = make_batch().behaviour_logprobs.copy()
        lp[0] = -0.1  # non-zero on a prompt token
        yield "bad_logprobs", dict(behaviour_logprobs=lp)
        lp = make_batch().behaviour_logprobs.copy()
        lp[4] = 0.01  # positive beyond slack on a response token
        yield "bad_logprobs", dict(behaviour_logprobs=lp)
        yield "length_mismatch", dict(sample_indices=np.array([0, 1], np.int32))
        yield "length_mismatch", dict(loss_mask=np.zeros(11, np.uint8))
        yield "length_mismatch", dict(finish_reasons=["stop", "stop"])
        yield "bad_value", dict(weight_versions=np.array([1, -1, 1], np.int32))
        yield "bad_value", dict(last_weight_versions=np.array([2, 2, 3], np.int32))  # older than the first version
        yield "length_mismatch", dict(last_weight_versions=np.array([2, 4], np.int32))
        yield "out_of_bounds", dict(tokens=np.array([11, 12, 13, 14, 15, 21, -22, 31, 32, 33, 34, 35], np.int32))
        yield "bad_shape", dict(
            tokens=np.zeros(0, np.int32), cu_seqlens=np.zeros(1, np.int32), prompt_lens=np.zeros(0, np.int32),
            loss_mask=np.zeros(0, np.uint8), behaviour_logprobs=np.zeros(0, np.float32), prompt_ids=np.zeros(0, np.int64),
            sample_indices=np.zeros(0, np.int32), weight_versions=np.zeros(0, np.int32),
            last_weight_versions=np.zeros(0, np.int32), finish_reasons=[], labels=[],
        )

    for code, overrides in cases():
        reject(bad_batch_frames(**overrides), code)
        with pytest.raises(ProtocolError) as info:  # the sender-side check gives the same verdict
            encode(make_batch(**overrides), **HDR)
        assert info.value.reason_code == code


def test_reject_token_id_out_of_vocab():
    limits = DecodeLimits(vocab_size=35)
    frames = bad_batch_frames()
    err = reject(frames, "out_of_bounds", limits=limits)
    assert "tokens[11]" in err.message and "35" in err.message
    assert decode(frames, limits=DecodeLimits(vocab_size=36)).body.tokens.max() == 35
    grant = [bytes(f) for f in encode(make_grant(), **HDR)]
    reject(grant, "out_of_bounds", limits=DecodeLimits(vocab_size=5))  # prompt token 9, stop token 7


def test_reject_work_grant_values():
    sampling = make_grant().sampling
    cases = [
        ("bad_value", dict(n_samples=0)),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, temperature=-0.5))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, top_p=0.0))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, top_p=1.5))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, max_new_tokens=0))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, min_new_tokens=-1))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, min_new_tokens=129))),  # max_new_tokens 128
        ("non_finite", dict(sampling=dataclasses.replace(sampling, temperature=float("inf")))),
        ("bad_type", dict(sampling=dataclasses.replace(sampling, seed=1.5))),
        ("bad_value", dict(sampling=dataclasses.replace(sampling, stop_strings=["ok", ""]))),
        ("bad_value", dict(prompts=[])),
        ("bad_prompt_len", dict(prompts=[PromptSpec(prompt_id=1, token_ids=np.zeros(0, np.int32), label=None)])),
    ]
    for code, overrides in cases:
        with pytest.raises(ProtocolError) as info:
            validate(make_grant(**overrides))
        assert info.value.reason_code == code, (overrides, info.value)
        if code == "bad_type":  # encode(validate=False) coerces scalars (seed 1.5 -> 1): nothing to reject
            continue
        wire_code = "bad_cu_seqlens" if code == "bad_prompt_len" else code  # empty prompt = repeated cu entry
        reject([bytes(f) for f in encode(make_grant(**overrides), validate=False, **HDR)], wire_code)
    frames = [bytes(f) for f in encode(make_grant(), **HDR)]
    reject(with_header(frames, lambda h: h["body"]["prompts"].pop()), "length_mismatch")
    reject(with_header(frames, lambda h: h["body"]["sampling"].pop("seed")), "missing_field")
    reject(with_header(frames, lambda h: h["body"]["sampling"].__setitem__("stop_strings", ["a", 3])), "bad_type")
    reject(with_header(frames, lambda h: h["body"]["sampling"].__setitem__("stop_strings", "abc")), "bad_type")


def test_reject_weight_update_metas():
    upd, _ = make_weight_update()
    t0 = upd.tensors[0]
    size0 = len(upd.buckets[0])
    cases = [
        ("out_of_bounds", dataclasses.replace(t0, offset=size0 - 4)),
        ("out_of_bounds", dataclasses.replace(t0, bucket=len(upd.buckets))),
        ("length_mismatch", dataclasses.replace(t0, nbytes=t0.nbytes - 4)),
        ("bad_dtype", dataclasses.replace(t0, dtype="float64")),
        ("overlap", dataclasses.replace(upd.tensors[1], bucket=t0.bucket, offset=t0.offset + 4)),
    ]
    for code, meta in cases:
        idx = 0 if meta.name == t0.name else 1
        tensors = list(upd.tensors)
        tensors[idx] = meta
        bad = dataclasses.replace(upd, tensors=tensors)
        frames = [bytes(f) for f in encode(bad, validate=False, **HDR)]
        reject(frames, code)
    frames = [bytes(f) for f in encode(upd, **HDR)]
    reject(with_header(frames, lambda h: h["body"]["tensors"].append(dict(h["body"]["tensors"][0]))), "bad_value")


def test_oversized_declared_lengths_do_not_allocate():
    frames = bad_batch_frames()
    huge_shape = with_header(frames, lambda h: h["arrays"][0].update(shape=[2**40]))
    huge_dims = with_header(frames, lambda h: h["arrays"][0].update(shape=[2**62, 2**62]))
    # msgpack header claiming a 2**32-1 element array / 4 GiB string, followed by almost nothing
    huge_array = [b"\x81\xa4body\xdd\xff\xff\xff\xff\x01"]
    huge_str = [b"\x81\xa4kind\xdb\xff\xff\xff\xff" + b"a" * 16]
    huge_bin = [b"\x81\xa4kind\xc6\x7f\xff\xff\xff" + b"a" * 16]
    small = DecodeLimits(max_frame_bytes=1024)
    tracemalloc.start()
    try:
        reject(huge_shape, "too_large")
        reject(huge_dims, "too_large")
        reject(huge_array, "too_large")
        with pytest.raises(ProtocolError) as info:
            decode(huge_str)
        assert info.value.reason_code in ("too_large", "bad_msgpack")
        with pytest.raises(ProtocolError) as info:
            decode(huge_bin)
        assert info.value.reason_code in ("too_large", "bad_msgpack")
        reject([frames[0], b"\x00" * 2048], "too_large", limits=small)
        reject(frames, "too_large", limits=DecodeLimits(max_frames=3))
        reject(frames, "too_large", limits=DecodeLimits(max_total_bytes=64))
        reject(frames, "too_large", limits=DecodeLimits(max_header_bytes=16))
        reject(frames, "too_large", limits=DecodeLimits(max_tokens=11))
        reject(frames, "too_large", limits=DecodeLimits(max_sequences=2))
        reject(frames, "too_large", limits=DecodeLimits(max_string_len=4))  # labels / field names
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoder allocated {peak} bytes on hostile input"


# --------------------------------------------------------------------------- fuzzing

VALID_FRAMES = [bytes(f) for f in encode(make_batch(), **HDR)]
ARRAY_DTYPES = list(PackedBatch.ARRAY_DTYPES.values())

wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["stop", "int32", "uint8", "float32", "tokens", "packed_batch", "bucket", "weight_update"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_frames(draw):
    frames = list(VALID_FRAMES)
    op = draw(st.sampled_from(["header", "header_bytes", "array_value", "array_bytes", "frames"]))
    if op == "header":
        header = msgpack.unpackb(frames[0], raw=False)
        paths = [p for p in _paths(header) if p]
        path = draw(st.sampled_from(paths))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(wire_values)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    elif op == "header_bytes":
        raw = bytearray(frames[0])
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        frames[0] = bytes(raw[: draw(st.integers(0, len(raw)))]) if draw(st.booleans()) else bytes(raw)
    elif op == "array_value":
        i = draw(st.integers(0, len(ARRAY_DTYPES) - 1))
        dtype = np.dtype(ARRAY_DTYPES[i])
        arr = np.frombuffer(frames[i + 1], dtype=dtype).copy()
        if dtype.kind == "f":
            value = draw(st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-5, 1.0]))
        else:
            info = np.iinfo(dtype)
            value = draw(st.integers(int(info.min), int(info.max)) | st.integers(max(-2, int(info.min)), 40))
        if arr.size:
            arr[draw(st.integers(0, arr.size - 1))] = value
        frames[i + 1] = arr.tobytes()
    elif op == "array_bytes":
        i = draw(st.integers(1, len(frames) - 1))
        raw = bytearray(frames[i])
        if raw and draw(st.booleans()):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        else:
            raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=8))
        frames[i] = bytes(raw)
    else:
        choice = draw(st.sampled_from(["drop", "dup", "swap", "insert"]))
        i = draw(st.integers(0, len(frames) - 1))
        j = draw(st.integers(0, len(frames) - 1))
        if choice == "drop":
            del frames[i]
        elif choice == "dup":
            frames.insert(i, frames[j])
        elif choice == "swap":
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(i, draw(st.binary(max_size=32)))
    return frames


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=mutated_frames(), vocab=st.sampled_from([None, 30, 1000]))
def test_fuzz_mutated_batch_decodes_or_raises_protocol_error(frames, vocab):
    limits = DecodeLimits(vocab_size=vocab)
    try:
        env = decode(frames, limits=limits, expected_run_id="run-1")
    except ProtocolError as exc:
        assert exc.reason_code in REASON_CODES
        return
    # Accepted: it must really be a valid message that survives a re-encode round trip.
    again = decode([bytes(f) for f in encode(env.body, limits=limits, **HDR)], limits=limits)
    assert again.body == env.body
    if isinstance(env.body, PackedBatch):
        b = env.body
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.tokens.size
        assert np.all(b.response_lens >= 1)
        assert all(math.isfinite(x) for x in b.behaviour_logprobs.tolist())
