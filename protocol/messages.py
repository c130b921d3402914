"""Typed messages: the single data contract between rollout and learner.

All messages are frozen dataclasses (attributes cannot be re-assigned; the
numpy arrays / lists they hold are not deep-frozen, hence "frozen-ish").
Arrays are 1-D numpy arrays with a fixed dtype; constructors convert
array-likes (lists, other integer widths, ...) to that dtype, refusing
conversions that would lose integer values.  Arrays produced by
:func:`protocol.codec.decode` are read-only zero-copy views of the received
frames.

Every message travels inside an :class:`Envelope` whose header fields are
``schema_version, kind, run_id, producer_id, seq, weight_version``.

Each field is declared once, with its wire spec (:func:`protocol.schema.wire`): how it travels
(a msgpack body entry or raw frames) and which values it may hold. Encoding, decoding and the
type and range checks follow from it; the rules between fields are each class's ``INVARIANTS``
(:mod:`protocol.invariants`). Any change to a field or its allowed values bumps ``SCHEMA_VERSION``.

This module must only depend on numpy (no torch, nothing from rollout/ or
learner/). Dtype names: :mod:`protocol.dtypes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterable, Mapping, Union

import numpy as np

from . import invariants
from .buffers import byte_view
from .dtypes import WEIGHT_DTYPES, numpy_storage_dtype
from .schema import (Array, Bool, Buffers, Choice, Float, Int, List, Map, Nested, Optional, Ragged, Scalar, Schema,
                     Shape, Str, TokenId, wire, wire_fields)

__all__ = [
    "SCHEMA_VERSION",
    "FINISH_REASONS",
    "Hello",
    "SamplingSpec",
    "PromptSpec",
    "WorkGrant",
    "PackedBatch",
    "TensorMeta",
    "WeightUpdate",
    "RelayTarget",
    "WeightHeader",
    "WeightBucket",
    "WeightCredit",
    "WeightGroupInvite",
    "NCCL_UNIQUE_ID_BYTES",
    "WeightAck",
    "Heartbeat",
    "Shutdown",
    "RolloutError",
    "Message",
    "MESSAGE_TYPES",
    "Envelope",
    "pack_weight_buckets",
    "relay_children",
    "relay_height",
]

SCHEMA_VERSION: int = 8

#: Allowed values of ``PackedBatch.finish_reasons``.
FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "abort"})

#: Sampling seeds are taken modulo this (see `SamplingSpec.sample_seed`).
SEED_SPACE: int = 2**32


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    bytes_like = (bytes, bytearray, memoryview)
    if isinstance(a, bytes_like) and isinstance(b, bytes_like):
        return bytes(a) == bytes(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    return bool(a == b)


class _ValueEquality:
    """Value equality that understands numpy arrays and buffers."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_values_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]  # hold arrays / lists


class _Message(_ValueEquality, Schema):
    """Base of all messages: fields declared with their wire specs (see protocol.schema)."""

    KIND: ClassVar[str] = ""


# --------------------------------------------------------------------------- control messages


@dataclass(frozen=True, eq=False)
class Hello(_Message):
    """rollout -> learner, first message after connecting (also resets the per-peer seq check)."""

    KIND: ClassVar[str] = "hello"
    engine_info: dict[str, str | int | float] = wire(Map(Scalar()))


@dataclass(frozen=True, eq=False)
class Heartbeat(_Message):
    KIND: ClassVar[str] = "heartbeat"
    state: str = wire(Str())


@dataclass(frozen=True, eq=False)
class Shutdown(_Message):
    """learner -> rollout: stop. With ``rejoin`` the learner dropped this rollout (it made no
    progress in time): it abandons its work and says hello again instead of exiting."""

    KIND: ClassVar[str] = "shutdown"
    reason: str = wire(Str())
    rejoin: bool = wire(Bool(), default=False)


@dataclass(frozen=True, eq=False)
class RolloutError(_Message):
    """rollout -> learner: something went wrong; ``fatal`` means the rollout is going away."""

    KIND: ClassVar[str] = "rollout_error"
    message: str = wire(Str())
    fatal: bool = wire(Bool())


