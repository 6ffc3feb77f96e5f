"""Sparse decode attention over quantized K/V, dequantizing inside the kernel.

The attention of ``kernels.sparse_attention`` (same grid, splits, online softmax and merge), but
K and V arrive as the store's packed integer rows (``kvstore.quant``), so a decode worker moves
``bits / 16`` of the fp16 bytes and never materializes dense K/V::

    k_codes, v_codes  uint8 [H_kv, T, D * bits // 8]   packed rows; int4: element 2i in the low
                                                       nibble of byte i; int8: one byte each
    k_lo, k_hi        [H_kv, P, D]   per-channel range of each page (slot t is in page t // page_size)
    v_lo, v_hi        [H_kv, T]      per-token range
    x = lo + code * (hi - lo) / (2**bits - 1)

Keys use their page's min/max per channel (KIVI-style, the page is the token group) and values a
per-token range, as ``kvstore.entry.quantize_layer`` writes them. The kernel dequantizes in fp32
with the formula of ``kvstore.quant.dequantize_rows``, rounds to q's dtype, and attends as the
dense kernel does; the reference is exactly that: ``dequantize_rows`` on the selected rows, cast to
q's dtype, then ``sparse_decode_attention_reference``.

Mixed precision: one call handles one bit width. An entry whose tokens carry different widths
(ZipCache's 4/2-bit split, ``kvstore.quant.SCHEMES["mixed"]``) is attended with one call per
width, each over that width's slots and with ``return_lse=True``; ``combine_partials`` then merges
the parts exactly into the attention over all selected slots.

Codes are read one byte per element lane (an int4 byte is loaded by both of its lanes; the
second read hits L1), which keeps the unpacking to a shift and a mask. Whether a wider load plus
``tl.join`` unpacking pays has not been measured.
"""

from __future__ import annotations

import math

import torch

from dkv.kernels._common import (
    DENSE_DTYPES,
    check_inner_contiguous,
    check_num_splits,
    check_same_device,
    check_tensor,
    jit,
    tl,
    use_triton,
)
from dkv.kernels.sparse_attention import (  # the device functions are shared so both kernels stay in step
    LOG2E,
    MAX_HEAD_DIM,
    MAX_SPLITS,
    _online_softmax_block,
    _round_to,
    _split_prologue,
    _store_partial,
    auto_num_splits,
    combine_partials,
    combine_splits,
    dot_precision,
    launch_config,
    sparse_decode_attention_reference,
)
from dkv.kvstore import quant

SUPPORTED_BITS = (4, 8)


