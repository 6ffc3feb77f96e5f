"""Decoding from compressed entries with the real SmolLM2: equivalence, passkey, sampling."""

from __future__ import annotations

import pytest
import torch

from dkv.workers.compression import compress
from dkv.workers.decode import DecodeStats, generate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_TEXT = FILLER * 6 + "The pass key is 71432. Remember it. " + FILLER * 30


@pytest.fixture(scope="module")
def passkey(smollm2):
    model, tokenizer = smollm2
    ctx = tokenizer(PASSKEY_TEXT, return_tensors="pt").input_ids
    query = tokenizer(
        "\nWhat is the pass key? The pass key is", return_tensors="pt", add_special_tokens=False
    ).input_ids
    return ctx, query, compress(model, ctx, "full")


def test_dense_selection_reproduces_full_attention_greedy_output(smollm2, passkey):
    model, tokenizer = smollm2
    ctx, query, entry = passkey
    full = torch.cat([ctx, query], 1)
    plain = model.generate(full, max_new_tokens=10, do_sample=False)[0, full.shape[1] :].tolist()
    assert generate(model, tokenizer, entry, query, 10, selection="dense") == plain


@pytest.mark.parametrize("selection", ["topk", "pages"])
def test_sparse_selections_keep_the_passkey_at_an_eighth_of_the_tokens(smollm2, passkey, selection):
    model, tokenizer = smollm2
    ctx, query, entry = passkey
    budget = ctx.shape[1] // 8
    stats = DecodeStats()
    out = generate(model, tokenizer, entry, query, 6, selection=selection, budget=budget, stats=stats)
    assert "71432" in tokenizer.decode(out)
    # everything counted (sinks, recent, query and generated tokens, every layer): within one page of the budget
    assert stats.steps >= 1 and all(budget - 8 <= s <= budget for s in stats.selected_per_step)


def test_selection_cache_is_used_and_changes_nothing_for_dense(smollm2, passkey):
    model, tokenizer = smollm2
    ctx, query, entry = passkey
    stats = DecodeStats()
    cached = generate(
        model, tokenizer, entry, query, 6, selection="topk", budget=ctx.shape[1] // 4, selection_cache=0.9, stats=stats
    )
    assert stats.selection_cache_hits > 0
    assert "71432" in tokenizer.decode(cached)


def test_sampling_is_seeded_and_stops_at_end_of_turn(smollm2, passkey):
    model, tokenizer = smollm2
    _, query, entry = passkey
    a = generate(model, tokenizer, entry, query, 12, temperature=0.8, top_p=0.9, seed=7)
    b = generate(model, tokenizer, entry, query, 12, temperature=0.8, top_p=0.9, seed=7)
    assert a == b and 1 <= len(a) <= 12
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    greedy = generate(model, tokenizer, entry, query, 50)
    assert greedy[-1] == stop or len(greedy) == 50
    assert stop not in greedy[:-1]


def test_query_ids_must_be_one_row(smollm2, passkey):
    model, tokenizer = smollm2
    entry = passkey[2]
    with pytest.raises(ValueError, match=r"query_ids must be \[1, T\]"):
        generate(model, tokenizer, entry, torch.tensor([1, 2, 3]), 4)


def test_needle_counter_sees_every_needle_slot_kept_by_an_unbounded_selection_and_fewer_by_a_small_one(
    smollm2, passkey
):
    from dkv.bench.decode import NeedleCounter

    model, tokenizer = smollm2
    ctx, query, entry = passkey
    ids = ctx[0].tolist()
    key = tokenizer(" 71432", add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(key)] == key)
    rates = {}
    for budget in (ctx.shape[1] + 64, 24):
        counter = NeedleCounter(len(entry.layers))
        counter.span = (start, start + len(key))
        generate(model, tokenizer, entry, query, 3, selection="topk", budget=budget, observe=counter)
        rates[budget] = counter.rates()
        assert all(r is not None for r in rates[budget])  # every layer saw the needle's slots
    assert all(r == 1.0 for r in rates[ctx.shape[1] + 64])
    assert min(rates[24]) < 1.0