# --------------------------------------------------------------------------- work


@dataclass(frozen=True, eq=False)
class SamplingSpec(_Message):
    """Sampling parameters (vLLM semantics: ``top_k=-1`` disables top-k, ``temperature=0`` is greedy).

    A response ends at EOS, at one of ``stop_token_ids`` (both kept as its last token), or as soon
    as its text contains one of ``stop_strings``: then it keeps every token up to the one that
    completes the stop string (that token may go on past it), so the tokens trained on are those
    sampled, and the text decoded from them contains the stop string.
    """

    KIND: ClassVar[str] = ""
    INVARIANTS = staticmethod(invariants.sampling_spec)
    temperature: float = wire(Float(lo=0, note=" (0: greedy)"))
    top_p: float = wire(Float(above=0, hi=1))
    top_k: int = wire(Int(lo=-1))
    max_new_tokens: int = wire(Int(lo=1))
    # EOS, the stop tokens and stop strings cannot end a response shorter than this (keyword-only:
    # declared here for its place on the wire)
    min_new_tokens: int = wire(Int(lo=0), default=0, kw_only=True)
    stop_token_ids: list[int] = wire(List(TokenId(), "max_array_len"))
    # the run's sampling seed; every sample derives its own (see `sample_seed`)
    seed: int | None = wire(Optional(Int()))
    stop_strings: list[str] = wire(List(Str(non_empty=True), "max_array_len"), default_factory=list)

    def sample_seed(self, sample_number: int) -> int | None:
        """The vLLM seed of the run's `sample_number`-th sample (None: unseeded).

        Samples are numbered across the whole run, so no two samples share a seed: every draw is
        independent, yet a run is reproducible from its seed. Seeds live in [0, 2**32) because
        the CPU generator (mt19937) reads only the low 32 bits; the run seed is mixed into an
        offset, so runs with different seeds use different, not merely shifted, streams.
        """
        if self.seed is None:
            return None
        return (_mix64(self.seed) + sample_number) % SEED_SPACE


@dataclass(frozen=True, eq=False)
class PromptSpec(_Message):
    KIND: ClassVar[str] = ""
    INVARIANTS = staticmethod(invariants.prompt_spec)
    prompt_id: int = wire(Int())
    token_ids: np.ndarray = wire(Array("int32"))  # [P], P >= 1
    label: str | None = wire(Optional(Str()))


@dataclass(frozen=True, eq=False)
class WorkGrant(_Message):
    """learner -> rollout: generate ``n_samples`` completions for each prompt.

    The rollout must have applied weights of version >= ``min_weight_version``
    before generating for this grant. An ``evaluation`` grant asks for held-out evaluation samples
    of weight version ``step`` (at least; see PackedBatch): they are scored, never trained on.
    """

    KIND: ClassVar[str] = "work_grant"
    INVARIANTS = staticmethod(invariants.work_grant)
    grant_id: int = wire(Int(lo=0))
    step: int = wire(Int(lo=0))
    min_weight_version: int = wire(Int(lo=0))
    n_samples: int = wire(Int(lo=1))
    sampling: SamplingSpec = wire(Nested(SamplingSpec))
    # prompt token ids travel as two frames: prompt_tokens (all concatenated), prompt_cu_seqlens
    prompts: list[PromptSpec] = wire(Ragged(PromptSpec, array="token_ids", prefix="prompt",
                                            max_len="max_sequences", min_len=1))
    evaluation: bool = wire(Bool(), default=False)

    def request_seed(self, prompt_index: int, grant_id: int | None = None) -> int | None:
        """The vLLM seed of the request for prompt `prompt_index` (None: unseeded).

        vLLM gives sample i of a request with n samples the seed `seed + i`, so a request gets a
        block of `n_samples` consecutive sample numbers. Every grant of a run holds the same number
        of prompts (every evaluation grant too, with a sampling seed of their own), so block
        `grant_id * len(prompts) + prompt_index` is the run's own for that request. `grant_id` overrides this grant's id: the grant that first generated a batch.
        """
        grant = self.grant_id if grant_id is None else grant_id
        return self.sampling.sample_seed((grant * len(self.prompts) + prompt_index) * self.n_samples)


