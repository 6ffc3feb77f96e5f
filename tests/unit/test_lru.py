"""workers.lru.BytesLRU: bounded in bytes, least recently used out first, items expire after ttl_s."""

from __future__ import annotations

import time

from dkv.workers.lru import BytesLRU


def test_the_least_recently_used_leave_first_and_the_bytes_stay_bounded():
    cache = BytesLRU(100, len)
    for key in "abc":
        cache.put(key, key * 30)
    assert cache.used == 90 and cache.get("a") == "a" * 30  # a is now the most recent
    cache.put("d", "d" * 30)
    assert cache.get("b") is None and cache.get("a") is not None and cache.used == 90
    cache.put("a", "a" * 10)  # replacing counts the new size once
    assert cache.used == 70 and len(cache) == 3


def test_one_item_larger_than_the_capacity_is_kept_alone_and_zero_capacity_keeps_nothing():
    cache = BytesLRU(10, len)
    cache.put("x", "x" * 5)
    cache.put("big", "b" * 50)
    assert cache.get("x") is None and cache.get("big") == "b" * 50 and cache.used == 50
    none = BytesLRU(0, len)
    none.put("x", "x")
    assert none.get("x") is None and len(none) == 0


def test_items_expire_after_their_time_to_live():
    cache = BytesLRU(100, len, ttl_s=0.05)
    cache.put("k", "v")
    assert cache.get("k") == "v"
    time.sleep(0.08)
    assert cache.get("k") is None and cache.used == 0
    assert (cache.hits, cache.misses) == (1, 1)
