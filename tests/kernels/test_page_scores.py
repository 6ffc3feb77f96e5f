"""Quest page scores: the bound really bounds q·k, the kernel equals the reference, top pages are right."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import generator

from dkv.kernels.page_scores import page_scores, top_pages

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _paged_keys(h_kv, t, d, page_size, dtype, gen):
    """Keys ``[H_kv, T, D]``, their page min/max ``[H_kv, P, D]``, and per-head page counts.

    Head h holds ``T - h * page_size - 3`` tokens (at least one), so heads differ in page count,
    pages end part-full, and the pages past a head's count are padding filled with garbage.
    """
    p = -(-t // page_size)
    keys = torch.randn(h_kv, t, d, generator=gen)
    counts = [max(1, t - h * page_size - 3) for h in range(h_kv)]
    pmin = torch.randn(h_kv, p, d, generator=gen) * 100  # garbage where no page is
    pmax = torch.randn(h_kv, p, d, generator=gen) * 100
    for h, n in enumerate(counts):
        for page in range(-(-n // page_size)):
            rows = keys[h, page * page_size : min(n, (page + 1) * page_size)]
            pmin[h, page], pmax[h, page] = rows.amin(0), rows.amax(0)
    num_pages = torch.tensor([-(-n // page_size) for n in counts], dtype=torch.int32)
    return keys, counts, pmin.to(dtype), pmax.to(dtype), num_pages


@pytest.mark.parametrize(
    "t,d,h_q,h_kv,page_size,dtype",
    [
        (217, 64, 9, 3, 16, F32),
        (1823, 128, 32, 8, 16, F16),
        (1823, 64, 4, 4, 7, BF16),
    ],
)
def test_kernel_matches_reference_and_bounds_every_key(t, d, h_q, h_kv, page_size, dtype, device):
    gen = generator(t + d)
    keys, counts, pmin, pmax, num_pages = _paged_keys(h_kv, t, d, page_size, dtype, gen)
    q = torch.randn(h_q, d, generator=gen).to(dtype)
    ref = page_scores(q, pmin, pmax, num_pages, backend="torch")
    out = page_scores(*(x.to(device) for x in (q, pmin, pmax, num_pages)), backend="triton").cpu()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)  # -inf positions must agree too

    # the bound holds for every query head of the group and every key of the page; keys are
    # rounded to the pages' dtype first, as the page summaries were
    g = h_q // h_kv
    kq = keys.to(dtype).float()
    for h, n in enumerate(counts):
        true = kq[h, :n] @ q[h * g : (h + 1) * g].float().T  # [n, G]
        per_page = torch.full((int(num_pages[h]) * page_size,), float("-inf"))
        per_page[:n] = true.amax(1)
        best = per_page.view(-1, page_size).amax(1)  # max over the group and the page's keys
        assert (out[h, : len(best)] >= best - 1e-3 * best.abs().clamp(min=1)).all()
        assert torch.isneginf(out[h, len(best) :]).all()


def test_bound_is_tight_for_a_single_key_page():
    # a page of one key has min = max = k, so the bound is exactly q·k
    q = torch.randn(6, 32, generator=generator(0))
    k = torch.randn(2, 5, 32, generator=generator(1))
    scores = page_scores(q, k, k, torch.tensor([5, 5], dtype=torch.int32), backend="torch")
    want = torch.einsum("hgd,hpd->hgp", q.view(2, 3, 32), k).amax(1)
    torch.testing.assert_close(scores, want)


def test_max_over_the_group_keeps_a_page_that_one_head_needs(device):
    # KV head 0 has 3 query heads; only query head 2 aligns with page 5: the group's score must
    # put page 5 first even though the other two heads score it low
    d, p = 16, 9
    gen = generator(5)
    pmin = torch.randn(1, p, d, generator=gen) * 0.1 - 0.2
    pmax = pmin + 0.4
    q = torch.randn(3, d, generator=gen) * 0.1
    q[2] = 0
    q[2, 3] = 10.0
    pmin[0, 5, 3], pmax[0, 5, 3] = 4.0, 5.0
    q[0, 3] = q[1, 3] = -1.0
    n = torch.tensor([p], dtype=torch.int32)
    top = top_pages(*(x.to(device) for x in (q, pmin, pmax, n)), k=2, backend="triton").cpu()
    assert top.dtype == torch.int32 and top.shape == (1, 2) and top[0, 0] == 5


def test_top_pages_returns_the_best_real_pages_first(device):
    gen = generator(11)
    _, _, pmin, pmax, num_pages = _paged_keys(3, 217, 64, 16, F32, gen)
    num_pages[2] = 2  # fewer real pages than k
    q = torch.randn(6, 64, generator=gen)
    k = 4
    top = top_pages(*(x.to(device) for x in (q, pmin, pmax, num_pages)), k=k, backend="triton").cpu()
    scores = page_scores(q, pmin, pmax, num_pages, backend="torch")
    for h in range(3):
        real = min(k, int(num_pages[h]))
        want = torch.topk(scores[h], real).indices
        assert top[h, :real].tolist() == want.tolist()
        assert (top[h, real:] >= num_pages[h]).all()  # the rest are padded pages


def test_empty_head_scores_minus_inf_everywhere():
    gen = generator(2)
    pmin = torch.randn(2, 4, 8, generator=gen)
    scores = page_scores(
        torch.randn(2, 8, generator=gen), pmin, pmin + 1, torch.tensor([0, 4], dtype=torch.int32), backend="torch"
    )
    assert torch.isneginf(scores[0]).all() and torch.isfinite(scores[1]).all()


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("page_max", lambda a: a["page_max"].half(), "page_max must be float32"),
        ("page_min", lambda a: a["page_min"][..., :-1], "page_min must have shape"),
        ("num_pages", lambda a: a["num_pages"].long(), "num_pages must be int32"),
        ("q", lambda a: a["q"][:3], "grouped-query"),
        ("page_max", lambda a: a["page_max"].to("meta"), "page_max is on meta"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(name, bad, match):
    gen = generator(3)
    args = dict(
        q=torch.randn(4, 8, generator=gen),
        page_min=torch.zeros(2, 3, 8),
        page_max=torch.ones(2, 3, 8),
        num_pages=torch.tensor([3, 1], dtype=torch.int32),
    )
    args[name] = bad(args)
    with pytest.raises(ValueError, match=match):
        page_scores(**args, backend="torch")


def test_top_pages_rejects_k_beyond_the_pages():
    args = (torch.randn(2, 8), torch.zeros(2, 3, 8), torch.ones(2, 3, 8), torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="k=4"):
        top_pages(*args, k=4, backend="torch")


def test_non_contiguous_pages_are_rejected_by_the_launcher(triton_cpu):
    pmin = torch.zeros(2, 3, 16)[..., ::2]
    with pytest.raises(ValueError, match="page_min must be contiguous"):
        page_scores(
            torch.randn(2, 8), pmin, torch.ones(2, 3, 8), torch.tensor([3, 1], dtype=torch.int32), backend="triton"
        )