@dataclass(frozen=True, eq=False)
class PackedBatch(_Message):
    """rollout -> learner: B packed sequences (prompt followed by response).

    Sequence ``b`` is ``tokens[cu_seqlens[b]:cu_seqlens[b+1]]``: its first
    ``prompt_lens[b]`` tokens are the prompt, the rest the response.
    ``behaviour_logprobs[i]`` is log p(tokens[i] | earlier tokens of its
    sequence) under the behaviour policy for response tokens and exactly 0 on
    prompt tokens.  ``loss_mask`` is 1 exactly on trained response tokens (0 on
    every prompt token).

    A weight update can reach the engine while a sequence is being generated
    (it is then recomputed with the new weights and goes on): its tokens came
    from the versions ``weight_versions[b]`` (the version it started with, which
    staleness counts from) to ``last_weight_versions[b]`` (the newest one; equal
    when no update arrived meanwhile).  The behaviour log-probs are those of the
    weights that sampled each token.

    ``evaluation`` echoes the grant's: the batch answers an evaluation grant, so a recording
    tells which of its batches a resumed run may never train on.
    """

    KIND: ClassVar[str] = "packed_batch"
    INVARIANTS = staticmethod(invariants.packed_batch)
    grant_id: int = wire(Int(lo=0))
    step: int = wire(Int(lo=0))
    tokens: np.ndarray = wire(Array("int32"))  # [T]
    cu_seqlens: np.ndarray = wire(Array("int32"))  # [B+1]
    prompt_lens: np.ndarray = wire(Array("int32"))  # [B]
    loss_mask: np.ndarray = wire(Array("uint8"))  # [T]
    behaviour_logprobs: np.ndarray = wire(Array("float32"))  # [T]
    prompt_ids: np.ndarray = wire(Array("int64"))  # [B]
    sample_indices: np.ndarray = wire(Array("int32"))  # [B]
    weight_versions: np.ndarray = wire(Array("int32"))  # [B]
    last_weight_versions: np.ndarray = wire(Array("int32"))  # [B], >= weight_versions
    finish_reasons: list[str] = wire(List(Choice(FINISH_REASONS), "max_sequences"))  # len B
    labels: list[str | None] = wire(List(Optional(Str()), "max_sequences"))  # len B
    # engine time spent generating these sequences (shared steps split evenly)
    gen_seconds: float = wire(Float(lo=0))
    evaluation: bool = wire(Bool(), default=False)

    #: name -> dtype of the array fields (one raw frame each, in this order)
    ARRAY_DTYPES: ClassVar[Mapping[str, str]]

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_lens(self) -> np.ndarray:
        """int32 [B] total length (prompt + response) of each sequence."""
        return np.diff(self.cu_seqlens).astype(np.int32, copy=False)

    @property
    def response_lens(self) -> np.ndarray:
        """int32 [B] response length of each sequence."""
        return (self.seq_lens - self.prompt_lens).astype(np.int32, copy=False)


