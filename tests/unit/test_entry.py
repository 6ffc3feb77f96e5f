"""dkv.kvstore.entry: recipes, keys, identities, layer construction and entry validation."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math

import pytest
import torch

from dkv.kvstore import quant
from dkv.kvstore.entry import (
    CompressedKV,
    EntryKey,
    Identity,
    LayerKV,
    Recipe,
    head_of_rows,
    make_layer,
    page_of_rows,
    page_summaries,
    quantize_layer,
    validate_entry,
)
from dkv.kvstore.errors import InvalidEntry
from dkv.testing import synthetic_entry

# ---------------------------------------------------------------------------------------------
# Recipe


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_recipe_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(InvalidEntry, match=r"recipe ratio .* must be in \[0, 1\)"):
        Recipe(ratio=ratio)


@pytest.mark.parametrize("q", ["int3", "fp8", "", "INT8"])
def test_recipe_rejects_bad_quant(q):
    with pytest.raises(InvalidEntry, match=r"recipe quant .* must be one of \['int4', 'int8', 'mixed', 'none'\]"):
        Recipe(quant=q)


@pytest.mark.parametrize("method", ["", "snap kv", "a/b", "x" * 129, "kv:press", "é"])
def test_recipe_rejects_bad_method(method):
    with pytest.raises(InvalidEntry, match=r"recipe method .* must be 1-128 chars of \[A-Za-z0-9._-\]"):
        Recipe(method=method)


def test_recipe_rejects_bad_budget_and_chunk_size():
    with pytest.raises(InvalidEntry, match="budget"):
        Recipe(budget=-1)
    for cs in (0, (1 << 16) + 1):
        with pytest.raises(InvalidEntry, match="chunk_size"):
            Recipe(chunk_size=cs)


def test_recipe_accepts_boundaries():
    Recipe(ratio=0.0)
    Recipe(ratio=0.999)
    Recipe(chunk_size=1)
    Recipe(chunk_size=1 << 16)
    Recipe(method="A-z_0.9")


def test_recipe_id_is_blake2b_of_canonical_json():
    r = Recipe(method="snapkv", ratio=0.5, budget=64, quant="int4", chunk_size=128, params=(("window", 32),))
    canonical = json.dumps(
        {
            "budget": 64,
            "chunk_size": 128,
            "chunked": False,
            "method": "snapkv",
            "params": [["window", 32.0]],
            "quant": "int4",
            "ratio": 0.5,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert r.recipe_id == hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
    assert len(r.recipe_id) == 16


def test_recipe_id_stable_and_param_order_insensitive():
    a = Recipe(method="snapkv", ratio=0.5, params=(("window", 32.0), ("kernel", 5.0)))
    b = Recipe(method="snapkv", ratio=0.5, params=(("kernel", 5), ("window", 32)))
    assert a == b
    assert (
        a.recipe_id
        == b.recipe_id
        == Recipe(method="snapkv", ratio=0.5, params=(("window", 32.0), ("kernel", 5.0))).recipe_id
    )
    assert Recipe.from_dict(a.to_dict()) == a
    assert Recipe.from_dict(a.to_dict()).recipe_id == a.recipe_id


def test_recipe_id_differs_for_each_parameter():
    base = Recipe(method="snapkv", ratio=0.5, budget=0, quant="none", chunk_size=256, params=(("window", 32.0),))
    variants = [
        dataclasses.replace(base, method="pyramidkv"),
        dataclasses.replace(base, ratio=0.25),
        dataclasses.replace(base, budget=128),
        dataclasses.replace(base, quant="int8"),
        dataclasses.replace(base, chunk_size=128),
        dataclasses.replace(base, params=(("window", 64.0),)),
        dataclasses.replace(base, params=(("kernel", 32.0),)),
        dataclasses.replace(base, params=()),
    ]
    ids = {base.recipe_id} | {v.recipe_id for v in variants}
    assert len(ids) == len(variants) + 1


def test_recipe_id_independent_of_int_or_float_spelling():
    assert Recipe(ratio=0) == Recipe(ratio=0.0)  # dataclass equality already says they are the same
    assert Recipe(ratio=0).recipe_id == Recipe(ratio=0.0).recipe_id
    r = Recipe(ratio=0)
    assert Recipe.from_dict(r.to_dict()).recipe_id == r.recipe_id


def test_recipe_from_dict_rejects_malformed():
    with pytest.raises(InvalidEntry, match="recipe is malformed"):
        Recipe.from_dict({"method": "full"})
    with pytest.raises(InvalidEntry, match="recipe is malformed"):
        Recipe.from_dict({"method": "full", "ratio": "x", "budget": 0, "quant": "none", "chunk_size": 1})


# ---------------------------------------------------------------------------------------------
# EntryKey and Identity


def test_entry_key_str_parse_round_trip():
    k = EntryKey("tenant-1", "llama.3_8b", "0123abcd", "ff00" * 8)
    assert str(k) == "tenant-1/llama.3_8b/0123abcd/" + "ff00" * 8
    assert EntryKey.parse(str(k)) == k


@pytest.mark.parametrize("text", ["a/b", "../x", "", "a/b/c", "a/b/c/d/e", "a/b/c/", "/a/b/c", "a//b/c"])
def test_entry_key_parse_rejects_malformed(text):
    with pytest.raises(InvalidEntry):
        EntryKey.parse(text)


@pytest.mark.parametrize("bad", ["a/b", "../x", "", "x" * 129, "a b", "a:b", "ä"])
@pytest.mark.parametrize("field", ["tenant", "model_fingerprint", "recipe_id", "prefix_hash"])
def test_entry_key_rejects_bad_parts(field, bad):
    parts = {"tenant": "t", "model_fingerprint": "m", "recipe_id": "r", "prefix_hash": "h"}
    parts[field] = bad
    with pytest.raises(InvalidEntry, match=f"entry key part {field}="):
        EntryKey(**parts)


def test_entry_key_rejects_non_string():
    with pytest.raises(InvalidEntry):
        EntryKey("t", "m", "r", 5)  # type: ignore[arg-type]


def test_identity_chunk_hash_count():
    r = Recipe(chunk_size=4)
    Identity("m", r, ("a", "b", "c"), 9)
    Identity("m", r, ("a", "b"), 8)
    for hashes, seq_len in ((("a", "b"), 9), (("a", "b", "c"), 8), ((), 1), (("a",), 5)):
        with pytest.raises(InvalidEntry, match=r"chunk hashes for seq_len .* expected"):
            Identity("m", r, hashes, seq_len)
    with pytest.raises(InvalidEntry, match="seq_len"):
        Identity("m", r, (), 0)


def test_identity_key_uses_last_hash():
    r = Recipe(chunk_size=4)
    ident = Identity("m", r, ("a", "b", "c"), 9, tenant="t")
    assert ident.key == EntryKey("t", "m", r.recipe_id, "c")


# ---------------------------------------------------------------------------------------------
# make_layer, page summaries


def _slow_page_summaries(keys, counts, page_size):
    mins, maxs, start = [], [], 0
    for c in counts:
        for p0 in range(0, c, page_size):
            rows = keys[start + p0 : start + min(p0 + page_size, c)]
            mins.append([min(float(rows[r, j]) for r in range(len(rows))) for j in range(keys.shape[1])])
            maxs.append([max(float(rows[r, j]) for r in range(len(rows))) for j in range(keys.shape[1])])
        start += c
    return torch.tensor(mins), torch.tensor(maxs)


def test_make_layer_sorts_by_position_per_head():
    d = 4
    positions = [
        torch.tensor([9, 2, 5, 0]),
        torch.tensor([3]),
        torch.tensor([], dtype=torch.long),
        torch.tensor([7, 1]),
    ]
    keys = [p.float().unsqueeze(1).expand(-1, d) + 0.5 for p in positions]  # row content = its position
    values = [-p.float().unsqueeze(1).expand(-1, d) for p in positions]
    scores = [p.float() / 10 for p in positions]
    layer = make_layer(positions, keys, values, scores, page_size=2)
    assert layer.positions.dtype == torch.int32
    assert layer.positions.tolist() == [0, 2, 5, 9, 3, 1, 7]
    assert layer.head_offsets.dtype == torch.int32
    assert layer.head_offsets.tolist() == [0, 4, 5, 5, 7]
    assert torch.equal(layer.keys[:, 0], layer.positions.float() + 0.5)
    assert torch.equal(layer.values[:, 0], -layer.positions.float())
    assert layer.scores.dtype == torch.float16  # format 2 stores scores in fp16
    assert torch.allclose(layer.scores.float(), layer.positions.float() / 10, atol=1e-3)
    assert layer.head_counts().tolist() == [4, 1, 0, 2]
    assert not layer.quantized and layer.key_bits is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_summaries_exact(dtype, page_size):
    gen = torch.Generator().manual_seed(page_size)
    counts = [5, 0, 17, 16, 1]
    keys = torch.randn(sum(counts), 6, generator=gen).to(dtype)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    pmin, pmax = page_summaries(keys, offsets, page_size)
    want_min, want_max = _slow_page_summaries(keys, counts, page_size)
    assert pmin.dtype == dtype and pmax.dtype == dtype
    assert pmin.shape == want_min.shape == (sum(math.ceil(c / page_size) for c in counts), 6)
    assert torch.equal(pmin.float(), want_min) and torch.equal(pmax.float(), want_max)


def test_make_layer_page_summaries_match_slow_loop():
    e = synthetic_entry(seq_len=50, num_layers=1, num_kv_heads=3, head_dim=8, keep_fraction=0.7, page_size=4)
    layer = e.layers[0]
    want_min, want_max = _slow_page_summaries(layer.keys, layer.head_counts().tolist(), 4)
    assert torch.equal(layer.page_min.float(), want_min)
    assert torch.equal(layer.page_max.float(), want_max)


def test_page_of_rows():
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)  # heads of 3, 0, 5 rows
    assert page_of_rows(offsets, 2).tolist() == [0, 0, 1, 2, 2, 3, 3, 4]
    assert page_of_rows(offsets, 1).tolist() == list(range(8))
    assert page_of_rows(offsets, 16).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert page_of_rows(torch.zeros(3, dtype=torch.int32), 4).numel() == 0


# ---------------------------------------------------------------------------------------------
# validate_entry


def _entry(quant_scheme="none", **kw):
    args = dict(
        seq_len=40, num_layers=2, num_kv_heads=3, head_dim=8, keep_fraction=0.5, page_size=4, quant_scheme=quant_scheme
    )
    args.update(kw)
    return synthetic_entry(**args)


def _with_layer(entry: CompressedKV, i: int, **changes) -> CompressedKV:
    layers = list(entry.layers)
    layers[i] = dataclasses.replace(layers[i], **changes)
    return entry.replace(layers=layers)


def test_valid_entries_pass():
    for scheme in ("none", "int8", "int4", "mixed"):
        _entry(scheme).validate()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        _entry(dtype=dtype).validate()


def _nan_keys(layer):
    k = layer.keys.clone()
    k[2, 3] = float("nan")
    return {"keys": k}


def _inf_values(layer):
    v = layer.values.clone()
    v[0, 0] = float("-inf")
    return {"values": v}


def _inf_scores(layer):
    s = layer.scores.clone()
    s[4] = float("inf")
    return {"scores": s}


def _nan_scores(layer):
    s = layer.scores.clone()
    s[0] = float("nan")
    return {"scores": s}


def _not_ascending(layer):
    p = layer.positions.clone()
    p[1], p[2] = int(p[2]), int(p[1])
    return {"positions": p}


def _duplicate_position(layer):
    p = layer.positions.clone()
    p[2] = p[1]
    return {"positions": p}


def _past_seq_len(layer):
    p = layer.positions.clone()
    end = int(layer.head_offsets[1]) - 1  # last row of head 0: stays ascending
    p[end] = 40
    return {"positions": p}


def _negative_position(layer):
    p = layer.positions.clone()
    p[0] = -1
    return {"positions": p}


def _positions_int64(layer):
    return {"positions": layer.positions.long()}


def _head_offsets_int64(layer):
    return {"head_offsets": layer.head_offsets.long()}


def _head_offsets_short(layer):
    return {"head_offsets": layer.head_offsets[:-1].clone()}


def _head_offsets_decreasing(layer):
    o = layer.head_offsets.clone()
    o[1], o[2] = int(o[2]), int(o[1])
    return {"head_offsets": o}


def _keys_short(layer):
    return {"keys": layer.keys[:-1].clone()}


def _keys_wrong_dim(layer):
    return {"keys": torch.cat([layer.keys, layer.keys[:, :2]], 1)}


def _keys_int(layer):
    return {"keys": layer.keys.to(torch.int32)}


def _scores_float64(layer):
    return {"scores": layer.scores.double()}


def _page_min_above_max(layer):
    pmin = layer.page_min.clone()
    pmin[1, 2] = layer.page_max[1, 2] + 1
    return {"page_min": pmin}


def _page_max_nan(layer):
    pmax = layer.page_max.clone()
    pmax[0, 0] = float("nan")
    return {"page_max": pmax}


def _page_min_wrong_pages(layer):
    return {"page_min": layer.page_min[:-1].clone()}


def _dense_with_value_bits(layer):
    return {"value_bits": torch.full((layer.num_tokens,), 8, dtype=torch.uint8)}


DENSE_CASES = [
    (_nan_keys, "keys contain NaN or Inf"),
    (_inf_values, "values contain NaN or Inf"),
    (_inf_scores, "scores contain NaN or Inf"),
    (_nan_scores, "scores contain NaN or Inf"),
    (_not_ascending, "positions must be strictly ascending"),
    (_duplicate_position, "positions must be strictly ascending"),
    (_past_seq_len, r"positions must be in \[start=0, seq_len=40\)"),
    (_negative_position, r"positions must be in \[start=0, seq_len=40\)"),
    (_positions_int64, "positions must be int32"),
    (_head_offsets_int64, "head_offsets must be int32"),
    (_head_offsets_short, "head_offsets must be int32"),
    (_head_offsets_decreasing, "head_offsets must start at 0 and not decrease"),
    (_keys_short, "keys must be float16/bfloat16/float32"),
    (_keys_wrong_dim, "keys must be float16/bfloat16/float32"),
    (_keys_int, "keys must be float16/bfloat16/float32"),
    (_scores_float64, "scores must be float16"),
    (_page_min_above_max, "page_min must be <= page_max"),
    (_page_max_nan, "page_max contains NaN or Inf"),
    (_page_min_wrong_pages, "page_min must be float"),
    (
        _dense_with_value_bits,
        "dense keys need dense values: value_bits, value_min, value_max and the key and value ranges must be absent",
    ),
]


@pytest.mark.parametrize("mutate,message", DENSE_CASES, ids=[c[0].__name__.strip("_") for c in DENSE_CASES])
def test_validate_catches_dense_defect(mutate, message):
    entry = _entry()
    bad = _with_layer(entry, 1, **mutate(entry.layers[1]))
    with pytest.raises(InvalidEntry, match=rf"^layer 1: {message}"):
        validate_entry(bad)
    entry.validate()  # the original is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_validate_finds_non_finite_anywhere(dtype, bad):
    entry = _entry(dtype=dtype)
    numel = entry.layers[0].keys.numel()
    for flat_index in (0, 1, 7, 15, 16, 31, 32, 63, 64, 100, numel // 2, numel - 2, numel - 1):
        for field in ("keys", "values"):
            t = getattr(entry.layers[0], field).clone()
            t.view(-1)[flat_index] = bad
            with pytest.raises(InvalidEntry, match=f"^layer 0: {field} contain NaN or Inf"):
                validate_entry(_with_layer(entry, 0, **{field: t}))


def _quant_keys_short(layer):
    return {"keys": layer.keys[:-1].clone()}


def _quant_values_long(layer):
    return {"values": torch.cat([layer.values, torch.zeros(1, dtype=torch.uint8)])}


def _bits_3(layer):
    b = layer.key_bits.clone()
    b[0] = 3
    return {"key_bits": b}


def _value_bits_16(layer):
    b = layer.value_bits.clone()
    b[-1] = 16
    return {"value_bits": b}


def _bits_changed_length(layer):
    b = layer.key_bits.clone()
    b[0] = 2 if int(b[0]) != 2 else 4  # valid width, but the packed data no longer matches
    return {"key_bits": b}


def _value_min_missing(layer):
    return {"value_min": None}


def _value_max_float32(layer):
    return {"value_max": layer.value_max.float()}


def _value_min_inf(layer):
    v = layer.value_min.clone()
    v[0] = float("inf")
    return {"value_min": v}


QUANT_CASES = [
    (_quant_keys_short, r"quantized keys must be uint8 \["),
    (_quant_values_long, r"quantized values must be uint8 \["),
    (_bits_3, r"key_bits must each be one of \(2, 4, 8\)"),
    (_value_bits_16, r"value_bits must each be one of \(2, 4, 8\)"),
    (_bits_changed_length, r"quantized keys must be uint8 \["),
    (_value_min_missing, r"value_min must be float16"),
    (_value_max_float32, r"value_max must be float16"),
    (_value_min_inf, r"value_min contains NaN or Inf"),
]


@pytest.mark.parametrize("mutate,message", QUANT_CASES, ids=[c[0].__name__.strip("_") for c in QUANT_CASES])
def test_validate_catches_quantized_defect(mutate, message):
    entry = _entry("mixed")
    bad = _with_layer(entry, 1, **mutate(entry.layers[1]))
    with pytest.raises(InvalidEntry, match=rf"^layer 1: {message}"):
        validate_entry(bad)


def test_validate_entry_level_fields():
    entry = _entry()
    for changes, message in (
        ({"format_version": 4}, "format_version 4"),
        ({"num_kv_heads": 0}, "num_kv_heads=0"),
        ({"head_dim": 7}, "head_dim=7"),
        ({"page_size": 0}, "page_size 0"),
        ({"layers": []}, "no layers"),
        ({"importance": 1.5}, "importance 1.5"),
        ({"importance": float("nan")}, "importance nan"),
    ):
        with pytest.raises(InvalidEntry, match=message):
            validate_entry(entry.replace(**changes))


def test_validate_rejects_entry_with_wrong_head_count():
    entry = _entry()
    with pytest.raises(InvalidEntry, match=r"^layer 0: head_offsets must be int32 \[5\]"):
        validate_entry(entry.replace(num_kv_heads=4))


# ---------------------------------------------------------------------------------------------
# quantize_layer


@pytest.mark.parametrize("scheme,tol", [("int8", 0.03), ("int4", 0.45), ("mixed", 1.8)])
def test_quantize_layer_close_to_dense(scheme, tol):
    dense = _entry(seq_len=64, head_dim=64, keep_fraction=0.75, page_size=8)
    page = dense.page_size
    for layer in dense.layers:
        bits = quant.bits_for_scheme(scheme, layer.scores)
        q = quantize_layer(layer, bits, page)
        assert q.quantized
        assert torch.equal(q.positions, layer.positions) and torch.equal(q.scores, layer.scores)
        assert torch.equal(q.head_offsets, layer.head_offsets)
        assert torch.equal(q.key_bits, bits) and torch.equal(q.value_bits, bits)
        assert q.keys.numel() == quant.packed_nbytes(bits, 64)
        k, v = q.dequantized(page, torch.float32)
        k0, v0 = layer.keys.float(), layer.values.float()
        assert k.shape == k0.shape and v.shape == v0.shape
        # Bound per element: half a step of the row's coded range (+ fp16 rounding of the ranges).
        row_page = page_of_rows(layer.head_offsets, page)
        levels = ((1 << bits.long()) - 1).float().unsqueeze(1)
        k_step = (layer.page_max.float() - layer.page_min.float())[row_page] / levels
        v_step = (q.value_max.float() - q.value_min.float()).unsqueeze(1) / levels
        # a row's extremes may sit up to half a step of its value range code outside the coded range
        code_step = ((q.value_hi.float() - q.value_lo.float()) / 255)[head_of_rows(q.head_offsets)].unsqueeze(1)
        assert bool(((k - k0).abs() <= k_step / 2 + 4e-3).all())
        assert bool(((v - v0).abs() <= v_step / 2 + code_step / 2 + 4e-3).all())
        assert float((k - k0).abs().max()) < tol and float((v - v0).abs().max()) < tol
    entry = dense.replace(
        layers=[quantize_layer(layer, quant.bits_for_scheme(scheme, layer.scores), page) for layer in dense.layers]
    )
    entry.validate()
    assert entry.nbytes < dense.nbytes


def test_quantize_layer_separate_value_bits():
    layer = _entry(head_dim=16).layers[0]
    kb = torch.full((layer.num_tokens,), 8, dtype=torch.uint8)
    vb = torch.full((layer.num_tokens,), 2, dtype=torch.uint8)
    q = quantize_layer(layer, kb, 4, vb)
    assert q.keys.numel() == layer.num_tokens * 16 and q.values.numel() == layer.num_tokens * 4
    assert torch.equal(q.value_bits, vb)


def test_head_dim_not_multiple_of_4_is_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        synthetic_entry(seq_len=20, num_layers=1, num_kv_heads=2, head_dim=6, quant_scheme="mixed")
    with pytest.raises(InvalidEntry, match="multiple of 4"):
        synthetic_entry(seq_len=20, num_layers=1, num_kv_heads=2, head_dim=6).validate()


def test_dequantized_dense_is_cast():
    layer = _entry(dtype=torch.float32).layers[0]
    k, v = layer.dequantized(4, torch.float16)
    assert k.dtype == torch.float16 and torch.equal(k, layer.keys.half())
    assert v.dtype == torch.float16 and torch.equal(v, layer.values.half())


def test_layer_nbytes_and_tensors():
    e = _entry("int8")
    layer = e.layers[0]
    t = layer.tensors()
    assert set(t) == set(LayerKV.TENSOR_FIELDS)
    assert layer.nbytes == sum(x.numel() * x.element_size() for x in t.values())
    dense = _entry().layers[0]
    assert set(dense.tensors()) == set(LayerKV.TENSOR_FIELDS[:7])
    assert e.nbytes == sum(layer.nbytes for layer in e.layers)
    assert e.kept_tokens() == [layer.num_tokens for layer in e.layers] == [60, 60]
    assert copy.copy(e).key == e.key
