"""Errors raised by the protocol layer.

Every problem with a message on the wire (or with a message about to be put
on the wire) is reported as a :class:`ProtocolError` carrying a short, stable
``reason_code`` (meant for counters / metrics labels) and a human readable
``message`` that says what is wrong and where (field, expected vs got).
"""

from __future__ import annotations

__all__ = ["ProtocolError", "REASON_CODES"]

#: Every reason code the protocol layer emits.  They are part of the contract:
#: dashboards count rejections by these strings, so never rename one.
REASON_CODES: frozenset[str] = frozenset(
    {
        "bad_msgpack",  # frame 0 is not a valid (or is a too-nested / duplicate-key) msgpack map
        "bad_type",  # a field or frame has the wrong Python / wire type
        "schema_version",  # header schema_version is not SCHEMA_VERSION
        "unknown_kind",  # header kind is not a known message kind
        "missing_field",  # a required field (or array frame) is absent
        "unknown_field",  # a field that the schema does not define is present
        "frame_count",  # number of frames != 1 + number of array descriptors
        "bad_dtype",  # array / tensor dtype not the expected (or an allowed) one
        "bad_shape",  # array rank / shape not the expected one
        "length_mismatch",  # byte length or element count disagrees between two places
        "out_of_bounds",  # an index / token id / offset lies outside its valid range
        "overlap",  # two weight tensors overlap inside a bucket
        "non_finite",  # NaN or +-inf where a finite number is required
        "too_large",  # something exceeds a DecodeLimits bound
        "bad_value",  # a scalar is outside its allowed range / set
        "bad_cu_seqlens",  # cu_seqlens does not start at 0, increase strictly, end at T
        "bad_prompt_len",  # prompt length < 1 or >= its sequence length (or empty prompt)
        "bad_loss_mask",  # loss_mask not in {0,1} or set on a prompt token
        "bad_logprobs",  # behaviour log-prob > 0 on a response token or != 0 on a prompt token
        "run_id",  # message belongs to another run
        "producer_id",  # header producer_id disagrees with the transport peer identity
        "seq",  # per-producer sequence number did not increase
        "bad_credit",  # a weight_credit for a bucket that does not await credit on that link
    }
)


class ProtocolError(ValueError):
    """A message violates the StreamRLHF wire contract.

    Attributes:
        reason_code: short stable string from :data:`REASON_CODES`.
        message: what is wrong and where.
    """

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"[{reason_code}] {message}")
        self.reason_code = reason_code
        self.message = message

    def __reduce__(self):  # keep picklable across processes
        return (type(self), (self.reason_code, self.message))
