"""dkv.kvstore.quant: row-wise 2/4/8-bit packing with a bit width per row."""

from __future__ import annotations

import pytest
import torch

from dkv.kvstore import quant


def _codes(bits: torch.Tensor, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Random codes uint8 [N, D], each below 2**bits of its row (full range exercised)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (bits.numel(), head_dim), generator=gen)
    return (raw % (1 << bits.long()).unsqueeze(1)).to(torch.uint8)


def _mixed_bits(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor(quant.BITS, dtype=torch.uint8)
    bits = choices[torch.randint(0, len(quant.BITS), (n,), generator=gen)]
    bits[:3] = choices  # every width present whatever the draw
    return bits


@pytest.mark.parametrize("head_dim", [4, 64, 128])
@pytest.mark.parametrize("b", quant.BITS)
@pytest.mark.parametrize("n", [1, 37])
def test_pack_unpack_round_trip_uniform_bits(b, head_dim, n):
    bits = torch.full((n,), b, dtype=torch.uint8)
    q = _codes(bits, head_dim)
    packed = quant.pack_rows(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n * head_dim * b // 8,)
    assert torch.equal(quant.unpack_rows(packed, bits, head_dim), q)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_rows_that_do_not_fill_whole_bytes_are_refused(b):
    bits = torch.full((37,), b, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack_rows(_codes(bits, 2), bits)


@pytest.mark.parametrize("head_dim", [4, 64, 128])
def test_pack_unpack_round_trip_mixed_bits(head_dim):
    bits = _mixed_bits(37)
    q = _codes(bits, head_dim, seed=3)
    packed = quant.pack_rows(q, bits)
    assert packed.numel() == quant.packed_nbytes(bits, head_dim)
    assert torch.equal(quant.unpack_rows(packed, bits, head_dim), q)


def test_packing_layout_low_bits_first():
    # int4: even element in the low nibble; 2-bit: element e at bits (e % 4) * 2.
    q4 = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert quant.pack_rows(q4, torch.tensor([4], dtype=torch.uint8)).tolist() == [0x21, 0x43]
    q2 = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert quant.pack_rows(q2, torch.tensor([2], dtype=torch.uint8)).tolist() == [1 | 2 << 2 | 3 << 4]
    q8 = torch.tensor([[7, 200, 0, 255]], dtype=torch.uint8)
    assert quant.pack_rows(q8, torch.tensor([8], dtype=torch.uint8)).tolist() == [7, 200, 0, 255]


def test_rows_are_back_to_back_in_order():
    bits = torch.tensor([8, 2, 4], dtype=torch.uint8)
    q = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0], [5, 6, 7, 8]], dtype=torch.uint8)
    packed = quant.pack_rows(q, bits).tolist()
    assert packed == [1, 2, 3, 4, 1 | 2 << 2 | 3 << 4, 0x65, 0x87]


def test_packed_nbytes_and_row_offsets():
    bits = torch.tensor([8, 4, 2, 8, 2], dtype=torch.uint8)
    d = 64
    assert quant.row_nbytes(bits, d).tolist() == [64, 32, 16, 64, 16]
    assert quant.packed_nbytes(bits, d) == 192
    assert quant.row_offsets(bits, d).tolist() == [0, 64, 96, 112, 176]
    assert quant.row_offsets(bits, d).dtype == torch.int64
    empty = torch.empty(0, dtype=torch.uint8)
    assert quant.packed_nbytes(empty, d) == 0
    assert quant.row_offsets(empty, d).numel() == 0


@pytest.mark.parametrize("head_dim", [4, 64])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_dequantize_error_bound(head_dim, per_channel):
    gen = torch.Generator().manual_seed(7)
    n = 37
    bits = _mixed_bits(n)
    x = torch.randn(n, head_dim, generator=gen) * 3
    if per_channel:
        lo = x.amin(0, keepdim=True).expand(n, -1).clone()
        hi = x.amax(0, keepdim=True).expand(n, -1).clone()
    else:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    packed = quant.quantize_rows(x, bits, lo, hi)
    assert packed.numel() == quant.packed_nbytes(bits, head_dim)
    y = quant.dequantize_rows(packed, bits, head_dim, lo, hi)
    assert y.dtype == torch.float32 and y.shape == x.shape
    step = (hi - lo) / ((1 << bits.long()) - 1).float().unsqueeze(1)  # [N, D] or [N, 1]
    err = (y - x).abs()
    assert bool((err <= step / 2 + 1e-5).all()), float((err - step / 2).max())
    # Ends of the range are exact.
    assert torch.allclose(y.amin(1 if not per_channel else 0), x.amin(1 if not per_channel else 0), atol=1e-5)


def test_quantize_codes_cover_full_range():
    x = torch.linspace(0, 1, 16).unsqueeze(0)
    bits = torch.tensor([4], dtype=torch.uint8)
    packed = quant.quantize_rows(x, bits, torch.zeros(1, 1), torch.ones(1, 1))
    assert quant.unpack_rows(packed, bits, 16).tolist() == [list(range(16))]


def test_values_outside_range_are_clamped():
    x = torch.tensor([[-5.0, 0.5, 9.0, 1.0]])
    bits = torch.tensor([8], dtype=torch.uint8)
    lo, hi = torch.zeros(1, 1), torch.ones(1, 1)
    codes = quant.unpack_rows(quant.quantize_rows(x, bits, lo, hi), bits, 4)
    assert codes[0, 0] == 0 and codes[0, 2] == 255 and codes[0, 3] == 255


@pytest.mark.parametrize("b", quant.BITS)
def test_constant_rows_dequantize_to_lo(b):
    n, d = 5, 8
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).expand(n, d) * 0.37 - 1.0
    lo = hi = x[:, :1].clone()
    bits = torch.full((n,), b, dtype=torch.uint8)
    y = quant.dequantize_rows(quant.quantize_rows(x, bits, lo, hi), bits, d, lo, hi)
    assert torch.isfinite(y).all()
    assert torch.equal(y, lo.expand(n, d))


def test_bits_for_scheme_uniform():
    scores = torch.rand(37, generator=torch.Generator().manual_seed(0))
    for scheme, b in (("int8", 8), ("int4", 4)):
        bits = quant.bits_for_scheme(scheme, scores)
        assert bits.dtype == torch.uint8 and bits.shape == (37,)
        assert bits.tolist() == [b] * 37


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 100])
def test_bits_for_scheme_mixed_top_60_percent(n):
    scores = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float()  # distinct
    bits = quant.bits_for_scheme("mixed", scores)
    high = int(round(n * 0.6))
    assert int((bits == 4).sum()) == high and int((bits == 2).sum()) == n - high
    order = torch.argsort(scores, descending=True)
    assert bits[order[:high]].tolist() == [4] * high
    assert bits[order[high:]].tolist() == [2] * (n - high)


def test_bits_for_scheme_empty():
    for scheme in ("int8", "int4", "mixed"):
        assert quant.bits_for_scheme(scheme, torch.empty(0)).numel() == 0


@pytest.mark.parametrize("scheme", ["none", "int3", ""])
def test_bits_for_scheme_rejects_non_quantized(scheme):
    with pytest.raises(ValueError, match="int8, int4, mixed"):
        quant.bits_for_scheme(scheme, torch.ones(4))
