"""Decode-time selection on synthetic slot layouts."""

from __future__ import annotations

import pytest
import torch

from dkv.workers.selection import SelectionCache, SlotView, always_kept, make_selection, pack

H_KV, GROUPS, D, PAGE = 3, 3, 16, 8


def make_view(t: int = 200, entry_slots: int = 180, counts=(180, 150, 120), seed: int = 0) -> SlotView:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(H_KV, t, D, generator=g)
    slot = torch.arange(t)
    valid = torch.stack([(slot < c) | (slot >= entry_slots) for c in counts])
    positions = torch.where(valid, slot.expand(H_KV, t) * 2, torch.full((H_KV, t), -1))
    pages = -(-entry_slots // PAGE)
    page_min = torch.full((H_KV, pages, D), float("inf"))
    page_max = torch.full((H_KV, pages, D), float("-inf"))
    for h, c in enumerate(counts):
        for p in range(-(-c // PAGE)):
            rows = keys[h, p * PAGE:min((p + 1) * PAGE, c)]
            page_min[h, p], page_max[h, p] = rows.min(0).values, rows.max(0).values
    num_pages = torch.tensor([-(-c // PAGE) for c in counts], dtype=torch.int32)
    page_min = torch.nan_to_num(page_min, posinf=0.0)
    page_max = torch.nan_to_num(page_max, neginf=0.0)
    return SlotView(keys, valid, positions, entry_slots, PAGE, page_min, page_max, num_pages)


def chosen_sets(indices, lengths) -> list[set[int]]:
    return [set(indices[h, : lengths[h]].tolist()) for h in range(len(lengths))]


def test_pack_gives_ascending_valid_indices_and_lengths():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    indices, lengths = pack(mask)
    assert lengths.tolist() == [3, 0, 1] and indices.dtype == torch.int32
    assert chosen_sets(indices, lengths) == [{0, 2, 3}, set(), {1}]


def test_always_kept_holds_sinks_recent_and_appended_slots_only_where_valid():
    view = make_view()
    keep = always_kept(view, sink=4, recent=10)
    for h, count in enumerate((180, 150, 120)):
        kept = set(keep[h].nonzero().squeeze(1).tolist())
        sinks = {t for t in range(count) if view.positions[h, t] < 4}
        assert kept == sinks | set(range(count - 10, count)) | set(range(180, 200))


def test_dense_attends_every_valid_slot():
    view = make_view()
    indices, lengths = make_selection("dense").select(torch.randn(H_KV * GROUPS, D), view)
    assert lengths.tolist() == view.valid.sum(1).tolist()


def test_topk_keeps_budget_per_head_and_the_highest_soft_votes():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    sel = make_selection("topk", budget=64, sink=4, recent=8)
    indices, lengths = sel.select(q, view)
    assert lengths.tolist() == [64, 64, 64]
    keep = always_kept(view, 4, 8)
    for h in range(H_KV):
        logits = q[h * GROUPS:(h + 1) * GROUPS] @ view.keys[h].T
        logits[:, ~view.valid[h]] = float("-inf")
        vote = torch.softmax(logits, dim=1).sum(0)
        vote[keep[h]] = float("-inf")
        extra = 64 - int(keep[h].sum())
        expected = set(torch.topk(vote, extra).indices.tolist()) | set(keep[h].nonzero().squeeze(1).tolist())
        assert chosen_sets(indices, lengths)[h] == expected


def test_budget_fraction_is_of_the_cached_slots():
    view = make_view()
    sel = make_selection("topk", budget_fraction=0.25, sink=0, recent=0)
    _, lengths = sel.select(torch.randn(H_KV * GROUPS, D), view)
    assert lengths.tolist() == [45, 45, 45]


def test_pages_selects_whole_pages_with_the_highest_bounds():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    sel = make_selection("pages", budget=32, sink=0, recent=0)
    indices, lengths = sel.select(q, view)
    appended = set(range(180, 200))
    for h, chosen in enumerate(chosen_sets(indices, lengths)):
        entry = chosen - appended
        assert appended <= chosen
        pages = {t // PAGE for t in entry}
        assert len(pages) == 4  # 32 tokens = 4 pages of 8
        bounds = torch.maximum(q[h * GROUPS:(h + 1) * GROUPS, None, :] * view.page_min[h],
                               q[h * GROUPS:(h + 1) * GROUPS, None, :] * view.page_max[h]).sum(-1).max(0).values
        bounds[int(view.num_pages[h]):] = float("-inf")
        assert pages == set(torch.topk(bounds, 4).indices.tolist())
        for p in pages:  # every valid slot of a chosen page
            assert {t for t in range(p * PAGE, (p + 1) * PAGE) if view.valid[h, t]} <= entry


def test_pages_bound_is_never_below_the_true_max_of_its_page():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    from dkv.kernels.page_scores import page_scores

    bound = page_scores(q, view.page_min, view.page_max, view.num_pages)
    for h in range(H_KV):
        scores = (q[h * GROUPS:(h + 1) * GROUPS] @ view.keys[h].T).max(0).values
        for p in range(int(view.num_pages[h])):
            rows = [t for t in range(p * PAGE, (p + 1) * PAGE) if view.valid[h, t] and t < 180]
            assert bound[h, p] >= scores[rows].max() - 1e-4


def test_selection_cache_reuses_while_similar_and_adds_new_slots():
    view = make_view(t=200)
    cache = SelectionCache(make_selection("topk", budget=40, sink=0, recent=0), threshold=0.9)
    q = torch.randn(H_KV * GROUPS, D)
    first_idx, first_len = cache.select(0, q, view)
    grown = make_view(t=203, entry_slots=180)  # three more slots appended since
    again_idx, again_len = cache.select(0, q + 0.01 * torch.randn_like(q), grown)
    assert cache.hits == 1 and cache.misses == 1
    assert again_len.tolist() == (first_len + 3).tolist()
    for before, after in zip(chosen_sets(first_idx, first_len), chosen_sets(again_idx, again_len)):
        assert after == before | {200, 201, 202}
    cache.select(0, -q, grown)  # a different query: select again
    assert cache.misses == 2
    cache.select(1, q, view)  # per layer
    assert cache.misses == 3


def test_bad_selection_arguments():
    with pytest.raises(ValueError, match="unknown selection 'nope'; use one of"):
        make_selection("nope")
    with pytest.raises(ValueError, match="budget -1 must be >= 0"):
        make_selection("topk", budget=-1)
    with pytest.raises(ValueError, match="budget_fraction 1.5"):
        make_selection("pages", budget_fraction=1.5)
