"""Partial fetch: Summaries and Select over gRPC, and decoding page by page from the store."""

from __future__ import annotations

import grpc
import pytest
import torch

from dkv.kvstore.entry import page_counts, page_of_rows
from dkv.services.store_client import StoreClient
from dkv.testing import synthetic_entry
from dkv.workers.compression import compress
from dkv.workers.decode import DecodeStats, generate_remote
from dkv.workers.paged import EntryLost, FetchStats, page_cache

pytestmark = pytest.mark.timeout(600)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.mark.parametrize("quant", ["none", "int4", "mixed"])
def test_select_returns_exactly_the_rows_of_the_requested_pages(store_service, quant):
    server = store_service()
    entry = synthetic_entry(seq_len=700, num_layers=3, keep_fraction=0.5, quant_scheme=quant)
    with StoreClient(server.address) as client:
        key = client.put(entry).key
        summaries = client.summaries(key)
        assert [s.layer for s in summaries] == [0, 1, 2]
        layer = entry.layers[1]
        assert torch.equal(summaries[1].head_counts, layer.head_counts().to(torch.int32))
        assert torch.equal(summaries[1].page_min, layer.page_min)
        n_pages = int(page_counts(layer.head_counts(), entry.page_size).sum())
        pages = [0, 4, n_pages // 2, n_pages - 1]
        parts, nbytes, tier = client.select(key, 1, pages)
        assert tier == "cpu" and 0 < nbytes < layer.nbytes / 3
        rows = torch.isin(page_of_rows(layer.head_offsets, entry.page_size), torch.tensor(pages)).nonzero().squeeze(1)
        (part,) = parts
        k, v = layer.dequantized(entry.page_size, torch.float32)
        pk, pv = part.dequantized(entry.page_size, torch.float32)
        assert torch.equal(part.positions, layer.positions[rows])
        assert torch.equal(pk, k[rows]) and torch.equal(pv, v[rows])


def test_select_rejects_bad_layers_and_pages_and_misses_cleanly(store_service):
    server = store_service()
    entry = synthetic_entry(seq_len=200, num_layers=2)
    with StoreClient(server.address) as client:
        key = client.put(entry).key
        for layer, pages, message in (
            (5, [0], "layer 5 does not exist"),
            (0, [3, 1], "ascending"),
            (0, [10**6], "ascending indices in [0,"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                client.select(key, layer, pages)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        assert client.select("default/m/r/nothere", 0, [0]) is None
        assert client.summaries("default/m/r/nothere") is None


def test_page_cache_stays_within_its_bytes():
    cache = page_cache(capacity_bytes=10_000)
    for page in range(50):
        cache.put((0, page), (0, torch.zeros(16, 16), torch.zeros(16, 16)))
        assert cache.used <= 10_000
    assert cache.get((0, 49)) is not None and cache.get((0, 0)) is None


@pytest.mark.slow
def test_paged_decoding_moves_bytes_with_the_budget_not_the_context(smollm2, store_service):
    model, tokenizer = smollm2
    server = store_service()
    query = tokenizer(
        "\nWhat is the pass key? The pass key is", return_tensors="pt", add_special_tokens=False
    ).input_ids
    first_step = {}
    with StoreClient(server.address, timeout_s=60) as client:
        for fill in (25, 50):
            ctx = tokenizer(
                FILLER * 6 + "The pass key is 71432. Remember it. " + FILLER * fill, return_tensors="pt"
            ).input_ids
            key = str(client.put(compress(model, ctx, "full")).key)
            for budget in (64, 128):
                fetch, stats = FetchStats(), DecodeStats()
                out = list(generate_remote(model, tokenizer, client, key, query, 8, budget, stats=stats, fetch=fetch))
                assert "71432" in tokenizer.decode(out)
                first_step[(ctx.shape[1], budget)] = fetch.bytes_per_step[0]
                assert fetch.cache_hits > 0  # later steps reuse pages already fetched
                assert sum(fetch.bytes_per_step) < ctx.shape[1] * 30 * 3 * 64 * 2 * 4  # far below the whole entry
        (short, long_) = sorted({n for n, _ in first_step})
        for budget in (64, 128):  # twice the context: about the same bytes
            assert first_step[(long_, budget)] < 1.2 * first_step[(short, budget)]
        for n in (short, long_):  # twice the budget: about twice the bytes
            assert 1.6 < first_step[(n, 128)] / first_step[(n, 64)] < 2.4
        client.delete(key)
        with pytest.raises(EntryLost):
            list(generate_remote(model, tokenizer, client, key, query, 4, 64))
