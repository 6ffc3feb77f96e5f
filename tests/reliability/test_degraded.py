"""The cache is an optimization (issue 18): requests are answered when the store cannot keep an
entry or is down, and everything is cached again once it is back, without restarts.

``dkv up`` as processes (real store, Redis, prefill, decode and gateway) with a host tier too small
for any entry, so every entry must go to Redis:

1. Redis killed: each answer equals the golden one (the same recipe run in this process, entries
   stored as the store keeps them), ``cache_stored`` is false and the not-cached counters move;
2. the store process stopped too: answers still equal the golden ones, their time to first token
   is a miss's (no call waits for the store's deadline);
3. both back: a context asked twice is stored, then a hit.

Prints ``[figures]`` for docs/reliability.md.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import torch

from dkv.kvstore.entry import Recipe
from dkv.services.client import DkvClient
from dkv.services.redis_server import redis_server_available
from dkv.services.transport import RECONNECT, free_port
from dkv.services.up import Cluster, UpOptions
from dkv.workers.compression import compress_chunks
from dkv.workers.decode import generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not redis_server_available(), reason="redis-server not on PATH (make test installs it)"),
]

RECIPE = Recipe(method="snapkv", ratio=0.5, chunk_size=128, chunked=True)
NEW = 12
FACTS = [
    "The lighthouse keeper on Vessa island is named Orla and she paints the tower every June.",
    "The bakery on Canal Street opens at six and sells rye bread with caraway seeds.",
    "The ferry to Dunmore leaves at noon and carries bicycles for free on Sundays.",
    "The town choir rehearses on Thursdays in the old granary beside the mill pond.",
    "The museum's oldest map shows the harbour before the sea wall was built in 1820.",
]
FILLER = "Gulls circled over the harbour while the tide came in slowly. "


def context_ids(tokenizer, i: int) -> list[int]:
    return tokenizer(FILLER * 6 + FACTS[i] + " " + FILLER * 6, add_special_tokens=False).input_ids


def golden(model, tokenizer, context: list[int], query: list[int]) -> str:
    """What dkv must answer: the recipe run here, K/V stored as the prefill worker stores them."""
    entries = [
        e.cast(torch.float16)
        for e in compress_chunks(
            model, torch.tensor([context]), RECIPE.method, RECIPE.ratio, chunk_size=RECIPE.chunk_size
        )
    ]
    return tokenizer.decode(generate(model, tokenizer, entries, torch.tensor([query]), NEW), skip_special_tokens=True)


def counter(metrics_address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


REDIAL_S = 1.25 * dict(RECONNECT)["grpc.max_reconnect_backoff_ms"] / 1000  # gRPC jitters backoff by 20%


def test_the_store_failing_or_down_never_fails_a_request_and_caching_resumes(smollm2):
    model, tokenizer = smollm2
    query = tokenizer(
        "\nQuestion: Summarize the sentence that is not about gulls. Answer:", add_special_tokens=False
    ).input_ids
    options = UpOptions(
        port=free_port(),
        http_port=0,
        cpu_bytes="1MiB",
        redis_bytes="256MiB",
        metrics=True,
        device="cpu",
        dtype="float32",
    )
    with Cluster(options) as cluster, DkvClient(cluster.gateway, timeout_s=300) as client:

        def ask(i: int):
            started = time.perf_counter()
            text, stats = client.ask(context_ids(tokenizer, i), query, recipe=RECIPE, max_new_tokens=NEW)
            return text, stats, time.perf_counter() - started

        text, stats, healthy_s = ask(0)  # healthy: the entries go to Redis
        assert stats.cache_stored
        assert text == golden(model, tokenizer, context_ids(tokenizer, 0), query)
        healthy_miss_ms = stats.ttft_ms

        # 1. Redis killed: the store can keep nothing; every request is answered, uncached
        cluster.kill("redis")
        for i in (1, 2):
            text, stats, _ = ask(i)
            assert text == golden(model, tokenizer, context_ids(tokenizer, i), query)
            assert not stats.cache_stored and stats.not_stored_reason and not stats.cache_hit
        assert counter(cluster.metrics["prefill"], "dkv_prefill_not_stored_total") >= 2
        assert counter(cluster.metrics["gateway"], "dkv_gateway_not_cached_total") == 2
        assert counter(cluster.metrics["prefill"], "dkv_prefill_degraded") == 1

        # 2. the store stopped too: still answered, at a miss's speed
        cluster.kill("store")
        ttfts = []
        for i in (3, 1):
            text, stats, seconds = ask(i)
            assert text == golden(model, tokenizer, context_ids(tokenizer, i), query)
            assert not stats.cache_stored
            ttfts.append(stats.ttft_ms)
            assert seconds < 3 * healthy_s + 5  # nothing waited for a store deadline (60 s)
        assert max(ttfts) < 2.5 * healthy_miss_ms + 1000
        assert counter(cluster.metrics["gateway"], "dkv_gateway_degraded") == 1

        # 3. both back, nothing restarted but them: stored again, then a hit
        cluster.restart("redis")
        cluster.restart("store")
        time.sleep(REDIAL_S)  # the workers' channels redial a peer that came back within this
        text, stats, _ = ask(4)
        assert stats.cache_stored and not stats.cache_hit
        again, stats, _ = ask(4)
        assert stats.cache_hit and again == text == golden(model, tokenizer, context_ids(tokenizer, 4), query)
        print(
            f"[figures] issue 18: 6 requests answered with Redis down (2), the store down (2) and both back (2); "
            f"failed 0, wrong 0; healthy miss TTFT {healthy_miss_ms:.0f} ms, store-down TTFT "
            f"{max(ttfts):.0f} ms; not cached 4; a hit after recovery"
        )