PackedBatch.ARRAY_DTYPES = {name: spec.dtype for name, spec in wire_fields(PackedBatch) if isinstance(spec, Array)}


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class TensorMeta(Schema):
    """Where one weight tensor lives: ``buckets[bucket][offset:offset+nbytes]``, C order, little-endian."""

    name: str = wire(Str())
    dtype: str = wire(Choice(WEIGHT_DTYPES, code="bad_dtype"))
    shape: tuple[int, ...] = wire(Shape())
    bucket: int = wire(Int())
    offset: int = wire(Int(lo=0))
    nbytes: int = wire(Int(lo=0))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class WeightUpdate(_Message):
    """learner -> rollout: new policy weights packed into a few large raw byte buckets.

    Each bucket is one frame on the wire.  Tensor data is raw little-endian C
    order bytes described by a :class:`TensorMeta`.  After decode, buckets are
    read-only memoryviews of the received frames.

    bfloat16: numpy has no bfloat16, so :meth:`array` gives bf16
    tensors as ``uint16`` arrays holding the raw bit pattern.  A torch
    receiver rebuilds the tensor with
    ``torch.from_numpy(arr.copy()).view(torch.bfloat16)`` or, without the copy,
    ``torch.frombuffer(upd.tensor_bytes(meta), dtype=torch.bfloat16).view(meta.shape)``
    (``tensor_bytes`` works for every dtype).
    """

    KIND: ClassVar[str] = "weight_update"
    INVARIANTS = staticmethod(invariants.weight_update)
    version: int = wire(Int(lo=0))
    tensors: list[TensorMeta] = wire(List(Nested(TensorMeta), "max_tensors"))
    buckets: list[bytes | bytearray | memoryview] = wire(Buffers(frame="bucket"))  # one frame each
    fingerprint: dict[str, str] = wire(Map(Str()))

    def tensor_bytes(self, meta: TensorMeta | str) -> memoryview:
        """Raw bytes of one tensor (a memoryview slice of its bucket, no copy)."""
        if isinstance(meta, str):
            meta = self._by_name(meta)
        view = byte_view(self.buckets[meta.bucket])
        return view[meta.offset : meta.offset + meta.nbytes]

    def array(self, meta: TensorMeta | str) -> np.ndarray:
        """One tensor as a numpy view of its bucket (bfloat16 -> uint16 bit pattern)."""
        if isinstance(meta, str):
            meta = self._by_name(meta)
        dt = numpy_storage_dtype(meta.dtype)
        return np.frombuffer(self.tensor_bytes(meta), dtype=dt).reshape(meta.shape)

    @property
    def total_bytes(self) -> int:
        return sum(memoryview(b).nbytes for b in self.buckets)

    def header(self, relay: list[RelayTarget] = (), fanout: int = 1) -> WeightHeader:
        """The :class:`WeightHeader` that streams this update (its buckets: :meth:`bucket_messages`)."""
        return WeightHeader(version=self.version, tensors=list(self.tensors),
                            bucket_sizes=[byte_view(b).nbytes for b in self.buckets],
                            fingerprint=dict(self.fingerprint), relay=list(relay), fanout=fanout)

    def bucket_messages(self) -> list[WeightBucket]:
        """Each bucket as a :class:`WeightBucket` (views of this update's buckets, no copy)."""
        return [WeightBucket(version=self.version, index=k, data=b) for k, b in enumerate(self.buckets)]

    def _by_name(self, name: str) -> TensorMeta:
        for meta in self.tensors:
            if meta.name == name:
                return meta
        raise KeyError(name)


@dataclass(frozen=True)
class RelayTarget(Schema):
    """A rollout's relay socket: where weight buckets are forwarded to it, and the name of its CURVE key
    (``rollout-N``; its public key ``rollout-N.key`` in ``transport.curve_dir`` authenticates it)."""

    INVARIANTS = staticmethod(invariants.relay_target)
    address: str = wire(Str())
    key_name: str = wire(Str())


@dataclass(frozen=True, eq=False)
class WeightHeader(_Message):
    """learner (or a relaying rollout) -> rollout: the first message of a streamed weight update.

    The update's tensors arrive next as ``len(bucket_sizes)`` :class:`WeightBucket` messages of the
    same version, in index order, each holding the raw bytes of the tensors whose ``bucket`` is its
    index (:class:`TensorMeta` as in :class:`WeightUpdate`), so a receiver loads and forwards bucket k
    while k+1 is on the way. ``fingerprint`` is the learner's. ``relay`` lists the receiver's
    descendants in the relay tree: it forwards the header and every bucket to its children,
    ``relay_children(relay, fanout)``, each child with its own descendants (empty: a leaf).
    """

    KIND: ClassVar[str] = "weight_header"
    INVARIANTS = staticmethod(invariants.weight_header)
    version: int = wire(Int(lo=0))
    tensors: list[TensorMeta] = wire(List(Nested(TensorMeta), "max_tensors"))
    bucket_sizes: list[int] = wire(List(Int(lo=0), "max_buckets"))
    fingerprint: dict[str, str] = wire(Map(Str()))
    relay: list[RelayTarget] = wire(List(Nested(RelayTarget), "max_sequences"))
    fanout: int = wire(Int(lo=1))

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_sizes)


