"""dkv.kvstore.shrink: dropping tokens by stored score and requantizing, on the way to slower tiers."""

from __future__ import annotations

import math

import pytest
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import page_summaries
from dkv.kvstore.shrink import ShrinkRule, drop_tokens, requantize
from dkv.testing import synthetic_entry


def _entry(quant_scheme="none", **kw):
    args = dict(
        seq_len=101,
        num_layers=2,
        num_kv_heads=3,
        head_dim=16,
        keep_fraction=0.5,
        page_size=4,
        quant_scheme=quant_scheme,
        importance=0.9,
    )
    args.update(kw)
    return synthetic_entry(**args)


def _per_head(layer):
    offs = layer.head_offsets.tolist()
    return [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.01, 0.99, 1.0])
def test_drop_tokens_keeps_top_scores_per_head(fraction):
    entry = _entry()
    out = drop_tokens(entry, fraction)
    out.validate()
    assert out.identity == entry.identity and out.num_kv_heads == entry.num_kv_heads
    for old, new in zip(entry.layers, out.layers):
        for so, sn in zip(_per_head(old), _per_head(new)):
            n = so.stop - so.start
            k = max(1, round(n * fraction))
            assert sn.stop - sn.start == k
            pos_o, pos_n = old.positions[so], new.positions[sn]
            # kept positions: exactly those of the k highest scores (scores are distinct)
            top = torch.topk(old.scores[so], k).indices
            assert pos_n.tolist() == sorted(pos_o[top].tolist())
            assert bool((pos_n[1:] > pos_n[:-1]).all())
            # rows travel with their positions
            idx = torch.searchsorted(pos_o, pos_n)
            assert torch.equal(new.scores[sn], old.scores[so][idx])
            assert torch.equal(new.keys[sn], old.keys[so][idx])
            assert torch.equal(new.values[sn], old.values[so][idx])
            # the lowest kept score is at least the highest dropped one
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[idx] = False
            if dropped.any():
                assert float(new.scores[sn].min()) >= float(old.scores[so][dropped].max())


def test_drop_tokens_round_half_and_minimum_one():
    # heads of 5 rows: round(2.5) = 2 (Python's round), and a tiny fraction still keeps 1 row per head
    entry = synthetic_entry(seq_len=5, num_layers=1, num_kv_heads=2, head_dim=8, keep_fraction=1.0, page_size=2)
    assert drop_tokens(entry, 0.5).layers[0].head_counts().tolist() == [round(2.5)] * 2
    assert drop_tokens(entry, 0.001).layers[0].head_counts().tolist() == [1, 1]


def test_drop_tokens_recomputes_page_summaries_exactly():
    entry = _entry()
    out = drop_tokens(entry, 0.37)
    for layer in out.layers:
        pmin, pmax = page_summaries(layer.keys, layer.head_offsets, out.page_size)
        assert torch.equal(layer.page_min, pmin) and torch.equal(layer.page_max, pmax)
        assert layer.page_min.shape[0] == sum(math.ceil(c / out.page_size) for c in layer.head_counts().tolist())


def test_drop_tokens_importance_scales_by_kept_score_mass():
    entry = _entry()
    out = drop_tokens(entry, 0.5)
    kept = sum(float(layer.scores.clamp_min(0).sum()) for layer in out.layers)
    total = sum(float(layer.scores.clamp_min(0).sum()) for layer in entry.layers)
    assert 0 < kept < total
    assert math.isclose(out.importance, entry.importance * kept / total, rel_tol=1e-6)
    # The top half of uniform scores carries well over half the mass.
    assert out.importance > entry.importance * 0.5


def test_drop_tokens_importance_with_zero_mass_uses_fraction():
    entry = _entry()
    layers = [l.__class__(**{**l.__dict__, "scores": torch.zeros_like(l.scores)}) for l in entry.layers]
    entry = entry.replace(layers=layers)
    out = drop_tokens(entry, 0.25)
    assert math.isclose(out.importance, entry.importance * 0.25)


def test_drop_tokens_derived_and_original_untouched():
    entry = _entry().replace(derived=("quant:int8",))
    before = [l.positions.clone() for l in entry.layers]
    out = drop_tokens(entry, 0.5)
    assert out.derived == ("quant:int8", "shrink:0.5")
    assert drop_tokens(entry, 0.25).derived[-1] == "shrink:0.25"
    assert entry.derived == ("quant:int8",)
    assert all(torch.equal(b, l.positions) for b, l in zip(before, entry.layers))
    assert out.nbytes < entry.nbytes


