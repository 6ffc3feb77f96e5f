"""Memory pressure: tiers of a few MB, ten times that written, with mixed importance.

Usage never exceeds any tier's capacity, important entries outlive unimportant ones, every read
is the exact entry or a miss, and the process's resident memory stays bounded.
"""

from __future__ import annotations

import hashlib

import pytest
import redis

from dkv.services.settings import StoreSettings
from dkv.services.store_client import StoreClient
from dkv.testing import synthetic_entry

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(300)]

MB = 1 << 20
CAPACITY = {"device": 2 * MB, "cpu": 4 * MB, "redis": 8 * MB}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def digest(entry) -> str:
    h = hashlib.blake2b(digest_size=16)
    for layer in entry.layers:
        for name, tensor in sorted(layer.tensors().items()):
            h.update(name.encode())
            h.update(tensor.contiguous().view(-1).view(dtype=tensor.dtype).numpy().tobytes())
    return h.hexdigest()


def test_ten_times_the_capacity_with_mixed_importance(store_service, redis_url):
    server = store_service(
        StoreSettings(
            port=0,
            device="cpu",
            device_bytes=CAPACITY["device"],
            cpu_bytes=CAPACITY["cpu"],
            redis_url=redis_url,
            redis_bytes=CAPACITY["redis"],
        )
    )
    total_capacity = sum(CAPACITY.values())
    written, digests, important = 0, {}, {}
    baseline = None
    with StoreClient(server.address, timeout_s=60) as client:
        i = 0
        while written < 10 * total_capacity:
            entry = synthetic_entry(
                seq_len=512,
                num_layers=2,
                seed=i,
                importance=0.9 if i % 4 == 0 else 0.05,
                token_ids=list(range(i * 1000, i * 1000 + 512)),
            )
            reply = client.put(entry)
            written += reply.stored_bytes
            digests[str(reply.key)], important[str(reply.key)] = digest(entry), i % 4 == 0
            for tier in client.stats().tiers:
                assert tier.used_bytes <= tier.capacity_bytes, f"{tier.name} over capacity after put {i}"
            if i == 20:
                baseline = rss_bytes()  # the process has warmed up: buffers, allocator pools
            i += 1
        stats = client.stats()
        survived = {True: 0, False: 0}
        for key, want in digests.items():
            got = client.get(key)
            if got is not None:
                assert digest(got) == want, f"{key} came back with other bytes"
                survived[important[key]] += 1
    n_important = sum(important.values())
    rate_important = survived[True] / n_important
    rate_other = survived[False] / (len(digests) - n_important)
    print(
        f"\nmemory pressure: {len(digests)} entries, {written / MB:.0f} MiB written, survived: important "
        f"{rate_important:.0%}, others {rate_other:.0%}; RSS +{(rss_bytes() - baseline) / MB:.0f} MiB"
    )
    assert stats.evictions > 0 and stats.demotions > 0
    assert rate_important > 3 * rate_other, (rate_important, rate_other)
    assert rss_bytes() - baseline < 96 * MB  # 10x the capacity went through; the tiers hold 14 MB
    used = redis.Redis.from_url(redis_url).info("memory")["used_memory"]
    assert used < CAPACITY["redis"] + 8 * MB  # Redis's own overhead beside what the store counts