@dataclass(frozen=True, eq=False)
class WeightBucket(_Message):
    """learner (or a relaying rollout) -> rollout: bucket ``index`` of the streamed update ``version``
    (see :class:`WeightHeader`); ``data`` is a read-only view of the received frame after decode."""

    KIND: ClassVar[str] = "weight_bucket"
    INVARIANTS = staticmethod(invariants.weight_bucket)
    version: int = wire(Int(lo=0))
    index: int = wire(Int(lo=0))
    data: np.ndarray = wire(Array("uint8"))  # the bucket's bytes (a view of the frame after decode)


@dataclass(frozen=True, eq=False)
class WeightCredit(_Message):
    """rollout -> whoever streams it weight buckets (the learner, or its relay parent): it has let go of
    bucket ``index`` of version ``version`` (its engine loaded it, or set the version aside whole while it
    may not load, and it went out to the rollout's relay children), so the next bucket may come. A sender
    sends a receiver one bucket at a time, each once the previous one is credited (:mod:`protocol.credit`)."""

    KIND: ClassVar[str] = "weight_credit"
    INVARIANTS = staticmethod(invariants.weight_bucket)
    version: int = wire(Int(lo=0))
    index: int = wire(Int(lo=0))


#: Length of an NCCL unique id (``ncclUniqueId``): what a member needs to join an NCCL communicator.
NCCL_UNIQUE_ID_BYTES = 128


@dataclass(frozen=True, eq=False)
class WeightGroupInvite(_Message):
    """learner -> rollout, after its hello (transport.weight_transfer nccl): join the NCCL weight group
    with this id, the rollout's engine workers as ranks ``first_rank`` .. ``first_rank`` + workers - 1 of
    ``world_size`` (rank 0 is learner rank 0). The id is the group's whole rendezvous: it travels here,
    over the authenticated ZeroMQ channel, and nothing is exchanged through a side store."""

    KIND: ClassVar[str] = "weight_group_invite"
    INVARIANTS = staticmethod(invariants.weight_group_invite)
    unique_id: np.ndarray = wire(Array("uint8"))  # [NCCL_UNIQUE_ID_BYTES]
    first_rank: int = wire(Int(lo=1))
    world_size: int = wire(Int(lo=2))


def relay_children(descendants: list[RelayTarget], fanout: int) -> list[tuple[RelayTarget, list[RelayTarget]]]:
    """Split a relay node's descendants into at most ``fanout`` subtrees of nearly equal size.

    Returns ``[(child, the child's descendants), ...]``: each subtree is a contiguous run of
    ``descendants`` whose first entry is the child. Applied at every node, this builds a tree of depth
    about log_fanout(n) (fanout 1: a chain), in which every node sends each bucket ``fanout`` times at most.
    """
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1, got {fanout}")
    count = min(fanout, len(descendants))
    bounds = [round(i * len(descendants) / count) for i in range(count + 1)] if count else [0]
    return [(descendants[a], descendants[a + 1: b]) for a, b in zip(bounds, bounds[1:])]