@pytest.mark.parametrize("scheme", ["int8", "int4", "mixed"])
def test_drop_tokens_on_quantized_keeps_bits(scheme):
    entry = _entry(scheme)
    out = drop_tokens(entry, 0.5)
    out.validate()
    for old, new in zip(entry.layers, out.layers):
        assert new.quantized
        for so, sn in zip(_per_head(old), _per_head(new)):
            idx = torch.searchsorted(old.positions[so], new.positions[sn])
            assert torch.equal(new.positions[sn], old.positions[so][idx])
            assert torch.equal(new.key_bits[sn], old.key_bits[so][idx])
            assert torch.equal(new.value_bits[sn], old.value_bits[so][idx])
            assert torch.equal(new.scores[sn], old.scores[so][idx])
        # K/V stay close to what they were (requantized against tighter page ranges)
        k_old, v_old = old.dequantized(entry.page_size, torch.float32)
        k_new, v_new = new.dequantized(entry.page_size, torch.float32)
        rows = torch.cat(
            [
                torch.searchsorted(old.positions[so], new.positions[sn]) + so.start
                for so, sn in zip(_per_head(old), _per_head(new))
            ]
        )
        tol = {"int8": 0.05, "int4": 0.6, "mixed": 2.0}[scheme]
        assert float((k_new - k_old[rows]).abs().max()) < tol
        assert float((v_new - v_old[rows]).abs().max()) < tol
    if scheme == "mixed":
        # bits were set by score, so keeping the top half keeps 4-bit rows; keeping 90% keeps 2-bit ones too
        assert set(torch.cat([l.key_bits for l in out.layers]).unique().tolist()) == {4}
        most = drop_tokens(entry, 0.9)
        most.validate()
        assert set(torch.cat([l.key_bits for l in most.layers]).unique().tolist()) == {2, 4}


def test_requantize_reduces_bytes():
    fp16 = _entry(keep_fraction=1.0, head_dim=64)
    int8 = requantize(fp16, "int8")
    int4 = requantize(fp16, "int4")
    for e in (int8, int4):
        e.validate()
        assert all(l.quantized for l in e.layers)
    assert int4.nbytes < int8.nbytes < fp16.nbytes
    assert int8.derived == ("quant:int8",) and int4.derived == ("quant:int4",)
    assert all(set(l.key_bits.unique().tolist()) == {8} for l in int8.layers)
    assert all(set(l.key_bits.unique().tolist()) == {4} for l in int4.layers)
    # int8 -> int4 lowers it further
    int8_4 = requantize(int8, "int4")
    assert int8_4.nbytes == int4.nbytes and int8_4.derived == ("quant:int8", "quant:int4")
    # close to the dense original
    for d, q in zip(fp16.layers, int8.layers):
        k, v = q.dequantized(fp16.page_size, torch.float32)
        assert float((k - d.keys.float()).abs().max()) < 0.03
        assert float((v - d.values.float()).abs().max()) < 0.03
        assert torch.equal(q.positions, d.positions) and torch.equal(q.scores, d.scores)
    assert int8.importance == fp16.importance


@pytest.mark.parametrize(
    "have,target",
    [("int4", "int8"), ("int4", "int4"), ("int8", "int8"), ("mixed", "int4"), ("mixed", "int8"), ("int4", "mixed")],
)
def test_requantize_noop_when_already_at_or_below(have, target):
    entry = _entry(have).replace(derived=("x",))
    out = requantize(entry, target)
    assert out is entry
    assert out.derived == ("x",)


def test_requantize_none_is_noop():
    entry = _entry()
    assert requantize(entry, "none") is entry


def test_shrink_rule_validation():
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match="keep_fraction"):
            ShrinkRule(keep_fraction=bad)
    for bad in ("int3", "fp8", ""):
        with pytest.raises(ValueError, match=r"quant .* must be one of \['int4', 'int8', 'mixed', 'none'\]"):
            ShrinkRule(quant=bad)
    assert ShrinkRule().is_noop
    assert not ShrinkRule(keep_fraction=0.5).is_noop
    assert not ShrinkRule(quant="int8").is_noop


def test_shrink_rule_apply():
    entry = _entry()
    assert ShrinkRule().apply(entry) is entry
    out = ShrinkRule(keep_fraction=0.5, quant="int4").apply(entry)
    out.validate()
    assert out.derived == ("quant:int4", "shrink:0.5")  # quantize first, then drop
    assert all(l.quantized for l in out.layers)
    assert out.kept_tokens() == drop_tokens(entry, 0.5).kept_tokens()
    assert out.nbytes < requantize(entry, "int4").nbytes


@pytest.mark.parametrize(
    "rule", [ShrinkRule(0.5), ShrinkRule(1.0, "int8"), ShrinkRule(0.25, "mixed"), ShrinkRule(0.7, "int4")]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shrunk_entries_validate_and_survive_codec(rule, dtype):
    entry = _entry(dtype=dtype)
    out = rule.apply(entry)
    out.validate()
    back = codec.decode(codec.encode(out, max_frame_bytes=8192))
    assert back.key == out.key and back.derived == out.derived and back.importance == out.importance
    for a, b in zip(out.layers, back.layers):
        for name, t in a.tensors().items():
            assert torch.equal(t, getattr(b, name)), name


@pytest.mark.parametrize("scheme", ["none", "mixed"])
def test_shrink_of_a_decoded_entry_matches_shrink_of_the_original(scheme):
    # Decoded tensors are read-only views of the frames; shrinking must not write into them.
    entry = _entry(scheme)
    frames = codec.encode(entry, max_frame_bytes=8192)
    decoded = codec.decode(frames)
    for rule in (ShrinkRule(0.5), ShrinkRule(1.0, "int4")):
        a, b = rule.apply(entry), rule.apply(decoded)
        b.validate()
        assert a.derived == b.derived and a.importance == b.importance
        for la, lb in zip(a.layers, b.layers):
            for name, t in la.tensors().items():
                assert torch.equal(t, getattr(lb, name)), name
    assert codec.encode(entry, max_frame_bytes=8192) == frames  # frames untouched
