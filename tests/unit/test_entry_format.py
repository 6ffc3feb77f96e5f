"""Entry format 3's stored form (``kvstore.entry.pack_layer``) and reading format 1 and 2 entries."""

from __future__ import annotations

import dataclasses
import pathlib
import struct

import pytest
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import (
    FORMAT_VERSION,
    Identity,
    Recipe,
    head_of_rows,
    make_layer,
    pack_layer,
    page_of_rows,
    quantize_layer,
    unpack_layer,
)
from dkv.kvstore.errors import InvalidEntry
from dkv.kvstore.prefix import chain_hashes
from dkv.testing import synthetic_entry

# Written by the format 1 codec (commit abc29f6, kvstore/codec.py at FORMAT_VERSION 1) and the format 2
# codec (commit 40cde17): synthetic_entry(seq_len=40, num_layers=2, num_kv_heads=2, head_dim=8,
# keep_fraction=0.5, seed=s) with quant_scheme none (seed 1), int4 (seed 2) and mixed (seed 3); each
# entry is a u32 frame count, then every frame as a u32 length and its bytes.
DATA = pathlib.Path(__file__).parent / "data"
OLD_KINDS = (("none", 1), ("int4", 2), ("mixed", 3))


def old_frames(version: int) -> list[list[bytes]]:
    data, pos, entries = (DATA / f"entries_v{version}.bin").read_bytes(), 0, []
    while pos < len(data):
        (count,), pos = struct.unpack_from("<I", data, pos), pos + 4
        frames = []
        for _ in range(count):
            (n,), pos = struct.unpack_from("<I", data, pos), pos + 4
            frames.append(data[pos : pos + n])
            pos += n
        entries.append(frames)
    return entries


@pytest.mark.parametrize("version", (1, 2))
@pytest.mark.parametrize("index", range(len(OLD_KINDS)))
def test_older_format_entries_still_read_and_rewrite_unchanged(version, index):
    scheme, seed = OLD_KINDS[index]
    frames = old_frames(version)[index]
    assert struct.unpack_from("<H", frames[0], 4)[0] == version  # the frame head says which format
    old = codec.decode(frames)
    assert old.format_version == version and old.identity.recipe.quant == scheme
    dense = synthetic_entry(seq_len=40, num_layers=2, num_kv_heads=2, head_dim=8, keep_fraction=0.5, seed=seed)
    for layer, reference in zip(old.layers, dense.layers):
        assert torch.equal(layer.positions, reference.positions)
        # format 1 kept float32 scores
        assert layer.scores.dtype == (torch.float32 if version == 1 else torch.float16)
        assert torch.allclose(layer.scores.float(), reference.scores.float(), atol=1e-3)
        k, v = layer.dequantized(old.page_size, torch.float32)
        tolerance = {"none": 1e-6, "int4": 0.5, "mixed": 1.5}[scheme]  # half a step of 4 (2) bits over ranges of ~5
        assert (k - reference.keys.float()).abs().max() <= tolerance
        assert (v - reference.values.float()).abs().max() <= tolerance
    rewritten = codec.encode(old)
    assert struct.unpack_from("<H", rewritten[0], 4)[0] == FORMAT_VERSION == 3
    new = codec.decode(rewritten)
    for a, b in zip(old.layers, new.layers):  # older fields (fp16 value ranges, fp16 page bounds) travel as they are
        for name in a.TENSOR_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name


