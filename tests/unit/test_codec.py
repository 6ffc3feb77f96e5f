"""dkv.kvstore.codec: entry <-> checksummed frames; exact round trips and detection of every defect."""

from __future__ import annotations

import ast
import hashlib
import json
import pathlib
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV
from dkv.kvstore.errors import CorruptEntry, EntryTooLarge, InvalidEntry
from dkv.testing import synthetic_entry

SMALL_FRAME = 4096


def _small(seed=0, **kw) -> CompressedKV:
    args = dict(seq_len=300, num_layers=2, num_kv_heads=2, head_dim=16, keep_fraction=0.5, page_size=4, seed=seed)
    args.update(kw)
    return synthetic_entry(**args)


def assert_same_entry(a: CompressedKV, b: CompressedKV) -> None:
    assert a.identity == b.identity
    assert a.key == b.key
    assert a.importance == b.importance
    assert a.derived == b.derived
    assert a.page_size == b.page_size
    assert (a.num_kv_heads, a.head_dim, a.format_version) == (b.num_kv_heads, b.head_dim, b.format_version)
    assert a.num_layers == b.num_layers
    for la, lb in zip(a.layers, b.layers):
        for name in la.TENSOR_FIELDS:
            ta, tb = getattr(la, name), getattr(lb, name)
            if ta is None:
                assert tb is None, name
                continue
            assert tb is not None, name
            assert ta.dtype == tb.dtype, name
            assert ta.shape == tb.shape, name
            assert torch.equal(ta, tb), name


ENTRY_KINDS = {
    "float16": dict(dtype=torch.float16),
    "bfloat16": dict(dtype=torch.bfloat16),
    "float32": dict(dtype=torch.float32),
    "int8": dict(quant_scheme="int8"),
    "int4": dict(quant_scheme="int4"),
    "mixed": dict(quant_scheme="mixed"),
}


@pytest.mark.parametrize("kind", list(ENTRY_KINDS))
@pytest.mark.parametrize("max_frame_bytes", [codec.MAX_FRAME_BYTES, SMALL_FRAME])
def test_round_trip_exact(kind, max_frame_bytes):
    entry = _small(**ENTRY_KINDS[kind]).replace(importance=0.8125, derived=("shrink:0.5", "quant:int8"))
    frames = codec.encode(entry, max_frame_bytes=max_frame_bytes)
    assert all(isinstance(f, bytes) for f in frames)
    if max_frame_bytes == codec.MAX_FRAME_BYTES:
        assert len(frames) == 2  # header + one data frame
    else:
        assert len(frames) > 3
    assert all(len(f) <= max_frame_bytes for f in frames)
    out = codec.decode(frames)
    assert_same_entry(entry, out)
    out.validate()


def test_round_trip_odd_row_counts_and_empty_head():
    # Odd row counts make packed/bit tensors of odd byte lengths: later tensors are unaligned.
    for scheme in ("none", "int8", "int4", "mixed"):
        entry = _small(seq_len=37, num_kv_heads=3, keep_fraction=1.0, quant_scheme=scheme)
        assert_same_entry(entry, codec.decode(codec.encode(entry, SMALL_FRAME)))
    entry = _small()
    layer = entry.layers[0]
    n0 = int(layer.head_offsets[1])
    from dkv.kvstore.entry import make_layer

    empty_head = make_layer(
        [layer.positions[:n0].long(), torch.empty(0, dtype=torch.long)],
        [layer.keys[:n0], layer.keys[:0]],
        [layer.values[:n0], layer.values[:0]],
        [layer.scores[:n0], layer.scores[:0]],
        entry.page_size,
    )
    entry = entry.replace(layers=[empty_head, entry.layers[1]])
    entry.validate()
    assert_same_entry(entry, codec.decode(codec.encode(entry, SMALL_FRAME)))


def test_frames_of_a_20mb_entry_stay_under_4_mib():
    entry = synthetic_entry(seq_len=1280, num_layers=4, num_kv_heads=8, head_dim=128)
    assert entry.nbytes > 20_000_000
    frames = codec.encode(entry)
    assert len(frames) >= 1 + entry.nbytes // (4 << 20)
    assert all(len(f) <= codec.MAX_FRAME_BYTES <= 4 << 20 for f in frames)
    header = codec.parse_header(frames[0])
    assert header.data_bytes == entry.stored_nbytes
    assert header.total_frames == len(frames)
    assert_same_entry(entry, codec.decode(frames))


