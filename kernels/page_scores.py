"""Quest page scores: an upper bound of ``q·k`` over the keys of each page, from the page's min/max.

Every cached page keeps the elementwise min and max of its keys (``kvstore.entry``). For any key
``k`` of the page, ``min_d <= k_d <= max_d``, so ``q_d * k_d <= max(q_d * min_d, q_d * max_d)`` in
every channel and the page's bound (Quest, ICML'24)::

    bound(q, page) = Σ_d max(q_d * min_d, q_d * max_d)  >=  max_{k in page} q·k

Decode then attends only to the pages with the highest bounds (``top_pages``).

Grouped-query attention: one selection serves all G query heads of a KV head (they share its
slots), so the page score of a KV head is the **max** of its query heads' bounds. The max keeps
the guarantee: it bounds ``max_g q_g·k`` over the page, so a page holding a key that any one
query head scores highly ranks at least that high. A mean or sum would bound only the group's
average score and could rank below the threshold a page that one head needs (a retrieval head
looking at a needle while the other heads look elsewhere).

The bound is computed on the raw query (no softmax scale): a positive scale does not change the
ranking. Padded pages (``p >= num_pages[h]``) score ``-inf`` so they sort last.
"""

from __future__ import annotations

import torch

from dkv.kernels._common import (
    DENSE_DTYPES,
    cdiv,
    check_backend,
    check_inner_contiguous,
    check_same_device,
    check_tensor,
    jit,
    next_pow2,
    tl,
    use_triton,
)

MAX_HEAD_DIM = 1024


