"""dkv.services.wire: hand-rolled Frame messages must be byte-compatible with protobuf."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from dkv.kvstore.entry import Recipe
from dkv.kvstore.errors import InvalidEntry
from dkv.services import wire
from dkv.services.pb import common_pb2, store_pb2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append(n & 0x7F | 0x80)
        n >>= 7


def _field(number: int, wire_type: int, value) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + _varint(value)
    if wire_type == 1:
        return key + value.to_bytes(8, "little")
    if wire_type == 5:
        return key + value.to_bytes(4, "little")
    return key + _varint(len(value)) + value


def _pb_data(message: bytes):
    """protobuf's view of the message: its data, or None if protobuf rejects it."""
    try:
        return store_pb2.Frame.FromString(message).data
    except DecodeError:
        return None


def _payload(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


@pytest.mark.parametrize("n", [1, 127, 128, 16383, 16384, 300_000])
def test_frame_message_equals_protobuf(n):
    data = _payload(n)
    msg = wire.frame_message(data)
    assert msg == store_pb2.Frame(data=data).SerializeToString()
    assert wire.frame_message(memoryview(data)) == msg
    assert wire.frame_message(bytearray(data)) == msg


def test_frame_message_varint_lengths():
    assert wire.frame_message(b"x") == b"\x0a\x01x"
    assert wire.frame_message(_payload(127))[:2] == b"\x0a\x7f"
    assert wire.frame_message(_payload(128))[:3] == b"\x0a\x80\x01"
    assert wire.frame_message(_payload(300_000))[:4] == b"\x0a\xe0\xa7\x12"


def test_empty_frame_is_a_valid_frame_message():
    # proto3 leaves an empty bytes field out (b""); the explicit b"\x0a\x00" is the same message.
    msg = wire.frame_message(b"")
    assert store_pb2.Frame.FromString(msg).data == b""
    assert store_pb2.Frame(data=b"").SerializeToString() == b""
    assert bytes(wire.parse_frame_message(msg)) == b""
    assert bytes(wire.parse_frame_message(b"")) == b""


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300_000])
def test_parse_inverts_frame_message(n):
    data = _payload(n)
    msg = wire.frame_message(data)
    view = wire.parse_frame_message(msg)
    assert isinstance(view, memoryview)
    assert bytes(view) == data
    pb = store_pb2.Frame(data=data).SerializeToString()
    assert bytes(wire.parse_frame_message(pb)) == data


def test_parse_is_zero_copy_and_frame_message_reuses_it():
    msg = wire.frame_message(_payload(1000))
    view = wire.parse_frame_message(msg)
    assert view.obj is msg
    assert wire.frame_message(view) is msg  # forwarding a received frame does not copy it


EXTRA_FIELDS = [
    _field(2, 0, 150),
    _field(3, 1, 0x0102030405060708),
    _field(4, 2, b"unknown bytes"),
    _field(5, 5, 0xDEADBEEF),
    _field(1000, 0, 1),
    _field(2, 2, b""),
    _field((1 << 29) - 1, 0, 2**64 - 1),  # largest field number, largest varint
]


@pytest.mark.parametrize("extra", EXTRA_FIELDS)
@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_parse_accepts_unknown_fields(extra, where):
    data = _payload(300)
    frame = store_pb2.Frame(data=data).SerializeToString()
    msg = {"before": extra + frame, "after": frame + extra, "both": extra + frame + extra}[where]
    assert _pb_data(msg) == data  # protobuf agrees this is a Frame
    view = wire.parse_frame_message(msg)
    assert view is not None and bytes(view) == data
    # The fast path must not hand back a message with foreign fields as if it were Frame{data}.
    assert wire.frame_message(view) == frame


def test_last_data_field_wins_as_in_protobuf():
    msg = _field(1, 2, b"first") + _field(2, 0, 1) + _field(1, 2, b"second")
    assert _pb_data(msg) == b"second"
    assert bytes(wire.parse_frame_message(msg)) == b"second"


@pytest.mark.parametrize(
    "msg",
    [
        b"\x0a",  # key only
        b"\x0a\x05abc",  # length past the end
        b"\x0a\x80",  # truncated length varint
        b"\x0a\x01x\x10",  # truncated varint field
        b"\x0a\x01x\x19\x00\x00",  # truncated fixed64
        b"\x0a\x01x\x1d\x00",  # truncated fixed32
        b"\x0b\x00",  # wire type 3 (group start) is not accepted
        b"\x0e\x00",  # wire type 6 does not exist
        b"\x0f\x00",  # wire type 7 does not exist
        b"\xff" * 11,  # varint longer than 64 bits
        b"\x0a\xff\xff\xff\xff\x0f",  # length 2**32 - 1 on a short message
    ],
)
def test_parse_rejects_malformed(msg):
    assert wire.parse_frame_message(msg) is None


def test_parse_rejects_field_number_zero():
    msg = _field(1, 2, b"data") + b"\x00\x00"
    assert _pb_data(msg) is None
    assert wire.parse_frame_message(msg) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_never_raises_and_agrees_with_protobuf(message):
    result = wire.parse_frame_message(message)
    assert result is None or isinstance(result, memoryview)
    pb = _pb_data(message)
    if result is not None and pb is not None:
        assert bytes(result) == pb


