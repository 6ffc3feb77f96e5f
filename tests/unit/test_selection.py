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
            rows = keys[h, p * PAGE : min((p + 1) * PAGE, c)]
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


def test_always_kept_holds_entry_sinks_and_the_newest_slots_only_where_valid():
    view = make_view()  # slots 180..199 were appended (query and generated tokens)
    for recent, newest_entry in ((10, 0), (25, 5)):
        keep = always_kept(view, sink=4, recent=recent)
        for h, count in enumerate((180, 150, 120)):
            kept = set(keep[h].nonzero().squeeze(1).tolist())
            sinks = {t for t in range(count) if view.positions[h, t] < 4}
            newest = set(range(200 - min(recent, 20), 200)) | set(range(count - newest_entry, count))
            assert kept == sinks | newest


def test_dense_attends_every_valid_slot():
    view = make_view()
    indices, lengths = make_selection("dense").select(torch.randn(H_KV * GROUPS, D), view)
    assert lengths.tolist() == view.valid.sum(1).tolist()


def soft_votes(q: torch.Tensor, view: SlotView) -> torch.Tensor:
    """Attention weights at the model's scale, summed over each KV head's query heads: [H_kv, T]."""
    logits = (q.view(H_KV, GROUPS, D) @ view.keys.transpose(1, 2)) * D**-0.5
    logits = logits.masked_fill(~view.valid.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1).sum(1)


def test_topk_fills_the_layers_budget_with_the_highest_soft_votes_of_any_head():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    sel = make_selection("topk", budget=64, sink=4, recent=8)
    indices, lengths = sel.select(q, view)
    assert int(lengths.sum()) == 64 * H_KV  # everything counted: sinks, recent and appended slots too
    keep = always_kept(view, 4, 8)
    vote = soft_votes(q, view).masked_fill(keep | ~view.valid, float("-inf"))
    extra = 64 * H_KV - int(keep.sum())
    top = set(torch.topk(vote.flatten(), extra).indices.tolist())
    for h, chosen in enumerate(chosen_sets(indices, lengths)):
        expected = {t for t in range(200) if h * 200 + t in top} | set(keep[h].nonzero().squeeze(1).tolist())
        assert chosen == expected


def test_topk_gives_a_focused_head_fewer_slots_than_spread_out_ones():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    view.keys[0] *= 0.01  # head 0 attends to one token only: it holds its whole attention
    view.keys[0, 77] = 50 * q[:GROUPS].mean(0) / q[:GROUPS].mean(0).norm()
    _, lengths = make_selection("topk", budget=40, sink=0, recent=0).select(q, view)
    assert int(lengths.sum()) == 40 * H_KV
    assert lengths[0] < 40 < min(lengths[1], lengths[2])


def test_budget_fraction_is_of_the_cached_slots():
    view = make_view()
    sel = make_selection("topk", budget_fraction=0.25, sink=0, recent=0)
    _, lengths = sel.select(torch.randn(H_KV * GROUPS, D), view)
    assert int(lengths.sum()) == 45 * H_KV


def test_pages_takes_whole_pages_best_first_until_the_budget_is_spent():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    sel = make_selection("pages", budget=32, sink=0, recent=4)
    keep = sel.keep(q, view)
    newest = always_kept(view, 0, 4)
    total = int(keep.sum())
    assert 32 * H_KV - PAGE < total <= 32 * H_KV
    assert (keep & ~view.valid).sum() == 0 and (keep & newest).sum() == newest.sum()
    # pages: the entry's by its summaries, then the appended slots' (180..199) in pages of their own
    page_of = [t // PAGE if t < 180 else 23 + (t - 180) // PAGE for t in range(200)]
    chosen = {(h, page_of[t]) for h in range(H_KV) for t in range(200) if keep[h, t] and not newest[h, t]}
    for h, p in chosen:  # every valid slot of a chosen page
        assert all(keep[h, t] for t in range(200) if page_of[t] == p and view.valid[h, t])


def test_pages_finds_the_page_of_a_planted_key_in_any_head():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    direction = q[GROUPS : 2 * GROUPS].mean(0)
    view.keys[1, 93] = 20 * direction / direction.norm()  # head 1, page 11
    view.page_max[1, 11] = torch.maximum(view.page_max[1, 11], view.keys[1, 93])
    view.page_min[1, 11] = torch.minimum(view.page_min[1, 11], view.keys[1, 93])
    keep = make_selection("pages", budget=16, sink=0, recent=0).keep(q, view)
    assert all(keep[1, t] for t in range(88, 96))


def test_pages_bound_is_never_below_the_true_max_of_its_page():
    view = make_view()
    q = torch.randn(H_KV * GROUPS, D)
    from dkv.kernels.page_scores import page_scores

    bound = page_scores(q, view.page_min, view.page_max, view.num_pages)
    for h in range(H_KV):
        scores = (q[h * GROUPS : (h + 1) * GROUPS] @ view.keys[h].T).max(0).values
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
    with pytest.raises(ValueError, match="page_size 0 must be >= 1"):
        make_selection("pages", page_size=0)
