"""Golden equivalence: the answer through the store is the answer without it.

Through the real gateway, prefill and decode services and a three-tier store (device memory on
the CPU here, host memory, real Redis that shrinks what it receives), greedy tokens for a cold
miss, a full hit, a partial prefix hit, an entry demoted one tier and an entry shrunk by its
demotion into Redis equal a fresh local run with the same recipe and selection (for the shrunk
entry: a fresh run on the same shrink of a fresh entry). With recipe ``full`` and selection
``dense`` they equal plain transformers generation. An entry lost to eviction is recomputed, with
the same answer; an entry of another model is never used.
"""

from __future__ import annotations

import pytest
import torch
from in_process import InProcessServer

from dkv.kvstore.entry import Recipe
from dkv.kvstore.shrink import ShrinkRule
from dkv.services.client import DkvClient
from dkv.services.decode_server import DecodeServer
from dkv.services.gateway_server import GatewayServer
from dkv.services.prefill_client import PrefillClient
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import DecodeSettings, GatewaySettings, PrefillSettings, StoreSettings
from dkv.services.shards import open_store
from dkv.services.store_client import StoreClient
from dkv.services.store_server import StoreServer, build_store
from dkv.testing import synthetic_entry
from dkv.workers.compression import compress_chunks
from dkv.workers.decode import generate
from dkv.workers.decode_worker import DecodeWorker
from dkv.workers.prefill import PrefillWorker

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]

MB = 1 << 20
REDIS_SHRINK = ShrinkRule(keep_fraction=0.5, quant="int8")
NEW_TOKENS = 8
STORAGE_DTYPE = torch.float16  # the prefill worker's default for this float32 model (storage_dtype auto)
STORY = (
    "Mara kept bees on the hill above Tollan. Each spring she carried the hives down to the orchards, and "
    "each autumn she sold the honey in the market by the river. Her brother Ivo mended the boats. "
)
CASES = [  # (recipe, selection, budget)
    (Recipe(method="full", chunk_size=128, chunked=True), "dense", 0),
    (Recipe(method="snapkv", ratio=0.5, chunk_size=128, chunked=True), "topk", 48),
]


@pytest.fixture(scope="module")
def cluster(smollm2, redis_server):
    model, tokenizer = smollm2
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    # entries of this float32 model take ~46 KB per token: each memory tier holds a few contexts
    settings = StoreSettings(
        port=0,
        device="cpu",
        device_bytes=24 * MB,
        cpu_bytes=24 * MB,
        redis_url=redis_server.url,
        redis_bytes=256 * MB,
        redis_keep_fraction=REDIS_SHRINK.keep_fraction,
        redis_quant=REDIS_SHRINK.quant,
        policy="lru",
    )
    store = InProcessServer(StoreServer(settings, build_store(settings)))
    prefill = InProcessServer(
        PrefillServer(
            PrefillSettings(port=0), PrefillWorker(model, tokenizer, open_store(store.address, timeout_s=120))
        )
    )
    prefill_client = PrefillClient(prefill.address)
    decode = InProcessServer(
        DecodeServer(
            DecodeSettings(port=0),
            DecodeWorker(
                model, tokenizer, open_store(store.address, timeout_s=120), prefill_client, entry_cache_bytes=0
            ),
        )
    )  # every hit read from the store: these tests follow entries through its tiers
    gateway = InProcessServer(GatewayServer(GatewaySettings(port=0, prefill=prefill.address, decode=decode.address)))
    with DkvClient(gateway.address) as client, StoreClient(store.address) as store_client:
        yield client, store_client, store.server.store, model, tokenizer
    for server in (gateway, decode, prefill):
        server.stop()
    prefill_client.close()
    store.stop()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def ask(client, context: list[int], query: list[int], recipe: Recipe, selection: str, budget: int):
    return client.ask(context, query, recipe=recipe, selection=selection, budget=budget, max_new_tokens=NEW_TOKENS)


def fresh(
    model,
    tokenizer,
    context: list[int],
    query: list[int],
    recipe: Recipe,
    selection: str,
    budget: int,
    shrink: ShrinkRule | None = None,
) -> str:
    """The answer of a local run: compress the context now, decode from it, no store."""
    entries = compress_chunks(
        model, torch.tensor([context]), recipe.method, recipe.ratio, chunk_size=recipe.chunk_size, **dict(recipe.params)
    )
    entries = [e.cast(STORAGE_DTYPE) for e in entries]  # as the prefill worker stores them
    if shrink is not None:
        entries = [shrink.apply(e) for e in entries]
    tokens = generate(model, tokenizer, entries, torch.tensor([query]), NEW_TOKENS, selection, budget or None)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def tiers_of(store_client, model, recipe: Recipe, context: list[int]) -> set[str]:
    found = store_client.lookup(model.dkv_fingerprint, recipe, context)
    assert found is not None and found.cached_tokens == len(context)
    return set(found.tiers)


def push_down(store_client, seed: int, tiers: int) -> None:
    """Put newer entries until everything older has moved ``tiers`` tiers down (the store is LRU)."""
    for i in range(7 * tiers):  # 7 x 4 MiB > 24 MiB, one memory tier
        store_client.put(synthetic_entry(seq_len=2600, num_layers=2, seed=seed * 1000 + i, model_fingerprint="filler"))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{r.method}-{s}" for r, s, _ in CASES])