def test_header_describes_entry():
    entry = _small(quant_scheme="int8")
    frames = codec.encode(entry, SMALL_FRAME)
    h = codec.parse_header(frames[0])
    assert h.identity == entry.identity and h.key == entry.key
    assert (h.num_layers, h.num_kv_heads, h.head_dim, h.page_size) == (2, 2, 16, 4)
    assert h.kept_tokens_per_layer() == entry.kept_tokens()
    assert h.total_frames == len(frames)
    assert h.data_bytes == entry.stored_nbytes
    assert len(h.entry_id) == 8
    assert [t.name for t in h.tensors if t.layer == 0] == list(entry.stored_layers()[0])
    for f in frames[1:]:
        pf = codec.parse_frame(f)
        assert pf.kind == codec.KIND_DATA and pf.entry_id == h.entry_id and pf.total == len(frames)


def test_encode_rejects_bad_frame_size():
    entry = _small()
    with pytest.raises(ValueError):
        codec.encode(entry, max_frame_bytes=codec.FRAME_HEAD_BYTES + 100)
    with pytest.raises(ValueError):
        codec.encode(entry, max_frame_bytes=(4 << 20) + 1)
    assert all(len(f) <= 4 << 20 for f in codec.encode(entry, max_frame_bytes=4 << 20))


def test_frame_over_4_mib_is_rejected():
    big = codec._frame(codec.KIND_DATA, b"\0" * 8, 1, 2, [bytes(4 << 20)])
    with pytest.raises(CorruptEntry):
        codec.parse_frame(big)


def test_frame_head_layout():
    entry = _small()
    f = codec.encode(entry, SMALL_FRAME)[1]
    magic, version, kind, flags, entry_id, seq, total, length, reserved = codec.HEAD.unpack_from(f)
    assert (magic, version, kind, flags, seq, reserved) == (b"DKVF", codec.FORMAT_VERSION, 1, 0, 1, 0)
    assert length == len(f) - 40 and codec.FRAME_HEAD_BYTES == 40


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    fs = codec.encode(_small(quant_scheme="mixed"), SMALL_FRAME)
    assert len(fs) >= 4
    return fs


def test_truncated_stream_dropped_last_frame(frames):
    with pytest.raises(CorruptEntry, match="truncated"):
        codec.decode(frames[:-1])
    with pytest.raises(CorruptEntry):
        codec.decode(frames[:1])
    with pytest.raises(CorruptEntry, match="no frames"):
        codec.decode([])


def test_dropped_middle_frame(frames):
    with pytest.raises(CorruptEntry):
        codec.decode(frames[:2] + frames[3:])


@pytest.mark.parametrize("which", [0, 1, -1])
@pytest.mark.parametrize("cut", [1, 7, 39, 100])
def test_truncated_frame(frames, which, cut):
    fs = list(frames)
    fs[which] = fs[which][:-cut]
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


def test_frame_shorter_than_head(frames):
    with pytest.raises(CorruptEntry, match="shorter than"):
        codec.parse_frame(frames[1][:20])
    with pytest.raises(CorruptEntry):
        codec.decode([frames[0], b""] + frames[2:])


def test_frame_with_extra_bytes(frames):
    fs = list(frames)
    fs[1] = fs[1] + b"\0"
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


@pytest.mark.parametrize("i,j", [(1, 2), (2, 3), (0, 1), (1, -1)])
def test_swapped_frames(frames, i, j):
    fs = list(frames)
    fs[i], fs[j] = fs[j], fs[i]
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


@pytest.mark.parametrize("i", [0, 1, 2, -1])
def test_duplicated_frame(frames, i):
    fs = list(frames)
    fs.insert(i if i >= 0 else len(fs), fs[i])
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


def test_header_frame_twice_or_data_first(frames):
    with pytest.raises(CorruptEntry, match="header frame first"):
        codec.decode(frames[1:])
    with pytest.raises(CorruptEntry):
        codec.decode([frames[0], frames[0]] + frames[1:])


