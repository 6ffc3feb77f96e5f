"""Rendezvous hashing of entry keys over store shards (services.shards)."""

from __future__ import annotations

from collections import Counter

import pytest

from dkv.kvstore.entry import EntryKey
from dkv.services.shards import owner, ranked, resolve_shards, shard_addresses

KEYS = [EntryKey("default", "model", "recipe", f"{i:032x}") for i in range(3000)]
SHARDS = [f"dkv-store-{i}.dkv-store-headless:50052" for i in range(3)]


def test_keys_spread_evenly_and_every_client_agrees():
    placed = [owner(k, SHARDS) for k in KEYS]
    counts = Counter(placed)
    assert sorted(counts) == [0, 1, 2]
    assert all(800 <= c <= 1200 for c in counts.values()), counts  # 1000 each, binomial spread ~26
    assert placed == [owner(str(k), list(SHARDS)) for k in KEYS]  # str keys, a copy of the list: same owner


def test_adding_a_shard_moves_only_the_keys_it_wins_and_removing_it_moves_them_back():
    before = [SHARDS[owner(k, SHARDS)] for k in KEYS]
    grown = SHARDS + ["dkv-store-3.dkv-store-headless:50052"]
    after = [grown[owner(k, grown)] for k in KEYS]
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert all(b == grown[3] for _, b in moved)  # nothing moves between the old shards
    assert 600 <= len(moved) <= 900  # a quarter of the keys
    order_does_not_matter = list(reversed(grown))
    assert after == [order_does_not_matter[owner(k, order_does_not_matter)] for k in KEYS]


def test_shard_addresses():
    assert shard_addresses(" a:1, b:2 ,a:1,") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="names no host:port"):
        shard_addresses(" , ")


def test_the_second_ranked_shard_is_where_a_key_goes_when_its_owner_leaves():
    for k in KEYS[:200]:
        order = ranked(k, SHARDS)
        assert sorted(order) == [0, 1, 2] and order[0] == owner(k, SHARDS)
        rest = [s for i, s in enumerate(SHARDS) if i != order[0]]
        assert rest[owner(k, rest)] == SHARDS[order[1]]


def test_resolve_shards():
    assert resolve_shards("dns:///localhost:50052") == ["localhost:50052"]  # 127.0.0.1, by its own name
    assert resolve_shards("dns:///127.0.0.1:7") == ["localhost:7"]
    for bad in ("localhost:50052", "dns:///localhost", "dns:///:50052", "dns:///localhost:port"):
        with pytest.raises(ValueError, match="dns:///NAME:PORT"):
            resolve_shards(bad)
    with pytest.raises(OSError):
        resolve_shards("dns:///no-such-host.invalid:50052")