_FIELDS = st.one_of(
    st.builds(lambda n, v: _field(n, 0, v), st.integers(2, 5000), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, v: _field(n, 1, v), st.integers(2, 5000), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, v: _field(n, 5, v), st.integers(2, 5000), st.integers(0, 2**32 - 1)),
    st.builds(lambda n, v: _field(n, 2, v), st.integers(1, 5000), st.binary(max_size=40)),
)


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(_FIELDS, min_size=1, max_size=6), data=st.data())
def test_truncated_messages_are_rejected(fields, data):
    msg = b"".join(fields)
    boundaries = {0}
    pos = 0
    for f in fields:
        pos += len(f)
        boundaries.add(pos)
    # valid as a whole: same data as protobuf
    full = wire.parse_frame_message(msg)
    assert full is not None and bytes(full) == _pb_data(msg)
    inside = [i for i in range(len(msg)) if i not in boundaries]
    if not inside:
        return
    cut = data.draw(st.sampled_from(inside), label="cut")
    assert _pb_data(msg[:cut]) is None  # protobuf agrees it is not a message
    assert wire.parse_frame_message(msg[:cut]) is None


# ---------------------------------------------------------------------------------------------
# Recipe <-> proto


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(),
        Recipe(method="snapkv", ratio=0.75, budget=0, quant="int4", chunk_size=128, params=(("window", 32.0),)),
        Recipe(
            method="pyramidkv",
            ratio=0.5,
            budget=512,
            quant="mixed",
            chunk_size=1,
            params=(("kernel", 5.0), ("beta", 0.125)),
        ),
        Recipe(method="full", quant="int8", chunk_size=65536),
    ],
)
def test_recipe_proto_round_trip(recipe):
    msg = wire.recipe_to_proto(recipe)
    assert isinstance(msg, common_pb2.Recipe)
    wire_bytes = msg.SerializeToString()
    back = wire.recipe_from_proto(common_pb2.Recipe.FromString(wire_bytes))
    assert back == recipe
    assert back.recipe_id == recipe.recipe_id


def test_recipe_from_empty_proto_is_default():
    assert wire.recipe_from_proto(common_pb2.Recipe()) == Recipe()


@pytest.mark.parametrize(
    "fields,name",
    [
        (dict(quant="int3"), "quant"),
        (dict(ratio=1.0), "ratio"),
        (dict(method="a/b"), "method"),
        (dict(chunk_size=70000), "chunk_size"),
    ],
)
def test_recipe_from_bad_proto_names_field(fields, name):
    with pytest.raises(InvalidEntry, match=f"recipe {name}"):
        wire.recipe_from_proto(common_pb2.Recipe(**fields))


# --- Summaries and Select checksums ------------------------------------------------------------------


def _summary() -> store_pb2.LayerSummary:
    t = store_pb2.Tensor(dtype="float16", shape=[2, 4], data=bytes(range(16)))
    return store_pb2.LayerSummary(
        layer=3,
        head_counts=store_pb2.Tensor(dtype="int32", shape=[1], data=b"\x05\0\0\0"),
        page_min=t,
        page_max=t,
        seq_len=40,
        num_layers=30,
        num_kv_heads=1,
        head_dim=4,
        page_size=16,
    )


def _pages(order) -> store_pb2.LayerPages:
    reply = store_pb2.LayerPages(layer=1, pages=[0, 2], tier="cpu")
    for name in order:
        reply.tensors[name].CopyFrom(store_pb2.Tensor(dtype="uint8", shape=[len(name)], data=name.encode()))
    return reply


def test_summary_and_pages_checksums_cover_the_key_and_every_field():
    base = wire.summary_checksum("t/m/r/h", _summary())
    assert wire.summary_checksum("t/m/r/h", _summary()) == base
    assert wire.summary_checksum("t/m/r/other", _summary()) != base  # a reply for another key
    for change in (
        lambda s: setattr(s, "layer", 4),
        lambda s: setattr(s, "seq_len", 41),
        lambda s: setattr(s, "page_size", 8),
        lambda s: s.page_max.shape.__setitem__(0, 4),
        lambda s: setattr(s.page_min, "data", bytes(16)),
        lambda s: setattr(s.head_counts, "dtype", "uint8"),
    ):
        changed = _summary()
        change(changed)
        assert wire.summary_checksum("t/m/r/h", changed) != base
    pages = wire.pages_checksum("k", _pages(["keys", "values", "positions"]))
    assert wire.pages_checksum("k", _pages(["positions", "values", "keys"])) == pages  # map order does not count
    for other in (_pages(["keys", "values"]), _pages(["keys", "values", "positions", "scores"])):
        assert wire.pages_checksum("k", other) != pages
    swapped = _pages(["keys", "values", "positions"])
    swapped.tier, swapped.pages[1] = "redis", 3
    assert wire.pages_checksum("k", swapped) != pages and wire.pages_checksum("k2", _pages(["keys"])) != pages