@jit
def _dequant_rows(
    codes_base,  # uint8 codes of one KV head: [T, D * BITS // 8]
    slot,  # [BLOCK_N] int64 slots
    stride_t,
    offs_d,  # [BLOCK_D]
    mask,  # [BLOCK_N, BLOCK_D]
    lo,  # fp32 [BLOCK_N, BLOCK_D] or [BLOCK_N, 1]
    hi,
    BITS: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    byte = offs_d // PER_BYTE
    shift = (offs_d % PER_BYTE) * BITS  # low bits first: int4 element 2i is the low nibble of byte i
    raw = tl.load(codes_base + slot[:, None] * stride_t + byte[None, :], mask=mask, other=0)
    code = ((raw.to(tl.int32) >> shift[None, :]) & LEVELS).to(tl.float32)
    # the order of operations of kvstore.quant.dequantize_rows: lo + q * (hi - lo) / levels
    return lo + code * (hi - lo) / LEVELS


@jit
def _sparse_decode_quant_split_kernel(
    q_ptr,  # [H_q, D]
    kc_ptr,  # uint8 [H_kv, T, D * BITS // 8]
    vc_ptr,  # uint8 [H_kv, T, D * BITS // 8]
    klo_ptr,  # [H_kv, P, D]
    khi_ptr,  # [H_kv, P, D]
    vlo_ptr,  # [H_kv, T]
    vhi_ptr,  # [H_kv, T]
    idx_ptr,  # int32 [H_kv, S]
    len_ptr,  # int32 [H_kv]
    part_o_ptr,  # fp32 [H_q, num_splits, D]
    part_lse_ptr,  # fp32 [H_q, num_splits]
    qk_scale,
    page_size,
    S,
    D,
    G,
    num_splits,
    stride_q_h,
    stride_kc_h,
    stride_kc_t,
    stride_vc_h,
    stride_vc_t,
    stride_klo_h,
    stride_klo_p,
    stride_khi_h,
    stride_khi_p,
    stride_vlo_h,
    stride_vlo_t,
    stride_vhi_h,
    stride_vhi_t,
    stride_idx_h,
    stride_po_h,
    stride_po_s,
    stride_pl_h,
    BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head, split, start, end, q_heads, g_mask, offs_d, d_mask, q = _split_prologue(
        q_ptr, len_ptr, S, D, G, num_splits, stride_q_h, BLOCK_G, BLOCK_D
    )
    offs_n = tl.arange(0, BLOCK_N)

    head = kv_head.to(tl.int64)
    kc_base = kc_ptr + head * stride_kc_h
    vc_base = vc_ptr + head * stride_vc_h
    klo_base = klo_ptr + head * stride_klo_h
    khi_base = khi_ptr + head * stride_khi_h
    vlo_base = vlo_ptr + head * stride_vlo_h
    vhi_base = vhi_ptr + head * stride_vhi_h
    idx_base = idx_ptr + head * stride_idx_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        slot = tl.load(idx_base + n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N]
        tile_mask = n_mask[:, None] & d_mask[None, :]
        page = slot // page_size
        # selected slots come a page at a time (Quest), so these range rows are mostly L1/L2 hits
        k_lo = tl.load(klo_base + page[:, None] * stride_klo_p + offs_d[None, :], mask=tile_mask, other=0.0).to(
            tl.float32
        )
        k_hi = tl.load(khi_base + page[:, None] * stride_khi_p + offs_d[None, :], mask=tile_mask, other=0.0).to(
            tl.float32
        )
        k = _dequant_rows(kc_base, slot, stride_kc_t, offs_d, tile_mask, k_lo, k_hi, BITS)
        v_lo = tl.load(vlo_base + slot * stride_vlo_t, mask=n_mask, other=0.0).to(tl.float32)
        v_hi = tl.load(vhi_base + slot * stride_vhi_t, mask=n_mask, other=0.0).to(tl.float32)
        v = _dequant_rows(vc_base, slot, stride_vc_t, offs_d, tile_mask, v_lo[:, None], v_hi[:, None], BITS)
        # round to q's dtype as the reference does, then the dense kernel's block update
        k = _round_to(k, q.dtype)
        v = _round_to(v, q.dtype)
        m_i, l_i, acc = _online_softmax_block(q, k, v, n_mask, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    _store_partial(
        part_o_ptr,
        part_lse_ptr,
        q_heads,
        split,
        m_i,
        l_i,
        acc,
        g_mask,
        offs_d,
        D,
        stride_po_h,
        stride_po_s,
        stride_pl_h,
    )


def _check_inputs(
    q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale, num_splits
) -> tuple[int, int, int, int, int]:
    check_tensor("q", q, dtypes=DENSE_DTYPES, shape=(None, None), dims="[H_q, D]")
    h_q, d = q.shape
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ValueError(
            f"bits={bits!r} must be one of {SUPPORTED_BITS}; attend each bit width of a mixed entry "
            "in its own call and merge with combine_partials"
        )
    if (d * bits) % 8:
        raise ValueError(f"head dim D={d} at {bits} bits does not fill whole bytes; D must be even for int4")
    row_bytes = d * bits // 8
    check_tensor(
        "k_codes",
        k_codes,
        dtypes=(torch.uint8,),
        shape=(None, None, row_bytes),
        dims=f"[H_kv, T, D * bits // 8] (D={d}, bits={bits})",
    )
    h_kv, t, _ = k_codes.shape
    check_tensor(
        "v_codes",
        v_codes,
        dtypes=(torch.uint8,),
        shape=(h_kv, t, row_bytes),
        dims="[H_kv, T, D * bits // 8] (k_codes' shape)",
    )
    check_tensor("k_lo", k_lo, dtypes=DENSE_DTYPES, shape=(h_kv, None, d), dims="[H_kv, P, D]")
    p = k_lo.shape[1]
    check_tensor("k_hi", k_hi, dtypes=(k_lo.dtype,), shape=(h_kv, p, d), dims="[H_kv, P, D] (k_lo's shape and dtype)")
    check_tensor("v_lo", v_lo, dtypes=DENSE_DTYPES, shape=(h_kv, t), dims="[H_kv, T]")
    check_tensor("v_hi", v_hi, dtypes=(v_lo.dtype,), shape=(h_kv, t), dims="[H_kv, T] (v_lo's dtype)")
    check_tensor("indices", indices, dtypes=(torch.int32,), shape=(h_kv, None), dims="[H_kv, S]")
    check_tensor("lengths", lengths, dtypes=(torch.int32,), shape=(h_kv,), dims="[H_kv]")
    check_same_device(
        q=q,
        k_codes=k_codes,
        v_codes=v_codes,
        k_lo=k_lo,
        k_hi=k_hi,
        v_lo=v_lo,
        v_hi=v_hi,
        indices=indices,
        lengths=lengths,
    )
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(
            f"q has {h_q} heads and k_codes has {h_kv}: grouped-query attention needs H_q = H_kv * G with H_kv >= 1"
        )
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size={page_size!r} must be a positive int")
    if p * page_size < t:
        raise ValueError(f"k_lo has {p} pages of {page_size} slots, fewer than T={t} slots need ({-(-t // page_size)})")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite float (usually 1/sqrt(D))")
    check_num_splits(num_splits, MAX_SPLITS)
    return h_q, h_kv, d, indices.shape[1], p


def sparse_decode_attention_quant_triton(
    q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale, num_splits=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantized split kernel and the merge; returns (out ``[H_q, D]``, lse fp32 ``[H_q]``)."""
    h_q, h_kv, d, s, _ = _check_inputs(
        q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale, num_splits
    )
    check_inner_contiguous(q=q, k_codes=k_codes, v_codes=v_codes, k_lo=k_lo, k_hi=k_hi, indices=indices)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is above the kernel's {MAX_HEAD_DIM}; use backend='torch'")
    splits = num_splits or auto_num_splits(s, h_kv, q.device)
    group = h_q // h_kv
    part_o = torch.empty((h_q, splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((h_q, splits), dtype=torch.float32, device=q.device)
    _sparse_decode_quant_split_kernel[(h_kv, splits)](
        q,
        k_codes,
        v_codes,
        k_lo,
        k_hi,
        v_lo,
        v_hi,
        indices,
        lengths,
        part_o,
        part_lse,
        float(scale) * LOG2E,
        page_size,
        s,
        d,
        group,
        splits,
        q.stride(0),
        k_codes.stride(0),
        k_codes.stride(1),
        v_codes.stride(0),
        v_codes.stride(1),
        k_lo.stride(0),
        k_lo.stride(1),
        k_hi.stride(0),
        k_hi.stride(1),
        v_lo.stride(0),
        v_lo.stride(1),
        v_hi.stride(0),
        v_hi.stride(1),
        indices.stride(0),
        part_o.stride(0),
        part_o.stride(1),
        part_lse.stride(0),
        BITS=bits,
        DOT_PRECISION=dot_precision(q.dtype),
        num_stages=2,
        **launch_config(d, group, q.dtype, dequant=True),
    )
    return combine_splits(part_o, part_lse, q.dtype)


def sparse_decode_attention_quant_reference(
    q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvstore.quant.dequantize_rows`` on the selected rows, cast to q's dtype, then the dense reference."""
    h_kv, _, row_bytes = k_codes.shape
    d = q.shape[1]
    s = indices.shape[1]
    valid = torch.arange(s, device=q.device) < lengths.clamp(0, s).long().unsqueeze(1)  # [H_kv, S]
    idx = torch.where(valid, indices.long(), 0)  # padding reads slot 0, then is masked by lengths
    n = h_kv * s
    row_bits = torch.full((n,), bits, dtype=torch.uint8)

    def dequant(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        rows = codes.gather(1, idx.unsqueeze(-1).expand(-1, -1, row_bytes))  # [H_kv, S, row_bytes]
        # kvstore.quant works on CPU tensors; the reference only has to be right, not fast
        flat = quant.dequantize_rows(
            rows.reshape(-1).cpu(), row_bits, d, lo.reshape(n, -1).cpu(), hi.reshape(n, -1).cpu()
        )
        return flat.view(h_kv, s, d).to(device=q.device, dtype=q.dtype)

    page = (idx // page_size).unsqueeze(-1).expand(-1, -1, d)
    k = dequant(k_codes, k_lo.gather(1, page), k_hi.gather(1, page))
    v = dequant(v_codes, v_lo.gather(1, idx), v_hi.gather(1, idx))
    dense_idx = torch.arange(s, dtype=torch.int32, device=q.device).expand(h_kv, s).contiguous()
    return sparse_decode_attention_reference(q, k, v, dense_idx, lengths, scale)


def sparse_decode_attention_quant(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_lo: torch.Tensor,
    k_hi: torch.Tensor,
    v_lo: torch.Tensor,
    v_hi: torch.Tensor,
    bits: int,
    page_size: int,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention over packed int4/int8 K/V, dequantized on the fly.

    Parameters
    ----------
    q : Tensor ``[H_q, D]``
        fp32, fp16 or bf16; dequantized K/V are rounded to this dtype and the output has it.
    k_codes, v_codes : uint8 Tensor ``[H_kv, T, D * bits // 8]``
        Packed rows (``kvstore.quant.pack_rows`` layout), every row at ``bits``.
    k_lo, k_hi : Tensor ``[H_kv, P, D]``
        Per-channel key range of each page; slot ``t`` of a head uses page ``t // page_size``.
    v_lo, v_hi : Tensor ``[H_kv, T]``
        Per-token value range.
    bits : {4, 8}
        Bit width of every row in this call; attend a mixed entry per width (module docstring).
    page_size : int
        Slots per page of ``k_lo`` / ``k_hi``.
    indices, lengths, scale, num_splits, backend, return_lse
        As ``kernels.sparse_attention.sparse_decode_attention``.

    Returns
    -------
    out : Tensor ``[H_q, D]`` in q's dtype, or ``(out, lse fp32 [H_q])`` when ``return_lse``.
    """
    _check_inputs(q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale, num_splits)
    args = (q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, bits, page_size, indices, lengths, scale)
    if use_triton(backend, q, k_codes, v_codes, k_lo, k_hi, v_lo, v_hi, indices, lengths):
        out, lse = sparse_decode_attention_quant_triton(*args, num_splits)
    else:
        out, lse = sparse_decode_attention_quant_reference(*args)
    return (out, lse) if return_lse else out


__all__ = [
    "sparse_decode_attention_quant",
    "sparse_decode_attention_quant_triton",
    "sparse_decode_attention_quant_reference",
    "combine_partials",
    "SUPPORTED_BITS",
]
