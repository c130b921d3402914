"""StreamRLHF wire protocol: the single data contract between rollout and learner.

numpy only: this package must never import torch, nor anything from
``rollout/`` or ``learner/``.
"""

from .codec import DEFAULT_LIMITS, LOGPROB_SLACK, DecodeLimits, decode, encode, validate
from .dtypes import WEIGHT_DTYPES, numpy_storage_dtype
from .errors import REASON_CODES, ProtocolError
from .messages import (
    FINISH_REASONS,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Envelope,
    Heartbeat,
    Hello,
    Message,
    PackedBatch,
    PromptSpec,
    RolloutError,
    SamplingSpec,
    Shutdown,
    TensorMeta,
    RelayTarget,
    WeightAck,
    WeightBucket,
    WeightCredit,
    WeightGroupInvite,
    WeightHeader,
    WeightUpdate,
    WorkGrant,
    pack_weight_buckets,
    relay_children,
    relay_height,
)

# Imported on first use: the transport imports protocol.keys, and a package that imports a module
# as it starts makes `python -m protocol.keys` run a second copy of it (runpy's RuntimeWarning).
_TRANSPORT = ("LearnerEndpoint", "PeerUnreachableError", "RolloutClient", "free_tcp_port")


def __getattr__(name: str):
    if name in _TRANSPORT:
        from . import transport

        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION",
    "FINISH_REASONS",
    "WEIGHT_DTYPES",
    "MESSAGE_TYPES",
    "LOGPROB_SLACK",
    "Message",
    "Envelope",
    "Hello",
    "SamplingSpec",
    "PromptSpec",
    "WorkGrant",
    "PackedBatch",
    "TensorMeta",
    "WeightUpdate",
    "WeightHeader",
    "WeightBucket",
    "WeightCredit",
    "WeightGroupInvite",
    "RelayTarget",
    "relay_children",
    "relay_height",
    "WeightAck",
    "Heartbeat",
    "Shutdown",
    "RolloutError",
    "numpy_storage_dtype",
    "pack_weight_buckets",
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "encode",
    "decode",
    "validate",
    "ProtocolError",
    "REASON_CODES",
    "LearnerEndpoint",
    "RolloutClient",
    "PeerUnreachableError",
    "free_tcp_port",
]
