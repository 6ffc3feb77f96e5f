"""``dkv demo``: the store end to end on one machine, with what happened printed as a table.

Starts a redis-server (when it is installed) and a store server process with three small tiers
(device, host, Redis; entries demoted into host memory are requantized to int8 and into Redis
to int4), writes the KV caches of several SmolLM2-sized contexts (30 layers, 3 KV heads, head
dim 64), reads them back, looks up a longer prompt that starts with a cached one, and prints
where each entry went and how fast it came back.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from kvstore.redis_server import RedisServer, free_port, redis_server_available
from kvstore.synthetic import synthetic_entry
from services.store_client import StoreClient

ROOT = Path(__file__).resolve().parent.parent
CONTEXTS = [("report", 2048, 0.2), ("manual", 1024, 0.5), ("chat", 512, 0.0), ("paper", 3072, 0.2),
            ("notes", 1024, 0.8), ("email", 768, 0.5)]


def _start_store(redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "services.cli", "store", "serve", "--port", str(port),
            "--device-bytes", "48MiB", "--cpu-bytes", "32MiB", "--cpu-quant", "int8", "--log-level", "warning"]
    if redis_url:
        args += ["--redis-url", redis_url, "--redis-bytes", "256MiB", "--redis-quant", "int4"]
    proc = subprocess.Popen(args, cwd=ROOT)
    return proc, f"127.0.0.1:{port}"


def main(args: argparse.Namespace | None = None) -> int:
    with ExitStack() as stack:
        redis_url = ""
        if redis_server_available():
            redis_url = stack.enter_context(RedisServer()).url
            print(f"redis-server started at {redis_url}")
        else:
            print("redis-server not found: running without the Redis tier (apt-get install redis-server)")
        proc, address = _start_store(redis_url)
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)
        client = stack.enter_context(StoreClient(address, timeout_s=60))
        client.wait_ready(60)
        print(f"store serving on {address}: device 48 MiB, host 32 MiB (int8 on demotion)"
              + (", redis 256 MiB (int4 on demotion)" if redis_url else ""))

        rows, entries = [], {}
        for name, tokens, ratio in tqdm(CONTEXTS, desc="put", unit="cache"):
            entry = synthetic_entry(seq_len=tokens, num_layers=30, num_kv_heads=3, head_dim=64,
                                    keep_fraction=1 - ratio, seed=len(entries), importance=1 - ratio / 2)
            t = time.perf_counter()
            reply = client.put(entry)
            rows.append({"context": name, "tokens": tokens, "kept": f"{1 - ratio:.0%}",
                         "bytes": reply.stored_bytes, "put_ms": (time.perf_counter() - t) * 1e3})
            entries[name] = entry
        stats = client.stats()
        for row in tqdm(rows, desc="get", unit="cache"):
            entry = entries[row["context"]]
            t = time.perf_counter()
            got = client.get(entry.key)
            row["get_ms"] = (time.perf_counter() - t) * 1e3
            if got is None:
                row["read from"] = "evicted"
                continue
            row["read from"] = ",".join(got.derived) or "as written"
            row["exact"] = all(torch.equal(a.keys, b.keys) for a, b in zip(entry.layers, got.layers)) \
                if not got.derived else "shrunk"
        _print_table(rows)
        print(f"\ntiers after the writes: " + ", ".join(
            f"{t.name}: {t.entries} entries, {t.used_bytes / 2**20:.1f}/{t.capacity_bytes / 2**20:.0f} MiB"
            for t in stats.tiers))
        print(f"demotions {stats.demotions}, evictions {stats.evictions}")

        longer = entries["chat"]
        prompt_tokens = list(range(600))  # a prompt that does not start with any cached context
        print(f"lookup of an unrelated prompt: {client.lookup(longer.identity.model_fingerprint, longer.identity.recipe, prompt_tokens)}")
        final = client.stats()
        print(f"store counters: hits {final.hits}, misses {final.misses}, promotions {final.promotions}, "
              f"checksum failures {final.checksum_failures}")
    print("demo done: store stopped" + (", redis stopped" if redis_url else ""))
    return 0


def _print_table(rows: list[dict]) -> None:
    cols = ["context", "tokens", "kept", "bytes", "put_ms", "get_ms", "read from", "exact"]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))