@jit
def _page_scores_kernel(
    q_ptr,  # [H_q, D]
    pmin_ptr,  # [H_kv, P, D]
    pmax_ptr,  # [H_kv, P, D]
    npages_ptr,  # int32 [H_kv]
    out_ptr,  # fp32 [H_kv, P]
    P,
    D,
    G,
    stride_q_h,
    stride_pmin_h,
    stride_pmin_p,
    stride_pmax_h,
    stride_pmax_p,
    stride_out_h,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    n_pages = tl.minimum(tl.maximum(tl.load(npages_ptr + kv_head), 0), P)
    p_mask = offs_p < n_pages
    d_mask = offs_d < D
    tile_mask = p_mask[:, None] & d_mask[None, :]
    # the page tile is read once and reused by every query head of the group
    lo = tl.load(
        pmin_ptr + kv_head.to(tl.int64) * stride_pmin_h + offs_p[:, None] * stride_pmin_p + offs_d[None, :],
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)  # [BLOCK_P, BLOCK_D]
    hi = tl.load(
        pmax_ptr + kv_head.to(tl.int64) * stride_pmax_h + offs_p[:, None] * stride_pmax_p + offs_d[None, :],
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in range(G):
        # masked channels load q = 0 and add nothing to the bound
        qg = tl.load(q_ptr + (kv_head * G + g) * stride_q_h + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(qg[None, :] * lo, qg[None, :] * hi), 1)  # [BLOCK_P]
        best = tl.maximum(best, bound)
    best = tl.where(p_mask, best, float("-inf"))
    tl.store(out_ptr + kv_head * stride_out_h + offs_p, best, mask=offs_p < P)


def _check_inputs(q, page_min, page_max, num_pages) -> tuple[int, int, int, int]:
    check_tensor("q", q, dtypes=DENSE_DTYPES, shape=(None, None), dims="[H_q, D]")
    h_q, d = q.shape
    check_tensor("page_min", page_min, dtypes=DENSE_DTYPES, shape=(None, None, d), dims="[H_kv, P, D] (q's D)")
    h_kv, p, _ = page_min.shape
    check_tensor(
        "page_max",
        page_max,
        dtypes=(page_min.dtype,),
        shape=(h_kv, p, d),
        dims="[H_kv, P, D] (page_min's shape and dtype)",
    )
    check_tensor("num_pages", num_pages, dtypes=(torch.int32,), shape=(h_kv,), dims="[H_kv]")
    check_same_device(q=q, page_min=page_min, page_max=page_max, num_pages=num_pages)
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(
            f"q has {h_q} heads and page_min has {h_kv}: grouped-query attention needs H_q = H_kv * G with H_kv >= 1"
        )
    return h_q, h_kv, p, d


def page_scores_triton(
    q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, num_pages: torch.Tensor
) -> torch.Tensor:
    """Launch ``_page_scores_kernel``; arguments and result as ``page_scores``."""
    h_q, h_kv, p, d = _check_inputs(q, page_min, page_max, num_pages)
    check_inner_contiguous(q=q, page_min=page_min, page_max=page_max)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is above the kernel's {MAX_HEAD_DIM}; use backend='torch'")
    out = torch.empty((h_kv, p), dtype=torch.float32, device=q.device)
    block_d = next_pow2(d)
    # two fp32 [BLOCK_P, BLOCK_D] tiles (min, max) live in registers: ~4K elements per program
    block_p = max(1, min(64, 2048 // block_d, next_pow2(p)))
    if p:
        _page_scores_kernel[(h_kv, cdiv(p, block_p))](
            q,
            page_min,
            page_max,
            num_pages,
            out,
            p,
            d,
            h_q // h_kv,
            q.stride(0),
            page_min.stride(0),
            page_min.stride(1),
            page_max.stride(0),
            page_max.stride(1),
            out.stride(0),
            BLOCK_P=block_p,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def page_scores_reference(
    q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, num_pages: torch.Tensor
) -> torch.Tensor:
    """Plain torch, fp32: the bound per query head, max over each group, ``-inf`` on padded pages.

    ``Σ_d max(q_d·min_d, q_d·max_d) = relu(q)·max + min(q, 0)·min`` (``max_d >= min_d``), so the
    bound is two batched matmuls instead of a ``[H_q, P, D]`` elementwise tensor: 10-50x faster on
    a CPU at 16K tokens.
    """
    h_q, d = q.shape
    h_kv, p, _ = page_min.shape
    qg = q.float().view(h_kv, h_q // h_kv, d)  # [H_kv, G, D]
    bound = (
        torch.bmm(qg.clamp(min=0), page_max.float().transpose(1, 2))
        + torch.bmm(qg.clamp(max=0), page_min.float().transpose(1, 2))
    ).amax(1)  # [H_kv, P]
    padded = torch.arange(p, device=q.device) >= num_pages.clamp(0, p).long().unsqueeze(1)
    return bound.masked_fill(padded, float("-inf"))


def page_scores(
    q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, num_pages: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Quest upper bound of ``q·k`` per page, aggregated over each KV head's query heads by max.

    Parameters
    ----------
    q : Tensor ``[H_q, D]``
        This step's query (fp32, fp16 or bf16); ``H_q = H_kv * G``.
    page_min, page_max : Tensor ``[H_kv, P, D]``
        Elementwise min / max of the keys of each page, padded per head to ``P`` pages; one dtype.
    num_pages : int32 Tensor ``[H_kv]``
        Real pages of each head (clamped into ``[0, P]``).
    backend : {"auto", "triton", "torch"}
        As ``kernels.sparse_attention.sparse_decode_attention``.

    Returns
    -------
    scores : fp32 Tensor ``[H_kv, P]``
        ``max_g Σ_d max(q_gd * min_d, q_gd * max_d)``; ``-inf`` for padded pages.
    """
    _check_inputs(q, page_min, page_max, num_pages)
    if use_triton(backend, q, page_min, page_max, num_pages):
        return page_scores_triton(q, page_min, page_max, num_pages)
    return page_scores_reference(q, page_min, page_max, num_pages)


def top_pages(
    q: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    num_pages: torch.Tensor,
    k: int,
    backend: str = "auto",
) -> torch.Tensor:
    """The ``k`` pages of each KV head with the highest bound, best first: int32 ``[H_kv, k]``.

    A head with fewer than ``k`` real pages gets its real pages first, then padded pages (score
    ``-inf``); only the first ``min(k, num_pages[h])`` entries are meaningful. Top-k runs in torch on
    the kernel's scores: fusing it into the kernel pays only if the scores' round trip through
    memory (``H_kv * P`` floats) matters, which nothing here has measured.
    """
    check_backend(backend)
    scores = page_scores(q, page_min, page_max, num_pages, backend=backend)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k={k!r} must be an int in [0, P={scores.shape[1]}]")
    return torch.topk(scores, k, dim=1).indices.to(torch.int32)


__all__ = ["page_scores", "page_scores_triton", "page_scores_reference", "top_pages"]
