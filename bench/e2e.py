"""``dkv bench e2e``: the whole system as a client sees it, against ``dkv up`` on this machine.

For contexts of 1K and 4K tokens (SmolLM2): time to first token on a miss (prefill + compress +
store, then decode) and on a hit (lookup + fetch + decode), each the median over fresh contexts;
tokens per second with dense and with sparse (``pages``, budget 1/8) selection; and throughput
(generated tokens per second, all clients together) with 4 concurrent clients on cached contexts.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from dkv.kvstore.entry import Recipe
from dkv.kvstore.redis_server import free_port
from dkv.services.client import DkvClient
from dkv.services.up import Cluster, UpOptions

SENTENCES = ["The committee reviewed the budget for the new library.", "Shelving costs rose by a tenth last year.",
             "The reading room will stay open until nine in the evening.", "Students may borrow laptops for a week.",
             "A new roof is planned for the autumn.", "The east wing will hold the archive of the city.",
             "Volunteers catalogue donated books every Saturday.", "The cafe will move to the ground floor."]
RECIPE = Recipe(method="snapkv", ratio=0.5, chunk_size=256, chunked=True)


def context_ids(tokenizer, tokens: int, seed: int) -> list[int]:
    """A fresh context of exactly ``tokens`` tokens (different per seed, so it is a miss)."""
    text = f"Document {seed}. " + " ".join(SENTENCES[(seed + i) % len(SENTENCES)] for i in range(tokens))
    return tokenizer(text, add_special_tokens=False).input_ids[:tokens]


def _ask(client: DkvClient, context: list[int], query: list[int], **kwargs):
    return client.ask(context, query, recipe=RECIPE, **kwargs)[1]


def run(sizes=(1024, 4096), repeats: int = 3, new_tokens: int = 32, clients: int = 4) -> dict:
    from dkv.workers.model import load_tokenizer

    tokenizer = load_tokenizer()
    query = tokenizer("\nQuestion: What will the library lend to students, and when? Answer in full sentences:",
                      add_special_tokens=False).input_ids
    result = {"benchmark": "e2e", "model": "smollm2-135m", "cpus": os.cpu_count(), "recipe": RECIPE.to_dict()}
    with Cluster(UpOptions(port=free_port(), cpu_bytes="2GiB")) as cluster, DkvClient(cluster.gateway) as client:
        for size in sizes:
            miss, hit, dense_tps, sparse_tps = [], [], [], []
            for seed in range(repeats):
                ctx = context_ids(tokenizer, size, seed + size)
                first = _ask(client, ctx, query, max_new_tokens=new_tokens)
                again = _ask(client, ctx, query, max_new_tokens=new_tokens)
                sparse = _ask(client, ctx, query, max_new_tokens=new_tokens, selection="pages", budget=size // 16)
                assert not first.cache_hit and again.cache_hit, "the benchmark's contexts must miss, then hit"
                miss.append(first.ttft_ms)
                hit.append(again.ttft_ms)
                # tokens per second needs two tokens at least: an answer may end at its first
                dense_tps += [again.tokens_per_second] if again.new_tokens > 1 else []
                sparse_tps += [sparse.tokens_per_second] if sparse.new_tokens > 1 else []
            k = f"{size // 1024}k"
            result[f"ttft_miss_ms_{k}"] = round(statistics.median(miss), 1)
            result[f"ttft_hit_ms_{k}"] = round(statistics.median(hit), 1)
            result[f"ttft_speedup_{k}"] = round(statistics.median(miss) / statistics.median(hit), 1)
            result[f"tokens_per_s_dense_{k}"] = round(statistics.median(dense_tps), 2) if dense_tps else None
            result[f"tokens_per_s_sparse_{k}"] = round(statistics.median(sparse_tps), 2) if sparse_tps else None
            result[f"tokens_per_s_answers_{k}"] = {"dense": len(dense_tps), "sparse": len(sparse_tps), "of": repeats}
        result["concurrent"] = _concurrent(cluster.gateway, tokenizer, query, clients, new_tokens, sizes[0])
    result["targets"] = {
        "hit_10x_faster_at_1k": result.get("ttft_speedup_1k", 0) >= 10,
        "hit_20x_faster_at_4k": result.get("ttft_speedup_4k", 0) >= 20,
    }
    return result


def _concurrent(address: str, tokenizer, query: list[int], clients: int, new_tokens: int, size: int) -> dict:
    """``clients`` threads, each asking about its own cached context 3 times at once with the others."""
    contexts = [context_ids(tokenizer, size, 10_000 + i) for i in range(clients)]
    with DkvClient(address) as warm:
        for ctx in contexts:
            _ask(warm, ctx, query, max_new_tokens=4)
    produced, errors = [], []

    def worker(ctx):
        with DkvClient(address) as client:
            for _ in range(3):
                try:
                    produced.append(_ask(client, ctx, query, max_new_tokens=new_tokens).new_tokens)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    errors.append(repr(e))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(ctx,)) for ctx in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(produced), "errors": len(errors),
            "tokens_per_s": round(sum(produced) / seconds, 2), "seconds": round(seconds, 1)}


def main(args: argparse.Namespace) -> int:
    print(json.dumps(run(repeats=args.repeats), indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    sys.exit(main(parser.parse_args()))