def relay_height(descendants: int, fanout: int) -> int:
    """Hops from a relay node to its farthest descendant (0: a leaf) in the tree :func:`relay_children` builds
    from its ``descendants`` (a count). Its subtrees differ in size by one at most, so the largest, of
    ``ceil(n / min(fanout, n))`` nodes, is the deepest: ``h(0) = 0``, ``h(n) = 1 + h(ceil(n / min(fanout, n)) - 1)``."""
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1, got {fanout}")
    height = 0
    while descendants > 0:
        descendants = -(-descendants // min(fanout, descendants)) - 1
        height += 1
    return height


@dataclass(frozen=True, eq=False)
class WeightAck(_Message):
    """rollout -> learner after applying a WeightUpdate (echoes the fingerprint it saw)."""

    KIND: ClassVar[str] = "weight_ack"
    version: int = wire(Int(lo=0))
    fingerprint: dict[str, str] = wire(Map(Str()))
    apply_seconds: float = wire(Float(lo=0))


def pack_weight_buckets(
    named_arrays: Iterable[tuple[str, str, tuple[int, ...], Any]],
    bucket_bytes: int,
    *,
    align: int = 64,
) -> tuple[list[TensorMeta], list[memoryview]]:
    """Pack tensors into a few large byte buckets for a :class:`WeightUpdate`.

    ``named_arrays`` yields ``(name, dtype_str, shape, data)`` where ``data`` is
    any C-contiguous bytes-like object (numpy array, bytes, memoryview) holding
    exactly ``prod(shape) * itemsize`` bytes in little-endian C order (for
    bfloat16 pass the raw 2-byte data, e.g. ``t.view(torch.int16).numpy()``).
    Tensors are laid out greedily in order, each at an ``align``-byte aligned
    offset; a new bucket starts when the next tensor would overflow
    ``bucket_bytes`` (a tensor larger than ``bucket_bytes`` gets a bucket of
    its own).  Each tensor's data is copied into its bucket as soon as it is
    yielded, so ``named_arrays`` may be a generator that releases a tensor
    once the next one is asked for (a model gathered one layer at a time).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if align <= 0:
        raise ValueError(f"align must be > 0, got {align}")
    metas: list[TensorMeta] = []
    buckets: list[np.ndarray] = []
    sizes: list[int] = []
    seen: set[str] = set()
    cur = -1
    end = 0
    for name, dtype, shape, data in named_arrays:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}; allowed: {sorted(WEIGHT_DTYPES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
        try:
            view = byte_view(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: data must be a C-contiguous bytes-like object ({exc})") from None
        nbytes = math.prod(shape) * WEIGHT_DTYPES[dtype]
        if view.nbytes != nbytes:
            raise ValueError(
                f"tensor {name!r}: {dtype} shape {shape} needs {nbytes} bytes, data has {view.nbytes}"
            )
        offset = -(-end // align) * align if nbytes else end  # empty tensors need no alignment / space
        if cur < 0 or (end > 0 and offset + nbytes > bucket_bytes):
            # zeros come from calloc: pages not written (the unused tail of the last bucket) cost
            # no memory, and a bucket never moves while it fills
            buckets.append(np.zeros(max(bucket_bytes, nbytes), np.uint8))
            sizes.append(0)
            cur += 1
            offset = 0
        metas.append(TensorMeta(name, dtype, shape, cur, offset, nbytes))
        buckets[cur][offset : offset + nbytes] = np.frombuffer(view, np.uint8)
        end = sizes[cur] = offset + nbytes
    return metas, [memoryview(b[:size]) for b, size in zip(buckets, sizes)]


# --------------------------------------------------------------------------- envelope

Message = Union[Hello, WorkGrant, PackedBatch, WeightUpdate, WeightHeader, WeightBucket, WeightCredit, WeightGroupInvite,
                WeightAck, Heartbeat, Shutdown, RolloutError]

#: kind string -> message class
MESSAGE_TYPES: Mapping[str, type] = {
    cls.KIND: cls
    for cls in (Hello, WorkGrant, PackedBatch, WeightUpdate, WeightHeader, WeightBucket, WeightCredit, WeightGroupInvite,
                WeightAck, Heartbeat, Shutdown, RolloutError)
}


@dataclass(frozen=True, eq=False)
class Envelope(_ValueEquality):
    """A decoded message with its header fields."""

    schema_version: int
    kind: str
    run_id: str
    producer_id: str
    seq: int
    weight_version: int
    body: Message