def test_frame_from_another_entry_with_same_shapes(frames):
    other = codec.encode(_small(seed=1, quant_scheme="mixed"), SMALL_FRAME)
    assert [len(f) for f in other] == [len(f) for f in frames]  # same shapes, same layout
    for i in range(1, len(frames)):
        fs = list(frames)
        fs[i] = other[i]
        with pytest.raises(CorruptEntry, match="another entry"):
            codec.decode(fs)
    with pytest.raises(CorruptEntry):
        codec.decode([other[0]] + frames[1:])


def test_frame_from_another_entry_with_same_identity_and_shapes():
    """Same tokens, recipe and shapes, other K/V: the headers differ by the data hash."""
    tokens = list(range(300))
    a = codec.encode(_small(seed=0, token_ids=tokens), SMALL_FRAME)
    b = codec.encode(_small(seed=1, token_ids=tokens), SMALL_FRAME)
    assert a[0] != b[0] and codec.parse_header(a[0]).key == codec.parse_header(b[0]).key
    with pytest.raises(CorruptEntry, match="another entry"):
        codec.decode(a[:2] + [b[2]] + a[3:])


def test_foreign_frame_relabelled_with_this_entry_id_fails_the_whole_data_check():
    tokens = list(range(300))
    a = codec.encode(_small(seed=0, token_ids=tokens), SMALL_FRAME)
    b = codec.encode(_small(seed=1, token_ids=tokens), SMALL_FRAME)
    fa, fb = codec.parse_frame(a[2]), codec.parse_frame(b[2])
    forged = codec._frame(codec.KIND_DATA, fa.entry_id, fa.seq, fa.total, [bytes(fb.payload)])
    codec.parse_frame(forged)  # a valid frame on its own
    if len(fb.payload) == len(fa.payload):
        with pytest.raises(CorruptEntry, match="not the entry's"):
            codec.decode(a[:2] + [forged] + a[3:])


def _flip(frame: bytes, pos: int, xor: int = 0x01) -> bytes:
    b = bytearray(frame)
    b[pos] ^= xor
    return bytes(b)


@pytest.mark.parametrize("pos", [0, 4, 6, 7, 8, 16, 20, 24, 28, 32, 39, 40, 41, 1000, -1])
@pytest.mark.parametrize("which", [0, 1, -1])
def test_flipped_byte_at_fixed_positions(frames, which, pos):
    fs = list(frames)
    fs[which] = _flip(fs[which], pos % len(fs[which]))
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_byte_anywhere_is_detected(frames, data):
    which = data.draw(st.integers(0, len(frames) - 1), label="frame")
    pos = data.draw(st.integers(0, len(frames[which]) - 1), label="byte")
    xor = data.draw(st.integers(1, 255), label="xor")
    fs = list(frames)
    fs[which] = _flip(fs[which], pos, xor)
    with pytest.raises(CorruptEntry):
        codec.decode(fs)


def test_parse_frame_rejects_bad_magic_version_kind():
    entry_id = b"\1" * 8

    def frame(magic=codec.MAGIC, version=codec.FORMAT_VERSION, kind=1, seq=1, total=2):
        payload = b"x" * 10
        head = codec.HEAD.pack(magic, version, kind, 0, entry_id, seq, total, len(payload), 0)
        import xxhash

        return head + struct.pack("<Q", xxhash.xxh3_64(head + payload).intdigest()) + payload

    assert codec.parse_frame(frame()).seq == 1
    with pytest.raises(CorruptEntry, match="magic"):
        codec.parse_frame(frame(magic=b"XXXX"))
    with pytest.raises(CorruptEntry, match="version"):
        codec.parse_frame(frame(version=codec.FORMAT_VERSION + 1))
    for kw in (dict(kind=2), dict(kind=0, seq=1), dict(kind=1, seq=0), dict(seq=2, total=2)):
        with pytest.raises(CorruptEntry, match="inconsistent"):
            codec.parse_frame(frame(**kw))


# ---------------------------------------------------------------------------------------------
# Malformed headers (valid checksum, bad content) -> InvalidEntry


def _header_json(frames) -> dict:
    return json.loads(bytes(codec.parse_frame(frames[0]).payload))