def test_a_half_kept_int4_entry_stores_a_bitmap_codes_for_its_ranges_and_one_bit_width():
    entry = synthetic_entry(
        seq_len=512, num_layers=1, num_kv_heads=3, head_dim=64, keep_fraction=0.5, quant_scheme="int4"
    )
    stored = entry.stored_layers()[0]
    assert set(stored) == {
        "head_offsets",
        "position_bitmap",
        "scores",
        "page_min_codes",
        "page_max_codes",
        "key_lo",
        "key_hi",
        "keys",
        "values",
        "bits",
        "value_min_codes",
        "value_max_codes",
        "value_lo",
        "value_hi",
    }
    assert stored["position_bitmap"].shape == (3, 64) and stored["scores"].dtype == torch.float16
    assert stored["page_min_codes"].dtype == torch.uint8 and stored["page_min_codes"].shape == (3 * 16, 64)
    assert stored["bits"].tolist() == [4]  # every row at 4 bits: one byte for the layer
    assert stored["value_min_codes"].dtype == torch.uint8 and stored["value_lo"].shape == (3,)
    rows = entry.layers[0].num_tokens
    per_row = {name: t.numel() * t.element_size() / rows for name, t in stored.items()}
    # 64 B of 4-bit K and V, 8 B of page codes (2 x 64 / 16), 2 B of scores, 2 B of value range codes
    assert per_row["keys"] + per_row["values"] == 64 and per_row["page_min_codes"] + per_row["page_max_codes"] == 8
    assert per_row["value_min_codes"] + per_row["value_max_codes"] == 2
    assert per_row["position_bitmap"] == 0.25 and per_row["scores"] == 2
    assert sum(per_row.values()) < 78  # format 2: 81 B a row here (256 rows a head), format 1: 95
    out = codec.decode(codec.encode(entry)).layers[0]
    for name in out.TENSOR_FIELDS:  # nothing changes on the way through the store
        x, y = getattr(entry.layers[0], name), getattr(out, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_value_ranges_are_the_nearest_8_bit_codes_of_each_rows_range():
    quantized = synthetic_entry(
        seq_len=200, num_layers=1, num_kv_heads=2, head_dim=16, keep_fraction=0.5, quant_scheme="int4"
    ).layers[0]
    dense = synthetic_entry(seq_len=200, num_layers=1, num_kv_heads=2, head_dim=16, keep_fraction=0.5).layers[0]
    true_v = dense.values.float()
    vmin, vmax = quantized.value_min.float(), quantized.value_max.float()
    head = head_of_rows(quantized.head_offsets)
    grid_step = ((quantized.value_hi.float() - quantized.value_lo.float()) / 255)[head]
    # a row's coded min and max are within half a grid step (+ fp16 rounding) of its true ones, so its
    # extreme values (often a few outlier channels) keep nearly all their precision
    assert bool(((vmin - true_v.amin(1)).abs() <= grid_step / 2 + 2e-3).all())
    assert bool(((vmax - true_v.amax(1)).abs() <= grid_step / 2 + 2e-3).all())
    _, v = quantized.dequantized(16, torch.float32)
    error = (v - true_v).abs().amax(1)
    assert bool((error <= (vmax - vmin) / 15 / 2 + grid_step / 2 + 2e-3).all())


def test_mixed_bit_widths_keep_a_byte_per_row():
    entry = synthetic_entry(
        seq_len=128, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=0.5, quant_scheme="mixed"
    )
    stored = entry.stored_layers()[0]
    assert stored["bits"].shape == (entry.layers[0].num_tokens,)
    back = unpack_layer(stored, 0, entry.seq_len, entry.page_size)
    assert torch.equal(back.key_bits, entry.layers[0].key_bits)


@pytest.mark.parametrize(
    "keep_fraction, seq_len, form",
    [(0.5, 300, "position_bitmap"), (0.02, 3000, "position_offsets"), (0.0005, 40000, "positions")],
)
def test_positions_take_the_smallest_form_that_holds_them(keep_fraction, seq_len, form):
    entry = synthetic_entry(seq_len=seq_len, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=keep_fraction)
    stored = entry.stored_layers()[0]
    assert [n for n in stored if "position" in n] == [form]
    out = codec.decode(codec.encode(entry))
    assert torch.equal(out.layers[0].positions, entry.layers[0].positions)


def test_chunk_entries_store_positions_from_their_start():
    tokens = list(range(600))
    recipe = Recipe(method="snapkv", ratio=0.5, chunked=True, chunk_size=256)
    hashes = tuple(chain_hashes(tokens, 256, "m", recipe.recipe_id))
    g = torch.Generator().manual_seed(0)
    positions = [torch.tensor([256, 300, 511]), torch.tensor([257, 258])]
    layer = make_layer(
        positions,
        [torch.randn(len(p), 8, generator=g) for p in positions],
        [torch.randn(len(p), 8, generator=g) for p in positions],
        [torch.rand(len(p), generator=g) for p in positions],
        4,
    )
    entry = synthetic_entry(seq_len=512, num_layers=1, num_kv_heads=2, head_dim=8).replace(
        identity=Identity("m", recipe, hashes[:2], 512, start=256), layers=[layer], page_size=4
    )
    offsets = entry.stored_layers()[0]["position_offsets"]
    assert offsets.tolist() == [0, 44, 255, 1, 2]
    assert torch.equal(codec.decode(codec.encode(entry)).layers[0].positions, layer.positions)


def test_quantized_page_bounds_are_8_bit_codes_that_bound_the_dequantized_keys():
    entry = synthetic_entry(
        seq_len=200, num_layers=1, num_kv_heads=2, head_dim=16, keep_fraction=0.5, quant_scheme="int4"
    )
    layer = entry.layers[0]
    k, _ = layer.dequantized(entry.page_size, torch.float32)
    row_page = page_of_rows(layer.head_offsets, entry.page_size)
    assert bool((k >= layer.page_min[row_page] - 1e-5).all()) and bool((k <= layer.page_max[row_page] + 1e-5).all())
    out = codec.decode(codec.encode(entry)).layers[0]
    assert torch.equal(out.page_min, layer.page_min) and torch.equal(out.keys, layer.keys)
    dense = synthetic_entry(seq_len=200, num_layers=1, num_kv_heads=2, head_dim=16, keep_fraction=0.5).layers[0]
    true_k = dense.keys.float()
    # outward rounding: the coded bounds hold every original key, so no key was clipped
    assert bool((true_k >= layer.page_min[row_page] - 1e-2).all()) and bool(
        (true_k <= layer.page_max[row_page] + 1e-2).all()
    )
    assert (k - true_k).abs().max() <= (layer.page_max - layer.page_min).max() / 15 / 2 + 1e-3


def test_page_bounds_off_the_grid_are_refused_when_stored():
    entry = synthetic_entry(
        seq_len=64, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=0.5, quant_scheme="int4"
    )
    layer = entry.layers[0]
    nudged = dataclasses.replace(layer, page_min=layer.page_min - 1e-3)
    with pytest.raises(InvalidEntry, match="layer 0: page bounds are not on the 8-bit grid of their heads' ranges"):
        codec.encode(entry.replace(layers=[nudged]))
    nudged = dataclasses.replace(layer, value_max=layer.value_max + 1e-2)
    with pytest.raises(InvalidEntry, match="layer 0: value ranges are not on the 8-bit grid of their heads' ranges"):
        codec.encode(entry.replace(layers=[nudged]))


def _stored(**kw):
    entry = synthetic_entry(
        seq_len=64, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=0.5, quant_scheme="int4", **kw
    )
    return entry, entry.stored_layers()[0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(position_bitmap=t["position_bitmap"][:, :-1]), "position_bitmap must be uint8"),
        (
            lambda t: t["position_bitmap"].__setitem__((0, 0), t["position_bitmap"][0, 0] ^ 2),
            "position_bitmap disagrees with head_offsets",
        ),
        (lambda t: t.update(position_offsets=t["scores"].to(torch.int16)), "exactly one of positions"),
        (lambda t: t.update(key_bits=t["bits"]), "bits is shared by K and V"),
        (lambda t: t.update(page_min=t["key_lo"]), "stored as codes or as values, not both"),
        (lambda t: t.pop("key_hi"), "page bounds as codes need page_min_codes, page_max_codes, key_lo and key_hi"),
        (lambda t: t.update(page_min_codes=t["page_min_codes"][:-1]), "page_min_codes must be torch.uint8"),
        (
            lambda t: t.update(page_min_codes=torch.full_like(t["page_min_codes"], 255)),
            "page_min_codes must be <= page_max_codes",
        ),
        (lambda t: t.update(head_offsets=t["head_offsets"].flip(0)), "head_offsets must start at 0"),
        (lambda t: t.update(value_min=t["value_lo"]), "value ranges are stored as codes or as values, not both"),
        (lambda t: t.pop("value_hi"), "value ranges as codes need value_min_codes, value_max_codes, value_lo"),
        (lambda t: t.update(key_lo=t["key_lo"][:, :-1]), "key_hi must be torch.float16"),
        (lambda t: t.update(value_max_codes=t["value_max_codes"][:-1]), "value_max_codes must be torch.uint8"),
        (
            lambda t: t.update(value_min_codes=torch.full_like(t["value_min_codes"], 255)),
            "value_min_codes must be <= value_max_codes",
        ),
    ],
)
def test_inconsistent_stored_tensors_are_invalid(mutate, message):
    entry, stored = _stored()
    stored = {k: v.clone() for k, v in stored.items()}
    mutate(stored)
    with pytest.raises(InvalidEntry, match=message):
        unpack_layer(stored, 0, entry.seq_len, entry.page_size)


def test_a_bitmap_bit_past_the_context_is_invalid():
    entry = synthetic_entry(seq_len=61, num_layers=1, num_kv_heads=1, head_dim=8, keep_fraction=0.9)
    stored = {k: v.clone() for k, v in entry.stored_layers()[0].items()}
    stored["position_bitmap"][0, -1] |= 0x80  # position 63 of a 61-token context
    with pytest.raises(InvalidEntry, match="marks positions at or after seq_len 61"):
        unpack_layer(stored, 0, 61, entry.page_size)


def test_requantizing_keeps_the_grid_and_pack_round_trips_mixed_bits():
    entry = synthetic_entry(
        seq_len=128, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=0.5, quant_scheme="mixed"
    )
    layer = entry.layers[0]
    again = quantize_layer(layer, layer.key_bits, entry.page_size)
    stored = pack_layer(again, 0, entry.seq_len, entry.page_size)
    assert "bits" in stored and set(stored["bits"].unique().tolist()) == {2, 4}
    back = unpack_layer(stored, 0, entry.seq_len, entry.page_size)
    assert torch.equal(back.page_min, again.page_min) and torch.equal(back.key_bits, back.value_bits)
