"""Sparse attention over packed int4/int8 K/V: codes from kvstore.quant, the kernel against the
dequantize-then-attend reference, and mixed precision merged with combine_partials."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import LSE_TOL, TOL, generator, selection

from dkv.kernels.quant_attention import sparse_decode_attention_quant
from dkv.kernels.sparse_attention import combine_partials, sparse_decode_attention
from dkv.kvstore import quant
from dkv.kvstore.entry import make_layer, quantize_layer

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _quantized_cache(h_kv, t, d, page_size, bits, gen):
    """Random K/V ``[H_kv, T, D]`` and their store encoding, as ``kvstore.entry.quantize_layer`` does:
    keys on their page's fp16 min/max per channel, values on their own fp16 min/max."""
    p = -(-t // page_size)
    k = torch.randn(h_kv, t, d, generator=gen)
    v = torch.randn(h_kv, t, d, generator=gen)
    padded = torch.nn.functional.pad(k, (0, 0, 0, p * page_size - t))
    # a partial last page's min/max must come from its real rows only
    fill = torch.nn.functional.pad(torch.zeros(t, dtype=torch.bool), (0, p * page_size - t), value=True)
    fill = fill.view(1, p, page_size, 1)
    k_lo = padded.view(h_kv, p, page_size, d).masked_fill(fill, float("inf")).amin(2).half()
    k_hi = padded.view(h_kv, p, page_size, d).masked_fill(fill, float("-inf")).amax(2).half()
    v_lo, v_hi = v.amin(2).half(), v.amax(2).half()
    row_bits = torch.full((t,), bits, dtype=torch.uint8)
    page = torch.arange(t) // page_size
    k_codes = torch.stack(
        [
            quant.quantize_rows(k[h], row_bits, k_lo[h, page].float(), k_hi[h, page].float()).view(t, -1)
            for h in range(h_kv)
        ]
    )
    v_codes = torch.stack(
        [
            quant.quantize_rows(v[h], row_bits, v_lo[h, :, None].float(), v_hi[h, :, None].float()).view(t, -1)
            for h in range(h_kv)
        ]
    )
    return k, v, (k_codes, v_codes, k_lo, k_hi, v_lo, v_hi)


def _dequantized(codes, bits, page_size, d):
    """The whole cache dequantized with kvstore.quant, independently of the kernels' gather."""
    k_codes, v_codes, k_lo, k_hi, v_lo, v_hi = codes
    h_kv, t, _ = k_codes.shape
    row_bits = torch.full((t,), bits, dtype=torch.uint8)
    page = torch.arange(t) // page_size
    k = torch.stack(
        [quant.dequantize_rows(k_codes[h].reshape(-1), row_bits, d, k_lo[h, page], k_hi[h, page]) for h in range(h_kv)]
    )
    v = torch.stack(
        [
            quant.dequantize_rows(v_codes[h].reshape(-1), row_bits, d, v_lo[h, :, None], v_hi[h, :, None])
            for h in range(h_kv)
        ]
    )
    return k, v


# (T, S, D, H_q, H_kv, page_size, bits, dtype, num_splits)
CASES = [
    (217, 37, 64, 9, 3, 16, 4, F32, 1),
    (1823, 217, 128, 32, 8, 16, 8, F16, None),
    (1823, 217, 64, 4, 4, 7, 4, BF16, 3),
    (217, 1, 128, 9, 3, 16, 8, F32, 2),
    (217, 217, 64, 32, 8, 5, 4, F16, 4),
    (1823, 37, 128, 4, 4, 16, 8, BF16, 1),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[f"T{c[0]}-S{c[1]}-D{c[2]}-{c[3]}x{c[4]}-page{c[5]}-int{c[6]}-{str(c[7])[6:]}-splits{c[8]}" for c in CASES],
)
def test_kernel_matches_dequantize_then_attend(case, device):
    t, s, d, h_q, h_kv, page_size, bits, dtype, splits = case
    gen = generator(CASES.index(case))
    _, _, codes = _quantized_cache(h_kv, t, d, page_size, bits, gen)
    q = (2 * torch.randn(h_q, d, generator=gen)).to(dtype)
    indices, lengths = selection(h_kv, t, s, gen)
    scale = 1 / math.sqrt(d)
    ref, ref_lse = sparse_decode_attention_quant(
        q, *codes, bits, page_size, indices, lengths, scale, backend="torch", return_lse=True
    )
    # the reference equals dense attention over the cache dequantized whole by kvstore.quant
    k_deq, v_deq = _dequantized(codes, bits, page_size, d)
    dense, dense_lse = sparse_decode_attention(
        q, k_deq.to(dtype), v_deq.to(dtype), indices, lengths, scale, backend="torch", return_lse=True
    )
    torch.testing.assert_close(ref, dense, rtol=0, atol=0)
    torch.testing.assert_close(ref_lse, dense_lse, rtol=0, atol=0)

    on = [x.to(device) for x in (q, *codes)]
    out, lse = sparse_decode_attention_quant(
        *on,
        bits,
        page_size,
        indices.to(device),
        lengths.to(device),
        scale,
        num_splits=splits,
        backend="triton",
        return_lse=True,
    )
    assert out.dtype == dtype and out.shape == (h_q, d)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse, **LSE_TOL)