def _reframe(header: dict, frames) -> bytes:
    """A header frame for ``header`` (its entry_id the hash of the new payload, as encode makes it)."""
    payload = json.dumps(header).encode()
    entry_id = hashlib.blake2b(payload, digest_size=8).digest()
    return codec._frame(codec.KIND_HEADER, entry_id, 0, codec.parse_frame(frames[0]).total, [payload])


def _with_header(header_frame: bytes, frames) -> list[bytes]:
    """``frames`` under another header frame: the data frames re-stamped with its entry_id."""
    entry_id = codec.parse_frame(header_frame).entry_id
    data = [codec.parse_frame(f) for f in frames[1:]]
    return [header_frame] + [codec._frame(codec.KIND_DATA, entry_id, f.seq, f.total, [bytes(f.payload)]) for f in data]


def _overlap(h):
    h["tensors"][2][4] -= 4


def _gap(h):
    h["tensors"][2][4] += 4


def _exceeds(h):
    h["tensors"][-1][5] += 2
    h["data_bytes"] += 2


def _data_bytes_short(h):
    h["data_bytes"] -= 1


def _data_bytes_long(h):
    h["data_bytes"] += 1


def _nbytes_mismatch_shape(h):
    h["tensors"][0][3] = [h["tensors"][0][3][0] + 1]


def _unknown_name(h):
    h["tensors"][0][1] = "secret"


def _bad_dtype(h):
    h["tensors"][0][2] = "float64"


def _repeated(h):
    h["tensors"][1][1] = h["tensors"][0][1]


def _layer_out_of_range(h):
    h["tensors"][-1][0] = 7


def _three_dims(h):
    t = h["tensors"][5]  # keys of layer 0
    t[3] = [1, 1, t[5]]


def _negative_dim(h):
    h["tensors"][0][3] = [-1]


def _missing_identity(h):
    del h["identity"]


def _bad_key_part(h):
    h["identity"]["tenant"] = "../etc"


def _bad_recipe(h):
    h["identity"]["recipe"]["quant"] = "int3"


def _wrong_hash_count(h):
    h["identity"]["chunk_hashes"] = h["identity"]["chunk_hashes"] * 2


def _format_version(h):
    h["format_version"] = codec.FORMAT_VERSION + 1


def _zero_layers(h):
    h["num_layers"] = 0


def _tensors_not_list(h):
    h["tensors"] = 5


HEADER_DEFECTS = [
    _overlap,
    _gap,
    _exceeds,
    _data_bytes_short,
    _data_bytes_long,
    _nbytes_mismatch_shape,
    _unknown_name,
    _bad_dtype,
    _repeated,
    _layer_out_of_range,
    _three_dims,
    _negative_dim,
    _missing_identity,
    _bad_key_part,
    _bad_recipe,
    _wrong_hash_count,
    _format_version,
    _zero_layers,
    _tensors_not_list,
]


@pytest.mark.parametrize("defect", HEADER_DEFECTS, ids=[d.__name__.strip("_") for d in HEADER_DEFECTS])
def test_malformed_header_is_invalid_entry(frames, defect):
    h = _header_json(frames)
    defect(h)
    bad = _reframe(h, frames)
    with pytest.raises(InvalidEntry):
        codec.parse_header(bad)
    with pytest.raises(InvalidEntry):
        codec.decode(_with_header(bad, frames))


def test_reframed_unchanged_header_still_decodes(frames):
    # Control for the test above: the re-framing itself is not what fails.
    good = _reframe(_header_json(frames), frames)
    codec.decode(_with_header(good, frames))


def test_tensor_table_overlap_message(frames):
    h = _header_json(frames)
    _overlap(h)
    with pytest.raises(InvalidEntry, match=r"tensor 'scores' of layer 0: .* at offset"):
        codec.parse_header(_reframe(h, frames))
    h = _header_json(frames)
    _data_bytes_long(h)
    with pytest.raises(InvalidEntry, match="tensor table covers"):
        codec.parse_header(_reframe(h, frames))


def test_header_not_json(frames):
    payload = b"\x80not json{"
    bad = codec._frame(codec.KIND_HEADER, hashlib.blake2b(payload, digest_size=8).digest(), 0, len(frames), [payload])
    with pytest.raises(InvalidEntry, match="malformed"):
        codec.parse_header(bad)


