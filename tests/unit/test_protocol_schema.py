"""protocol.schema: the message classes are the single source of the wire layout and checks."""

from __future__ import annotations

from dataclasses import dataclass, fields

import msgpack
import pytest

from protocol import MESSAGE_TYPES, ProtocolError, encode
from protocol.limits import DEFAULT_LIMITS
from protocol.schema import Array, Float, Int, Schema, check_fields, wire, wire_fields

from .test_protocol_codec import HDR, make_batch, make_grant, make_weight_update


def test_every_message_field_has_a_wire_spec():
    for cls in MESSAGE_TYPES.values():
        assert [name for name, _ in wire_fields(cls)] == [f.name for f in fields(cls)]


def test_a_field_without_a_spec_is_refused():
    @dataclass(frozen=True)
    class Loose(Schema):
        a: int = wire(Int())
        b: int = 0

    with pytest.raises(TypeError, match="Loose.b has no wire spec"):
        Loose(a=1)


@pytest.mark.parametrize("msg", [make_batch(), make_grant(), make_weight_update()[0]], ids=lambda m: m.KIND)
def test_body_follows_the_declared_field_order(msg):
    body = msgpack.unpackb(bytes(encode(msg, **HDR)[0]), raw=False)["body"]
    in_body = [name for name, spec in wire_fields(type(msg)) if name in body]
    assert list(body) == in_body
    array_fields = [name for name, spec in wire_fields(type(msg)) if isinstance(spec, Array)]
    assert not set(array_fields) & set(body)  # arrays travel as frames


def test_float_ranges_name_the_field_and_bound():
    @dataclass(frozen=True)
    class Knobs(Schema):
        p: float = wire(Float(above=0, hi=1))
        t: float = wire(Float(lo=0, note=" (0: off)"))

    check_fields(Knobs(p=1.0, t=0.0), "knobs", DEFAULT_LIMITS)
    with pytest.raises(ProtocolError, match=r"knobs\.p: expected 0 < p <= 1, got 0\.0"):
        check_fields(Knobs(p=0.0, t=0.0), "knobs", DEFAULT_LIMITS)
    with pytest.raises(ProtocolError, match=r"knobs\.t: expected >= 0 \(0: off\), got -1\.0"):
        check_fields(Knobs(p=0.5, t=-1.0), "knobs", DEFAULT_LIMITS)