def _format_2_cache(h_kv, t, d, page_size, bits, gen):
    """Random K/V encoded by the store itself (``kvstore.entry.quantize_layer``, format 2): key page
    bounds are float32, 8-bit codes on each head's key range, and the keys are quantized on them."""
    k = torch.randn(h_kv, t, d, generator=gen)
    v = torch.randn(h_kv, t, d, generator=gen)
    layer = make_layer([torch.arange(t)] * h_kv, list(k), list(v), [torch.zeros(t)] * h_kv, page_size)
    q = quantize_layer(layer, torch.full((h_kv * t,), bits, dtype=torch.uint8), page_size)
    p = -(-t // page_size)
    return (
        q.keys.view(h_kv, t, -1),
        q.values.view(h_kv, t, -1),
        q.page_min.view(h_kv, p, d),
        q.page_max.view(h_kv, p, d),
        q.value_min.view(h_kv, t),
        q.value_max.view(h_kv, t),
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_reads_format_2_entries_as_the_store_dequantizes_them(bits, device):
    t, s, d, h_q, h_kv, page_size = 217, 37, 64, 9, 3, 16
    gen = generator(200 + bits)
    codes = _format_2_cache(h_kv, t, d, page_size, bits, gen)
    assert codes[2].dtype == torch.float32  # the bounds the codes give back, not fp16
    q = torch.randn(h_q, d, generator=gen)
    indices, lengths = selection(h_kv, t, s, gen)
    scale = 1 / math.sqrt(d)
    k_deq, v_deq = _dequantized(codes, bits, page_size, d)
    want, want_lse = sparse_decode_attention(q, k_deq, v_deq, indices, lengths, scale, backend="torch", return_lse=True)
    out, lse = sparse_decode_attention_quant(
        *(x.to(device) for x in (q, *codes)),
        bits,
        page_size,
        indices.to(device),
        lengths.to(device),
        scale,
        num_splits=2,
        backend="triton",
        return_lse=True,
    )
    torch.testing.assert_close(out.cpu(), want, **TOL[F32])
    torch.testing.assert_close(lse.cpu(), want_lse, **LSE_TOL)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])
def test_quantized_attention_is_close_to_full_precision(bits, tol):
    # a sanity check of the whole encoding, not a parity test: int8 is nearly lossless
    gen = generator(bits)
    k, v, codes = _quantized_cache(2, 217, 64, 16, bits, gen)
    q = torch.randn(4, 64, generator=gen)
    indices, lengths = selection(2, 217, 100, gen)
    out = sparse_decode_attention_quant(q, *codes, bits, 16, indices, lengths, 0.125, backend="torch")
    full = sparse_decode_attention(q, k, v, indices, lengths, 0.125, backend="torch")
    assert (out - full).abs().max() < tol