def test_miss_hit_and_partial_prefix_hit_equal_a_fresh_run(cluster, case):
    client, _, _, model, tokenizer = cluster
    recipe, selection, budget = CASES[case]
    context = ids(tokenizer, STORY * 3 + f"Case {case}. ")
    longer = context + ids(tokenizer, " In winter Mara mended the hives while the bees slept in the barn.")
    query = ids(tokenizer, "\nQuestion: What did Ivo mend? Answer:")
    expected = fresh(model, tokenizer, context, query, recipe, selection, budget)

    text, miss = ask(client, context, query, recipe, selection, budget)
    assert (text, miss.cache_hit, miss.cached_prefix_tokens) == (expected, False, 0)
    text, hit = ask(client, context, query, recipe, selection, budget)
    assert (text, hit.cache_hit, hit.prefilled_tokens) == (expected, True, 0)
    text, partial = ask(client, longer, query, recipe, selection, budget)
    assert partial.cached_prefix_tokens >= recipe.chunk_size and partial.prefilled_tokens > 0
    assert text == fresh(model, tokenizer, longer, query, recipe, selection, budget)


def test_full_dense_equals_plain_transformers_generation(cluster):
    client, _, _, model, tokenizer = cluster
    context = ids(tokenizer, STORY * 2)
    query = ids(tokenizer, "\nQuestion: Where did Mara sell the honey? Answer:")
    full = torch.tensor([context + query])
    plain = model.generate(full, max_new_tokens=NEW_TOKENS, do_sample=False)[0, full.shape[1] :]
    for _ in range(2):  # the miss, then the hit
        text, _ = ask(client, context, query, Recipe(method="full", chunk_size=128, chunked=True), "dense", 0)
        assert text == tokenizer.decode(plain, skip_special_tokens=True)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{r.method}-{s}" for r, s, _ in CASES])
def test_demoted_and_shrunk_entries_equal_a_fresh_run_of_what_is_stored(cluster, case):
    client, store_client, store, model, tokenizer = cluster
    recipe, selection, budget = CASES[case]
    context = ids(tokenizer, STORY * 2 + f"Demotion case {case}. ")
    query = ids(tokenizer, "\nQuestion: Who kept bees? Answer:")
    expected = fresh(model, tokenizer, context, query, recipe, selection, budget)
    assert ask(client, context, query, recipe, selection, budget)[0] == expected
    assert tiers_of(store_client, model, recipe, context) == {"device"}

    push_down(store_client, seed=10 + case, tiers=1)  # the context moves to host memory
    assert tiers_of(store_client, model, recipe, context) == {"cpu"}
    text, stats = ask(client, context, query, recipe, selection, budget)
    assert stats.cache_hit and set(stats.bytes_fetched_by_tier) == {"cpu"} and text == expected

    push_down(store_client, seed=20 + case, tiers=2)  # (promoted by the hit) into Redis, shrunk on the way
    assert tiers_of(store_client, model, recipe, context) == {"redis"}
    text, stats = ask(client, context, query, recipe, selection, budget)
    assert stats.cache_hit and set(stats.bytes_fetched_by_tier) == {"redis"}
    assert text == fresh(model, tokenizer, context, query, recipe, selection, budget, shrink=REDIS_SHRINK)
    assert store.stats().demotions > 0


def test_an_evicted_entry_is_recomputed_with_the_same_answer(cluster):
    client, store_client, _, model, tokenizer = cluster
    recipe, selection, budget = CASES[1]
    context = ids(tokenizer, STORY * 2 + "Eviction case. ")
    query = ids(tokenizer, "\nQuestion: What did Mara carry? Answer:")
    first, _ = ask(client, context, query, recipe, selection, budget)
    for key in store_client.lookup(model.dkv_fingerprint, recipe, context).keys:
        assert store_client.delete(key)  # what eviction from the last tier does
    assert store_client.lookup(model.dkv_fingerprint, recipe, context) is None
    again, stats = ask(client, context, query, recipe, selection, budget)
    assert not stats.cache_hit and stats.prefilled_tokens == len(context) and again == first


def test_an_entry_of_another_model_is_never_used(cluster):
    """Same name, other weights: another fingerprint, so neither lookups nor keys reach its entries."""
    client, store_client, _, model, tokenizer = cluster
    recipe = CASES[0][0]
    context = ids(tokenizer, STORY + "Model case. ")
    ask(client, context, ids(tokenizer, " Answer:"), recipe, "dense", 0)
    keys = [str(k) for k in store_client.lookup(model.dkv_fingerprint, recipe, context).keys]
    assert store_client.lookup("0123456789abcdef", recipe, context) is None

    class OtherWeights:  # what loading a retrained model under the same name gives: a new fingerprint
        dkv_fingerprint = "0123456789abcdef"
        config = model.config

    worker = DecodeWorker(model, tokenizer, store_client)
    worker.model = OtherWeights()
    from dkv.workers.decode_worker import DecodeJob

    with pytest.raises(ValueError, match="was computed by model"):
        worker.check(DecodeJob(query_ids=[1, 2], keys=keys, max_new_tokens=1))
