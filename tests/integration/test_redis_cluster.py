"""The Redis tier on a real Redis Cluster (3 masters, 3 replicas on loopback): where an entry's keys
live, and redirections while a slot moves from one master to another. (The tier contract suite runs
on the cluster too: tests/unit/test_tier_contract.py; a master killed under load:
tests/reliability/test_cluster_failover.py.)"""

from __future__ import annotations

import os

import pytest
import redis
from redis.crc import key_slot

from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import TierUnavailable
from dkv.kvstore.redis_tier import RedisTier

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

CAP = 1 << 30


def key(i: int) -> EntryKey:
    return EntryKey("t", "model", "recipe", f"h{i}")


@pytest.fixture
def tier(redis_cluster_url):
    t = RedisTier("redis", CAP, redis_cluster_url, cluster=True)
    yield t
    t.close()


def cluster_keys(url: str, pattern: str) -> list[bytes]:
    client = redis.RedisCluster.from_url(url, socket_timeout=5)
    try:
        return list(client.scan_iter(match=pattern, count=1000, target_nodes=redis.RedisCluster.PRIMARIES))
    finally:
        client.close()


def test_an_entry_s_keys_share_one_slot_and_entries_spread_over_the_masters(tier, redis_cluster, redis_cluster_url):
    frames = {key(i): [os.urandom(1000 + i), os.urandom(20), b"x" * i] for i in range(24)}
    for k, f in frames.items():
        tier.put(k, f)
    masters = set()
    for k, f in frames.items():
        names = cluster_keys(redis_cluster_url, f"dkv:*{{{k}}}*")
        assert len(names) == 1 + len(f)  # the manifest and a data key per frame
        slots = {key_slot(name) for name in names}
        assert len(slots) == 1, (k, names)  # one slot: the publish script runs on one master
        masters.add(redis_cluster.master_of_slot(slots.pop()).port)
        assert [bytes(x) for x in tier.get(k)] == f
    assert len(masters) >= 2  # 24 entries on one master of three: p < 1e-10
    book = cluster_keys(redis_cluster_url, "{dkv:}*")
    assert sorted(book) == [b"{dkv:}index", b"{dkv:}used", b"{dkv:}versions"] and len(set(map(key_slot, book))) == 1
    assert tier.used_bytes() == sum(len(x) for f in frames.values() for x in f)
    assert sorted(tier.keys()) == sorted(frames) and tier.audit() == {k: sum(map(len, f)) for k, f in frames.items()}


def test_reads_and_writes_follow_a_slot_that_moves_to_another_master(tier, redis_cluster, redis_cluster_url):
    """While a slot migrates, a call returns the entry's exact bytes or fails (a miss for the store):
    with the entry's keys split over two masters (TRYAGAIN) it fails, once they all moved it follows
    ASK redirections. Afterwards a client with the old slot map follows MOVED to the new master."""
    first = [os.urandom(3000) for _ in range(4)]
    tier.put(key(1), first)
    tier.put(key(2), [b"elsewhere"])
    slot = key_slot(tier._manifest_key(key(1)).encode())
    source = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.master_nodes() if m is not source)
    fresh = RedisTier("redis", CAP, redis_cluster_url, cluster=True)
    expected = first
    seen = {}

    def midway(moved: float):
        nonlocal expected
        for name, client in (("old map", tier), ("new client", fresh)):
            try:
                got = [bytes(f) for f in client.get(key(1))]
                seen[moved, name] = "hit" if got == expected else "wrong"
            except TierUnavailable:
                seen[moved, name] = "unavailable"
        try:
            written = [f"written at {moved}".encode()]
            tier.put(key(1), written)
            expected, seen[moved, "put"] = written, "put"
        except TierUnavailable:
            seen[moved, "put"] = "refused"

    redis_cluster.move_slot(slot, target, midway)
    assert redis_cluster.master_of_slot(slot) is target
    assert "wrong" not in seen.values() and len(seen) == 6, seen
    # every key of the entry on the target, the slot still migrating: ASK, followed
    assert seen[1.0, "old map"] == seen[1.0, "new client"] == "hit" and seen[1.0, "put"] == "put", seen
    for client in (tier, RedisTier("redis", CAP, redis_cluster_url, cluster=True)):
        assert [bytes(f) for f in client.get(key(1))] == expected
        assert client._client.get_node_from_key(client._manifest_key(key(1))).port == target.port  # MOVED learnt
    tier.put(key(1), [b"third", b"frames"])  # written on the new master
    assert [bytes(f) for f in fresh.get(key(1))] == [b"third", b"frames"]
    assert tier.used_bytes() == 11 + len(b"elsewhere") and sorted(tier.keys()) == [key(1), key(2)]
    assert len(cluster_keys(redis_cluster_url, f"dkv:d:{{{key(1)}}}:*")) == 2  # every older version freed
    fresh.close()