def test_mixed_precision_entry_attended_per_bit_width_and_combined(device):
    # the documented recipe for mixed 4/8-bit entries: one call per width over that width's
    # slots, each returning its log-sum-exp, merged with combine_partials
    t, s, d, h_q, h_kv, page_size = 217, 37, 64, 9, 3, 16
    gen = generator(99)
    k, v, codes4 = _quantized_cache(h_kv, t, d, page_size, 4, gen)
    _, _, codes8 = _quantized_cache(h_kv, t, d, page_size, 8, generator(99))  # same K/V, int8 codes
    q = torch.randn(h_q, d, generator=gen)
    indices, lengths = selection(h_kv, t, s, gen)
    is8 = torch.rand(h_kv, t, generator=gen) < 0.6  # which slots the entry keeps at 8 bits
    parts = {4: [], 8: []}
    for h in range(h_kv):
        sel = indices[h, : int(lengths[h])].long()
        parts[8].append(sel[is8[h, sel]])
        parts[4].append(sel[~is8[h, sel]])
    scale = 1 / math.sqrt(d)
    outs, lses = [], []
    for bits, codes in ((4, codes4), (8, codes8)):
        idx = torch.full((h_kv, s), -7, dtype=torch.int32)
        for h, sel in enumerate(parts[bits]):
            idx[h, : len(sel)] = sel.to(torch.int32)
        n = torch.tensor([len(sel) for sel in parts[bits]], dtype=torch.int32)
        out, lse = sparse_decode_attention_quant(
            *(x.to(device) for x in (q, *codes)),
            bits,
            page_size,
            idx.to(device),
            n.to(device),
            scale,
            num_splits=2,
            backend="triton",
            return_lse=True,
        )
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = combine_partials(outs, lses)

    # want: one dense attention over all selected slots, each dequantized at its own width
    k4, v4 = _dequantized(codes4, 4, page_size, d)
    k8, v8 = _dequantized(codes8, 8, page_size, d)
    mixed = is8.unsqueeze(-1)
    want, want_lse = sparse_decode_attention(
        q,
        torch.where(mixed, k8, k4),
        torch.where(mixed, v8, v4),
        indices,
        lengths,
        scale,
        backend="torch",
        return_lse=True,
    )
    torch.testing.assert_close(merged.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse.cpu(), want_lse, **LSE_TOL)


def _good():
    gen = generator(4)
    _, _, codes = _quantized_cache(2, 31, 16, 8, 4, gen)
    indices, lengths = selection(2, 31, 5, gen)
    names = ("k_codes", "v_codes", "k_lo", "k_hi", "v_lo", "v_hi")
    return dict(
        q=torch.randn(4, 16, generator=gen),
        **dict(zip(names, codes)),
        bits=4,
        page_size=8,
        indices=indices,
        lengths=lengths,
        scale=0.25,
    )


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("bits", lambda a: 2, "bits=2 must be one of"),
        ("k_codes", lambda a: a["k_codes"][..., :-1], "k_codes must have shape"),
        ("v_codes", lambda a: a["v_codes"].to(torch.int8), "v_codes must be uint8"),
        ("k_lo", lambda a: a["k_lo"][:, :2], "k_hi must have shape"),  # k_lo sets P; k_hi disagrees
        ("v_hi", lambda a: a["v_hi"].float(), "v_hi must be float16"),
        ("page_size", lambda a: 2, "k_lo has 4 pages of 2 slots"),
        ("indices", lambda a: a["indices"].to("meta"), "indices is on meta"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(name, bad, match):
    args = _good()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention_quant(**args, backend="torch")


def test_non_contiguous_codes_are_rejected_by_the_launcher(triton_cpu):
    args = _good()
    wide = torch.zeros(2, 31, 16, dtype=torch.uint8)
    wide[..., ::2] = args["k_codes"]
    args["k_codes"] = wide[..., ::2]
    with pytest.raises(ValueError, match="k_codes must be contiguous"):
        sparse_decode_attention_quant(**args, backend="triton")