def test_header_with_impossible_frame_count(frames):
    h = _header_json(frames)
    payload = json.dumps(h).encode()
    bad = codec._frame(
        codec.KIND_HEADER, hashlib.blake2b(payload, digest_size=8).digest(), 0, h["data_bytes"] + 2, [payload]
    )
    with pytest.raises(InvalidEntry, match="data frames cannot carry"):
        codec.parse_header(bad)


def test_a_header_altered_under_its_old_entry_id_is_corrupt(frames):
    h = _header_json(frames)
    h["importance"] = 0.5
    forged = codec._frame(
        codec.KIND_HEADER, codec.parse_frame(frames[0]).entry_id, 0, len(frames), [json.dumps(h).encode()]
    )
    with pytest.raises(CorruptEntry, match="header was altered"):
        codec.parse_header(forged)


def test_decoded_tensors_are_validated(frames):
    # A well-framed entry whose tensors are invalid (NaN) is rejected by decode, not returned.
    entry = _small()
    entry.layers[1].keys[0, 0] = float("nan")
    fs = codec.encode(entry, SMALL_FRAME)
    with pytest.raises(InvalidEntry, match="layer 1: keys"):
        codec.decode(fs)


# ---------------------------------------------------------------------------------------------
# FrameAssembler


def test_assembler_rejects_too_large_entry_at_header(frames):
    h = codec.parse_header(frames[0])
    asm = codec.FrameAssembler(max_entry_bytes=h.data_bytes - 1)
    with pytest.raises(EntryTooLarge, match=f"{h.data_bytes} bytes is over the limit"):
        asm.add(frames[0])
    assert asm.frames == [] and asm.data_received == 0
    with pytest.raises(EntryTooLarge):
        codec.check_frames(iter(frames), max_entry_bytes=h.data_bytes - 1)


def test_assembler_accepts_entry_at_the_limit(frames):
    h = codec.parse_header(frames[0])
    header, checked = codec.check_frames(frames, max_entry_bytes=h.data_bytes)
    assert header.data_bytes == h.data_bytes and checked == frames


def test_assembler_streams_and_finishes(frames):
    asm = codec.FrameAssembler()
    for i, f in enumerate(frames):
        asm.add(f)
        if i < len(frames) - 1:
            with pytest.raises(CorruptEntry, match="truncated"):
                asm.finish()
    header, checked = asm.finish()
    assert checked == frames and asm.data_received == header.data_bytes


def test_assembler_rejects_frame_after_the_last(frames):
    asm = codec.FrameAssembler()
    for f in frames:
        asm.add(f)
    with pytest.raises(CorruptEntry):
        asm.add(frames[-1])


# ---------------------------------------------------------------------------------------------
# No pickle


_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "shelve", "joblib", "cloudpickle"}


def _unsafe_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in _UNSAFE_MODULES or (node.value.id == "torch" and node.attr in ("load", "save")):
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append("allow_pickle=")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append("__import__")
    return found


def test_unsafe_use_detector_works():
    assert _unsafe_uses("import pickle\nx = pickle.loads(b'')") == ["pickle", "pickle.loads"]
    assert _unsafe_uses("from pickle import loads") == ["pickle"]
    assert _unsafe_uses("import torch\ntorch.load('x')") == ["torch.load"]
    assert _unsafe_uses("import numpy as np\nnp.load('x', allow_pickle=True)") == ["allow_pickle="]
    assert _unsafe_uses('"""No pickle: JSON only."""\nimport json') == []


def test_kvstore_never_uses_pickle():
    root = pathlib.Path(codec.__file__).parent
    sources = sorted(root.glob("*.py"))
    assert len(sources) >= 8
    offenders = {p.name: u for p in sources if (u := _unsafe_uses(p.read_text()))}
    assert offenders == {}
    # And no source line (outside prose) that imports or calls pickle by any spelling.
    code_lines = [
        line
        for p in sources
        for line in p.read_text().splitlines()
        if re.match(r"^\s*(import|from)\s", line) and "pickle" in line
    ]
    assert code_lines == []


def test_round_trip_keeps_key_of_recipe_with_int_ratio():
    entry = _small(keep_fraction=1)
    assert codec.decode(codec.encode(entry)).key == entry.key
