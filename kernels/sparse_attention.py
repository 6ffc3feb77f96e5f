"""Sparse decode attention: one decode step, each KV head attending only to its selected slots.

One query token (batch 1) with grouped-query attention, ``H_q = H_kv * G``: query head ``i``
belongs to KV head ``i // G``. Selection (``workers.selection``: TokenSelect-style top-k tokens,
Quest-style top pages) gives every KV head its own slot indices, so the G query heads of a KV head
share one gathered set of keys and values::

    out[i] = softmax(scale * q[i] · k[h, sel_h]ᵀ) · v[h, sel_h],   h = i // G,
    sel_h  = indices[h, :lengths[h]]

Flash-decoding split: a decode step has one query row, so a grid of one program per KV head
leaves most of a GPU idle (8 KV heads, 132 SMs). The selected tokens of a head are cut into
``num_splits`` contiguous ranges, one program each (grid ``(H_kv, num_splits)``); a program
gathers its keys/values by index, runs the online softmax in fp32 over blocks of ``BLOCK_N``
tokens for all G query heads at once (one ``tl.dot`` of ``[G, D] x [D, BLOCK_N]``, G padded to
16 for the tensor cores, as vLLM's grouped decode kernel does), and writes a normalized partial
output and its log-sum-exp. A second small kernel merges the splits of each query head by their
log-sum-exps. The same merge, in torch, is ``combine_partials``: attention over disjoint token
sets (say the int4 and the int8 tokens of a mixed-precision entry, see ``kernels.quant_attention``)
combines exactly when each part returns its log-sum-exp (``return_lse=True``).

Conventions: a head with ``lengths[h] == 0`` attends to nothing, so its query heads output zeros
and a log-sum-exp of ``-inf`` (they then carry no weight in ``combine_partials``). Valid indices
must lie in ``[0, T)`` and may repeat or come in any order; entries past ``lengths[h]`` are never
read. Neither is checked on the device (it would synchronize); the kernel and the reference clamp
``lengths`` into ``[0, S]`` so a bad length cannot read past ``indices``.

Kernel, launcher and torch reference live together here (Triton tutorials, vLLM); the parity
tests are ``tests/kernels/test_sparse_attention.py``.
"""

from __future__ import annotations

import math

import torch

from dkv.kernels._common import (
    DENSE_DTYPES,
    INTERPRET,
    cdiv,
    check_inner_contiguous,
    check_num_splits,
    check_same_device,
    check_tensor,
    jit,
    next_pow2,
    num_sms,
    tl,
    use_triton,
)

LOG2E = 1.4426950408889634
MAX_SPLITS = 128  # more only adds merge work (two waves of 132 SMs need 33 splits for 8 KV heads)
MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, partial write, merge) dominates
MAX_HEAD_DIM = 256  # one [BLOCK_N, BLOCK_D] tile of K and of V must fit in registers


# ---------------------------------------------------------------------------------------------
# Triton: shared device functions (also used by kernels.quant_attention)


# Triton's interpreter (TRITON_INTERPRET=1) differs from the GPU in two bf16 details, worked
# around only when interpreting (the branches below vanish at compile time on the GPU):
# - it keeps bf16 as raw uint16 and its tl.dot multiplies those integers, so bf16 operands go to
#   fp32 first (exact: the products equal the GPU's bf16 dot with fp32 accumulation);
# - its fp32 -> bf16 cast truncates where the GPU rounds to nearest even, so ``_round_to`` rounds
#   the fp32 bits itself first.
_INTERPRETING = tl.constexpr(INTERPRET) if tl is not None else INTERPRET


@jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` with round-to-nearest-even, also under the interpreter."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # RTNE to the top 16 bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@jit
def _split_prologue(
    q_ptr,  # [H_q, D]
    len_ptr,  # int32 [H_kv]
    S,
    D,
    G,
    num_splits,
    stride_q_h,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """This program's KV head, split and slot range ``[start, end)``, and its query heads' rows.

    The range splits the head's real length, not S, so the programs of a short head do equal work.
    Returns (kv_head, split, start, end, q_heads ``[BLOCK_G]``, g_mask, offs_d, d_mask, q ``[BLOCK_G, BLOCK_D]``).
    """
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.minimum(tl.maximum(tl.load(len_ptr + kv_head), 0), S)
    per_split = tl.cdiv(length, num_splits)
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    q_heads = kv_head * G + offs_g
    q = tl.load(
        q_ptr + q_heads[:, None] * stride_q_h + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0
    )
    return kv_head, split, start, end, q_heads, g_mask, offs_d, d_mask, q


@jit
def _online_softmax_block(
    q,  # [BLOCK_G, BLOCK_D] q's dtype
    k,  # [BLOCK_N, BLOCK_D] q's dtype
    v,  # [BLOCK_N, BLOCK_D] q's dtype
    n_mask,  # [BLOCK_N] bool: which of the block's tokens are real
    m_i,  # [BLOCK_G] fp32 running max of the scaled scores (log2 domain)
    l_i,  # [BLOCK_G] fp32 running sum of exp2(score - m_i)
    acc,  # [BLOCK_G, BLOCK_D] fp32 running sum of exp2(score - m_i) * v
    qk_scale,  # softmax scale * log2(e): exp2 is one instruction, exp is not
    DOT_PRECISION: tl.constexpr,
):
    dtype = v.dtype
    if _INTERPRETING and dtype == tl.bfloat16:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N] fp32
    s = tl.where(n_mask[None, :], s, float("-inf"))
    # every block holds at least one real token, so m_new is finite and no -inf - -inf appears
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # p in the inputs' dtype: the tensor cores take fp16/bf16 operands; the sum accumulates in fp32
    p = _round_to(p, dtype)
    if _INTERPRETING and dtype == tl.bfloat16:
        p = p.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@jit
def _store_partial(
    part_o_ptr,  # fp32 [H_q, num_splits, D]
    part_lse_ptr,  # fp32 [H_q, num_splits]
    q_heads,  # [BLOCK_G] int32 query heads of this program
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
):
    # an empty split (l_i == 0) writes o = 0 and lse = -inf, so the merge gives it no weight
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = part_o_ptr + q_heads[:, None] * stride_po_h + split * stride_po_s + offs_d[None, :]
    tl.store(o_ptrs, o, mask=g_mask[:, None] & (offs_d[None, :] < D))
    tl.store(part_lse_ptr + q_heads * stride_pl_h + split, lse, mask=g_mask)


@jit
def _sparse_decode_split_kernel(
    q_ptr,  # [H_q, D]
    k_ptr,  # [H_kv, T, D]
    v_ptr,  # [H_kv, T, D]
    idx_ptr,  # int32 [H_kv, S]
    len_ptr,  # int32 [H_kv]
    part_o_ptr,  # fp32 [H_q, num_splits, D] normalized partial outputs
    part_lse_ptr,  # fp32 [H_q, num_splits] log2-sum-exp2 of the scaled scores
    qk_scale,
    S,
    D,
    G,
    num_splits,
    stride_q_h,
    stride_k_h,
    stride_k_t,
    stride_v_h,
    stride_v_t,
    stride_idx_h,
    stride_po_h,
    stride_po_s,
    stride_pl_h,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head, split, start, end, q_heads, g_mask, offs_d, d_mask, q = _split_prologue(
        q_ptr, len_ptr, S, D, G, num_splits, stride_q_h, BLOCK_G, BLOCK_D
    )
    offs_n = tl.arange(0, BLOCK_N)

    # int64 bases: H_kv * T * D elements can pass 2**31 on long contexts
    k_base = k_ptr + kv_head.to(tl.int64) * stride_k_h
    v_base = v_ptr + kv_head.to(tl.int64) * stride_v_h
    idx_base = idx_ptr + kv_head.to(tl.int64) * stride_idx_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        slot = tl.load(idx_base + n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot[:, None] * stride_k_t + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_v_t + offs_d[None, :], mask=kv_mask, other=0.0)
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


@jit
def _combine_splits_kernel(
    part_o_ptr,  # fp32 [H_q, num_splits, D]
    part_lse_ptr,  # fp32 [H_q, num_splits] log2 domain
    out_ptr,  # [H_q, D] q's dtype
    lse_ptr,  # fp32 [H_q] natural log
    num_splits,
    D,
    stride_po_h,
    stride_po_s,
    stride_pl_h,
    stride_out_h,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    # one split at a time, rescaling as the max grows: registers stay at one row for any split count
    for split in range(num_splits):
        lse = tl.load(part_lse_ptr + head * stride_pl_h + split)
        o = tl.load(part_o_ptr + head * stride_po_h + split * stride_po_s + offs_d, mask=d_mask, other=0.0)
        m_new = tl.maximum(m, lse)
        # while every split so far is empty m_new = -inf; shift by 0 so the weights are
        # exp2(-inf) = 0, not exp2(-inf - -inf) = NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        w = tl.exp2(lse - shift)
        acc = acc * alpha + o * w
        total = total * alpha + w
        m = m_new
    has = total > 0
    out = acc / tl.where(has, total, 1.0)
    tl.store(out_ptr + head * stride_out_h + offs_d, _round_to(out, out_ptr.dtype.element_ty), mask=d_mask)
    ln2 = 0.6931471805599453  # log2 -> natural log (a module global would have to be a tl.constexpr)
    tl.store(lse_ptr + head, tl.where(has, (m + tl.log2(tl.where(has, total, 1.0))) * ln2, float("-inf")))


# ---------------------------------------------------------------------------------------------
# Launchers


def auto_num_splits(max_len: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per KV head so that ``H_kv * num_splits`` programs cover about two waves of SMs.

    Chosen from ``S`` (the padded length, known on the host without a sync), never more than one
    split per ``MIN_TOKENS_PER_SPLIT`` tokens nor more than ``MAX_SPLITS``. Not tuned on a GPU
    yet; vLLM's Triton decode kernels use a fixed 8-16 splits, FlashInfer sizes splits to the SMs.
    """
    by_work = cdiv(max(max_len, 1), MIN_TOKENS_PER_SPLIT)
    by_sms = cdiv(2 * num_sms(device), max(num_kv_heads, 1))
    return max(1, min(by_work, by_sms, MAX_SPLITS))


def launch_config(d: int, group: int, dtype: torch.dtype, dequant: bool = False) -> dict:
    """Block sizes and warps of the split kernels for head dim ``d``, group size and input dtype.

    ``tl.dot`` needs every dimension >= 16, so G and D are padded up to 16. ``BLOCK_N`` keeps the
    K and V tiles (``BLOCK_N * BLOCK_D``) at 8K elements for 16-bit inputs and 4K for fp32, and at
    2K when K/V are dequantized in the kernel (codes, ranges and the fp32 values are live at
    once). With 8 warps these compile for sm_90 without register spills (ptxas, Triton 3.9, D in
    64/128/256); their speed is unmeasured.
    """
    block_d = max(16, next_pow2(d))
    budget = 2048 if dequant else (4096 if dtype == torch.float32 else 8192)
    block_n = max(16, min(64, budget // block_d))
    return {"BLOCK_G": max(16, next_pow2(group)), "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 8}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not TF32, so fp32 matches the reference to 1e-5."""
    return "ieee" if dtype == torch.float32 else "tf32"


def combine_splits(
    part_o: torch.Tensor, part_lse: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the splits: part_o fp32 ``[H_q, splits, D]``, part_lse fp32 ``[H_q, splits]`` (log2).

    Returns (out ``[H_q, D]`` in ``out_dtype``, lse fp32 ``[H_q]`` natural log).
    """
    h_q, splits, d = part_o.shape
    out = torch.empty((h_q, d), dtype=out_dtype, device=part_o.device)
    lse = torch.empty((h_q,), dtype=torch.float32, device=part_o.device)
    if h_q:
        _combine_splits_kernel[(h_q,)](
            part_o,
            part_lse,
            out,
            lse,
            splits,
            d,
            part_o.stride(0),
            part_o.stride(1),
            part_lse.stride(0),
            out.stride(0),
            BLOCK_D=next_pow2(d),
            num_warps=1 if d <= 128 else 2,
        )
    return out, lse


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split kernel and the merge; arguments as ``sparse_decode_attention``.

    Returns (out ``[H_q, D]`` in q's dtype, lse fp32 ``[H_q]``).
    """
    h_q, h_kv, d, s = _check_inputs(q, k, v, indices, lengths, scale, num_splits)
    check_inner_contiguous(q=q, k=k, v=v, indices=indices)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is above the kernel's {MAX_HEAD_DIM}; use backend='torch'")
    splits = num_splits or auto_num_splits(s, h_kv, q.device)
    group = h_q // h_kv
    part_o = torch.empty((h_q, splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((h_q, splits), dtype=torch.float32, device=q.device)
    _sparse_decode_split_kernel[(h_kv, splits)](
        q,
        k,
        v,
        indices,
        lengths,
        part_o,
        part_lse,
        float(scale) * LOG2E,
        s,
        d,
        group,
        splits,
        q.stride(0),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        indices.stride(0),
        part_o.stride(0),
        part_o.stride(1),
        part_lse.stride(0),
        DOT_PRECISION=dot_precision(q.dtype),
        num_stages=2,
        **launch_config(d, group, q.dtype),
    )
    return combine_splits(part_o, part_lse, q.dtype)


# ---------------------------------------------------------------------------------------------
# Checks shared by every backend, so a bad call fails the same way on CPU and GPU


def _check_inputs(q, k, v, indices, lengths, scale, num_splits) -> tuple[int, int, int, int]:
    check_tensor("q", q, dtypes=DENSE_DTYPES, shape=(None, None), dims="[H_q, D]")
    h_q, d = q.shape
    check_tensor("k", k, dtypes=(q.dtype,), shape=(None, None, d), dims="[H_kv, T, D] (q's dtype and D)")
    h_kv, t, _ = k.shape
    check_tensor("v", v, dtypes=(q.dtype,), shape=(h_kv, t, d), dims="[H_kv, T, D] (k's shape, q's dtype)")
    check_tensor("indices", indices, dtypes=(torch.int32,), shape=(h_kv, None), dims="[H_kv, S]")
    check_tensor("lengths", lengths, dtypes=(torch.int32,), shape=(h_kv,), dims="[H_kv]")
    check_same_device(q=q, k=k, v=v, indices=indices, lengths=lengths)
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(
            f"q has {h_q} heads and k has {h_kv}: grouped-query attention needs H_q = H_kv * G with H_kv >= 1"
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite float (usually 1/sqrt(D))")
    check_num_splits(num_splits, MAX_SPLITS)
    return h_q, h_kv, d, indices.shape[1]


# ---------------------------------------------------------------------------------------------
# Torch reference


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, fp32: gather the valid slots, mask the padding, softmax, weighted sum.

    Returns (out ``[H_q, D]`` in q's dtype, lse fp32 ``[H_q]``; zeros and ``-inf`` for empty heads).
    """
    h_q, d = q.shape
    h_kv, _, _ = k.shape
    s = indices.shape[1]
    group = h_q // h_kv
    valid = torch.arange(s, device=q.device) < lengths.clamp(0, s).long().unsqueeze(1)  # [H_kv, S]
    idx = torch.where(valid, indices.long(), 0).unsqueeze(-1).expand(-1, -1, d)  # padding reads slot 0
    ks = k.gather(1, idx).float()  # [H_kv, S, D]
    vs = v.gather(1, idx).float()
    qg = q.float().view(h_kv, group, d)
    scores = torch.einsum("hgd,hsd->hgs", qg, ks) * float(scale)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H_kv, G]; -inf where the head is empty
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # empty rows: exp(-inf) = 0
    out = torch.einsum("hgs,hsd->hgd", p, vs)
    return out.reshape(h_q, d).to(q.dtype), lse.reshape(h_q)


# ---------------------------------------------------------------------------------------------
# Public API


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of every query head over its KV head's selected slots.

    Parameters
    ----------
    q : Tensor ``[H_q, D]``
        This step's query, fp32, fp16 or bf16; ``H_q = H_kv * G``.
    k, v : Tensor ``[H_kv, T, D]``
        The layer's per-head slots (padded), q's dtype. Only the last dimension must be contiguous.
    indices : int32 Tensor ``[H_kv, S]``
        Slots each KV head attends to; only ``indices[h, :lengths[h]]`` are read, in any order.
    lengths : int32 Tensor ``[H_kv]``
        Valid entries of each row of ``indices``, in ``[0, S]``; 0 gives zero output.
    scale : float
        Softmax scale, usually ``1 / sqrt(D)``.
    num_splits : int, optional
        Programs per KV head over the selected tokens (flash-decoding), 1 to ``MAX_SPLITS``; ``None``
        picks one from ``S`` and the GPU's SM count (``auto_num_splits``). Ignored by the torch backend.
    backend : {"auto", "triton", "torch"}
        ``auto``: the Triton kernel for CUDA tensors, the torch reference otherwise. ``triton``: the
        kernel, also on CPU when ``TRITON_INTERPRET=1`` was set before import (slow, exact).
    return_lse : bool
        Also return the natural-log log-sum-exp of the scaled scores, fp32 ``[H_q]`` (``-inf`` for an
        empty head), so results over disjoint slot sets merge with ``combine_partials``.

    Returns
    -------
    out : Tensor ``[H_q, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    _check_inputs(q, k, v, indices, lengths, scale, num_splits)
    if use_triton(backend, q, k, v, indices, lengths):
        out, lse = sparse_decode_attention_triton(q, k, v, indices, lengths, scale, num_splits)
    else:
        out, lse = sparse_decode_attention_reference(q, k, v, indices, lengths, scale)
    return (out, lse) if return_lse else out


def combine_partials(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint token sets into the attention over their union.

    Parameters
    ----------
    outs : sequence of Tensor ``[H_q, D]``
        Each part's softmax-normalized output (``return_lse=True`` results), all one dtype.
    lses : sequence of Tensor ``[H_q]``
        Each part's natural-log log-sum-exp; ``-inf`` marks a part with no tokens for that head.

    Returns
    -------
    (out ``[H_q, D]`` in the parts' dtype, lse fp32 ``[H_q]``); a head empty in every part gives zeros
    and ``-inf``, like an empty head of ``sparse_decode_attention``. The merge is associative, so
    merged results can be merged again.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(
            f"combine_partials needs one lse per output and at least one part; got "
            f"{len(outs)} outputs and {len(lses)} lses"
        )
    check_tensor("outs[0]", outs[0], dtypes=DENSE_DTYPES, shape=(None, None), dims="[H_q, D]")
    h_q, d = outs[0].shape
    for i, (o, l) in enumerate(zip(outs, lses)):
        check_tensor(f"outs[{i}]", o, dtypes=(outs[0].dtype,), shape=(h_q, d), dims="[H_q, D] (outs[0]'s)")
        check_tensor(f"lses[{i}]", l, dtypes=(torch.float32,), shape=(h_q,), dims="[H_q]")
        check_same_device(**{"outs[0]": outs[0], f"outs[{i}]": o, f"lses[{i}]": l})
    lse = torch.stack(lses)  # [parts, H_q]
    m = lse.max(0).values
    w = torch.exp(lse - torch.where(torch.isinf(m), 0.0, m))  # [parts, H_q]; empty parts weigh 0
    total = w.sum(0)
    weighted = (torch.stack([o.float() for o in outs]) * w.unsqueeze(-1)).sum(0)  # [H_q, D]
    out = weighted / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    lse_out = torch.where(total > 0, m + torch.log(torch.where(total > 0, total, 1.0)), float("-inf"))
    return out.to(outs[0].dtype), lse_out


__all__ = [
    "sparse_decode_attention",
    "sparse_decode_attention_triton",
    "sparse_decode_attention_reference",
    "combine_partials",
    "auto_num_splits",
    "MAX_SPLITS",
]
