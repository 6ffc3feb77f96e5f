"""The Redis tier against a real redis-server: value sizes, atomic publish, eviction, outages, OOM."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis
import torch

from dkv.kvstore import codec
from dkv.kvstore.codec import MAX_FRAME_BYTES
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import TierUnavailable
from dkv.kvstore.redis_tier import MAX_VALUE_BYTES, RedisTier
from dkv.services.redis_server import RedisServer
from dkv.testing import synthetic_entry

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

MiB = 1 << 20
CAP = 1 << 30


def key(i: int) -> EntryKey:
    return EntryKey("t", "model", "recipe", f"h{i}")


INDEX, VERSIONS, USED = "{dkv:}index", "{dkv:}versions", "{dkv:}used"  # the bookkeeping of prefix dkv:


def manifest(k: EntryKey) -> str:
    return f"dkv:m:{{{k}}}"


def data(k: EntryKey) -> str:
    """What the names of the data keys of entry ``k`` start with (then version:frame)."""
    return f"dkv:d:{{{k}}}:"


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def string_keys(client: redis.Redis, pattern: str = "*") -> list[bytes]:
    return [k for k in client.scan_iter(match=pattern, count=1000) if client.type(k) == b"string"]


@pytest.fixture
def tier(redis_url):
    t = RedisTier("redis", CAP, redis_url)
    yield t
    t.close()


def test_values_are_split_into_at_most_4_mib(tier, redis_url):
    entry = synthetic_entry(seq_len=2560, num_layers=2, num_kv_heads=4, head_dim=128, seed=3)
    frames = codec.encode(entry)
    total = sum(len(f) for f in frames)
    assert total >= 10 * 10**6, total
    tier.put(key(1), frames)
    assert [bytes(f) for f in tier.get(key(1))] == frames

    client = raw(redis_url)
    data_keys = string_keys(client, "dkv:d:*")
    assert len(data_keys) == len(frames) >= 4
    lengths = [client.strlen(k) for k in data_keys]
    assert max(lengths) <= MAX_VALUE_BYTES
    assert sum(lengths) == total
    for k in string_keys(client):  # manifest and counter too
        assert client.strlen(k) <= MAX_VALUE_BYTES
        # jemalloc rounds a full 4 MiB frame up to its 5 MiB size class (see the next test)
        assert client.memory_usage(k) <= 1.25 * MAX_VALUE_BYTES + 1024
        assert client.ttl(k) == -1  # published keys never expire
    assert client.hget(INDEX, str(key(1))) == str(total).encode()
    client.close()


def test_redis_efficient_frames_cost_no_allocator_overhead(tier, redis_url):
    """Full 4 MiB frames take 5 MiB in Redis; codec.MAX_FRAME_BYTES frames (the default) take their size."""
    client = raw(redis_url)
    for i, frame_bytes in enumerate((MAX_VALUE_BYTES, MAX_FRAME_BYTES)):
        tier.put(key(i), [os.urandom(frame_bytes) for _ in range(3)])
        full = string_keys(client, f"{data(key(i))}*")
        assert [client.strlen(k) for k in full] == [frame_bytes] * 3
        usage = [client.memory_usage(k) / frame_bytes for k in full]
        if frame_bytes == MAX_VALUE_BYTES:
            assert min(usage) > 1.2, usage  # the 5 MiB size class
        else:
            assert max(usage) < 1.001, usage
    client.close()


def test_frame_over_4_mib_is_refused_and_nothing_written(tier, redis_url):
    with pytest.raises(ValueError, match="at most"):
        tier.put(key(1), [b"h" * 100, os.urandom(MAX_VALUE_BYTES + 1)])
    client = raw(redis_url)
    assert client.dbsize() == 0
    assert tier.get(key(1)) is None and tier.used_bytes() == 0
    client.close()


def test_half_written_entry_is_never_readable_and_staging_expires(redis_url):
    tier = RedisTier("redis", CAP, redis_url, staging_ttl_s=0.3)
    client = raw(redis_url)
    frames = codec.encode(synthetic_entry(seed=1), max_frame_bytes=8192)
    data_keys = tier._data_keys(key(1), "deadbeef", len(frames))
    # A writer that staged every frame and died before publishing:
    tier._stage(data_keys, [memoryview(f) for f in frames])
    assert client.exists(*data_keys) == len(frames)
    assert 0 < client.pttl(data_keys[0]) <= 300
    assert tier.get(key(1)) is None
    assert tier.header_frame(key(1)) is None
    assert not tier.contains(key(1))
    assert tier.batch_contains([key(1)]) == 0
    assert tier.keys() == [] and tier.used_bytes() == 0
    deadline = time.monotonic() + 5
    while client.exists(*data_keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.exists(*data_keys) == 0, "abandoned staging keys must expire"
    assert client.dbsize() == 0
    tier.close()
    client.close()


def test_data_keys_without_manifest_are_not_an_entry(tier, redis_url):
    client = raw(redis_url)
    client.set(f"{data(key(2))}abcd:0", b"frame0")
    client.set(f"{data(key(2))}abcd:1", b"frame1")
    assert tier.get(key(2)) is None
    assert not tier.contains(key(2))
    assert tier.keys() == []
    client.close()


def test_staging_that_expires_before_publish_is_undone(redis_url):
    class SlowWriter(RedisTier):
        """Stages, then stalls past the staging TTL before publishing (a paused writer)."""

        def _stage(self, data_keys, views):
            super()._stage(data_keys, views)
            time.sleep(0.25)

    tier = RedisTier("redis", CAP, redis_url)
    tier.put(key(0), [b"kept"])
    slow = SlowWriter("redis", CAP, redis_url, staging_ttl_s=0.05)
    with pytest.raises(TierUnavailable, match="expired before publish"):
        slow.put(key(1), [os.urandom(1000), os.urandom(2000)])
    assert tier.get(key(1)) is None
    assert not tier.contains(key(1))
    assert tier.keys() == [key(0)]
    assert tier.used_bytes() == 4
    client = raw(redis_url)
    assert string_keys(client, f"dkv:*{key(1)}*") == []
    client.close()
    slow.close()
    tier.close()


def test_evicted_data_key_makes_a_clean_miss(tier, redis_url):
    frames = [os.urandom(100_000) for _ in range(5)]
    other = [os.urandom(10)]
    tier.put(key(1), frames)
    tier.put(key(2), other)
    client = raw(redis_url)
    victim = sorted(string_keys(client, f"{data(key(1))}*"))[2]
    client.delete(victim)  # as maxmemory eviction would
    assert tier.get(key(1)) is None  # not a partial list of frames
    assert not tier.contains(key(1))
    assert tier.keys() == [key(2)]
    assert tier.used_bytes() == len(other[0])
    assert string_keys(client, f"dkv:*{key(1)}*") == []  # the rest of the entry was cleaned up
    assert [bytes(f) for f in tier.get(key(2))] == other
    tier.put(key(1), frames)  # and the key can be written again
    assert [bytes(f) for f in tier.get(key(1))] == frames
    client.close()


def test_evicted_header_frame_is_a_miss(tier, redis_url):
    tier.put(key(1), [b"header", b"data"])
    client = raw(redis_url)
    client.delete(f"{data(key(1))}{_version(client, key(1))}:0")
    assert tier.header_frame(key(1)) is None
    assert not tier.contains(key(1)) and tier.used_bytes() == 0
    client.close()


def _version(client: redis.Redis, k: EntryKey) -> str:
    import json

    return json.loads(client.get(manifest(k)))["v"]


def _all_methods(tier: RedisTier):
    return {
        "put": lambda: tier.put(key(9), [b"x" * 100]),
        "get": lambda: tier.get(key(1)),
        "header_frame": lambda: tier.header_frame(key(1)),
        "contains": lambda: tier.contains(key(1)),
        "batch_contains": lambda: tier.batch_contains([key(1), key(2)]),
        "remove": lambda: tier.remove(key(1)),
        "keys": lambda: tier.keys(),
        "used_bytes": lambda: tier.used_bytes(),
    }


@pytest.mark.timeout(60)
def test_killed_redis_raises_tier_unavailable_fast_and_recovers(fresh_redis):
    tier = RedisTier("redis-k", CAP, fresh_redis.url, socket_timeout_s=1.0)
    tier.put(key(1), [b"hello", b"world"])
    assert tier.contains(key(1))
    fresh_redis.kill()
    for name, call in _all_methods(tier).items():
        start = time.monotonic()
        with pytest.raises(TierUnavailable) as info:
            call()
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"{name} took {elapsed:.1f} s with Redis down"
        msg = str(info.value)
        assert "redis-k" in msg and str(fresh_redis.port) in msg and name in msg, msg
    tier.close()  # closing with Redis gone does not raise

    fresh_redis.start()  # same port, empty (no persistence)
    assert tier.get(key(1)) is None
    tier.put(key(1), [b"back", b"again"])
    assert [bytes(f) for f in tier.get(key(1))] == [b"back", b"again"]
    assert tier.used_bytes() == 9
    assert tier.keys() == [key(1)]
    tier.close()


@pytest.mark.timeout(60)
def test_hung_redis_raises_within_socket_timeout(fresh_redis):
    """A stalled server (SIGSTOP: swapped out, stuck in a fork) must not hang callers."""
    tier = RedisTier("redis-h", CAP, fresh_redis.url, socket_timeout_s=0.5)
    tier.put(key(1), [b"a"])
    os.kill(fresh_redis.pid, signal.SIGSTOP)
    try:
        for name, call in _all_methods(tier).items():
            start = time.monotonic()
            with pytest.raises(TierUnavailable):
                call()
            assert time.monotonic() - start < 5, name
    finally:
        os.kill(fresh_redis.pid, signal.SIGCONT)
    assert [bytes(f) for f in tier.get(key(1))] == [b"a"]  # reconnects, data intact
    tier.close()


def test_redis_never_started_raises_tier_unavailable():
    from dkv.services.transport import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    tier = RedisTier("redis-none", CAP, url, socket_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TierUnavailable, match="redis-none"):
        tier.get(key(1))
    assert time.monotonic() - start < 5


@pytest.mark.timeout(60)
def test_put_failing_midway_on_oom_leaves_nothing(tmp_path):
    with RedisServer(maxmemory=3 * MiB, maxmemory_policy="noeviction") as server:
        tier = RedisTier("redis-oom", CAP, server.url)
        small = [os.urandom(1000)]
        tier.put(key(0), small)
        used_before = tier.used_bytes()
        assert used_before == 1000
        big = [os.urandom(MiB) for _ in range(8)]  # the first frames fit, then SET gets OOM
        with pytest.raises(TierUnavailable, match="redis-oom") as info:
            tier.put(key(1), big)
        assert "OOM" in str(info.value) or "maxmemory" in str(info.value)
        assert tier.get(key(1)) is None
        assert not tier.contains(key(1))
        assert tier.used_bytes() == used_before
        assert tier.keys() == [key(0)]
        client = raw(server.url)
        assert list(client.scan_iter(match=f"{data(key(1))}*")) == []  # staged frames deleted
        client.close()
        assert [bytes(f) for f in tier.get(key(0))] == small  # what was there still reads
        tier.put(key(2), [os.urandom(1000)])  # and memory was given back: small writes work
        assert tier.used_bytes() == 2000
        tier.close()


def test_concurrent_replace_of_one_key_counts_once(tier):
    import threading

    frames = {i: [os.urandom(1000 + i)] for i in range(8)}
    errors = []

    def writer(i):
        try:
            for _ in range(10):
                tier.put(key(1), frames[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    got = [bytes(f) for f in tier.get(key(1))]
    assert got in frames.values()
    assert tier.used_bytes() == len(got[0])
    assert tier.keys() == [key(1)]
    client = raw(tier.url)
    assert len(string_keys(client, "dkv:d:*")) == 1  # every replaced version was freed
    client.close()
    tier.remove(key(1))
    assert tier.used_bytes() == 0


def test_a_read_that_a_write_overtook_keeps_the_new_version_counted(tier):
    # The interleaving behind a rare failure of the concurrency test below: a Get reads version 1's
    # manifest, a Put replaces it with version 2 (freeing version 1's frames) before the Get fetches
    # them, and the Get, finding frames gone, cleaned up: it must not stop counting version 2.
    k = key(1)
    tier.put(k, [b"a" * 10])
    client = tier._client
    fetch = client.mget

    def fetch_after_a_replacing_write(names):
        del client.mget  # once: the Get's second look fetches normally
        tier.put(k, [b"b" * 20, b"c" * 5])
        return fetch(names)

    client.mget = fetch_after_a_replacing_write
    assert tier.get(k) == [b"b" * 20, b"c" * 5]
    assert tier.keys() == [k] and tier.used_bytes() == 25


def test_concurrent_mixed_ops_keep_index_counter_and_data_consistent(tier, redis_url):
    import json
    import random
    import threading

    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                k = key(rng.randrange(4))
                op = rng.random()
                if op < 0.5:
                    tier.put(k, [os.urandom(rng.randrange(1, 3000)) for _ in range(rng.randrange(1, 4))])
                elif op < 0.75:
                    tier.remove(k)
                else:
                    frames = tier.get(k)
                    assert frames is None or all(len(f) > 0 for f in frames)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    client = raw(redis_url)
    index = {EntryKey.parse(k.decode()): int(v) for k, v in client.hgetall(INDEX).items()}
    assert tier.used_bytes() == sum(index.values())
    assert sorted(tier.keys()) == sorted(index)
    expected_data_keys = set()
    for k, size in index.items():
        m = json.loads(client.get(manifest(k)))
        assert sum(m["sizes"]) == size
        assert sum(len(f) for f in tier.get(k)) == size
        expected_data_keys |= {f"{data(k)}{m['v']}:{i}".encode() for i in range(len(m["sizes"]))}
    assert set(string_keys(client, "dkv:d:*")) == expected_data_keys  # nothing leaked
    # one manifest per indexed entry (none when the last operations removed every key)
    assert len(string_keys(client, "dkv:m:*")) == len(index)
    client.close()


def test_stores_sharing_a_redis_count_their_own_entries_and_read_each_others(redis_url):
    """Store shards share one Redis: entries under the shared namespace, each shard's bookkeeping under
    its own prefix (the chart sets dkv:<pod name>:). A store counts, recovers after a restart and
    evicts only its own entries, and adopts another's when asked for it (a lost shard's entries)."""
    from dkv.kvstore.errors import EntryNotFound
    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import build_store

    def store(shard: str):
        return build_store(
            StoreSettings(cpu_bytes=0, redis_url=redis_url, redis_bytes=CAP, redis_prefix=f"dkv:{shard}:")
        )

    client = raw(redis_url)
    a = store("a")
    entries = [synthetic_entry(seq_len=32, num_layers=1, seed=i) for i in range(3)]
    for entry in entries:
        a.put(codec.encode(entry))
    assert a.stats().entries == 3
    b = store("b")
    assert b.stats().entries == 0 and b.stats().tiers[0].used_bytes == 0  # nothing of a's counted at start
    again = store("a")  # a restarted shard recovers its own entries
    assert again.stats().entries == 3 and all(again.probe([e.key for e in entries]))
    assert client.exists("{dkv:b:}index") == 0 and client.hlen("{dkv:a:}index") == 3

    got = codec.decode(b.get(entries[0].key).frames)  # b reads a's entry, and counts it from now on
    assert got.key == entries[0].key and torch.equal(got.layers[0].keys, entries[0].layers[0].keys)
    assert b.probe([entries[1].key, key(7)])[1] is None  # adopted by a lookup too; an unknown key is a miss
    assert b.stats().entries == 2 and sorted(client.hkeys("{dkv:b:}index")) == sorted(
        str(e.key).encode() for e in entries[:2]
    )
    assert client.hlen("{dkv:a:}index") == 3
    assert b.delete(entries[2].key)  # b never held it: deleted from the shared tier all the same
    with pytest.raises(EntryNotFound):
        again.get(entries[2].key)
    assert again.stats().lost == 1 and again.stats().entries == 2
    client.close()


# --- drift: what Redis loses behind the store's back, and what the audit repairs --------------------


def layout(client: redis.Redis) -> dict:
    """The tier's bookkeeping as Redis holds it."""
    return {
        "index": {k.decode(): int(v) for k, v in client.hgetall(INDEX).items()},
        "versions": {k.decode(): v.decode() for k, v in client.hgetall(VERSIONS).items()},
        "used": int(client.get(USED) or 0),
        "manifests": sorted(k.decode()[len("dkv:m:{") : -1] for k in client.scan_iter(match="dkv:m:*")),
        "data": len(string_keys(client, "dkv:d:*")),
    }


def test_a_missing_manifest_is_a_miss_that_frees_the_entry_s_accounting_and_data_keys(tier, redis_url):
    client = raw(redis_url)
    tier.put(key(1), [b"a" * 100, b"b" * 50])
    tier.put(key(2), [b"c" * 10])
    version, _ = layout(client)["versions"][str(key(1))].split(":")
    client.delete(manifest(key(1)))  # what maxmemory eviction does to a manifest
    assert tier.get(key(1)) is None
    state = layout(client)
    assert state["index"] == {str(key(2)): 10} and state["used"] == 10 and list(state["versions"]) == [str(key(2))]
    assert state["data"] == 1 and not string_keys(client, f"{data(key(1))}{version}:*")
    assert tier.audit() == {key(2): 10}  # nothing left to repair
    client.close()


def test_a_malformed_manifest_is_a_miss_and_is_removed_with_what_the_store_counted(tier, redis_url):
    client = raw(redis_url)
    tier.put(key(1), [b"a" * 10, b"b" * 20])
    version = layout(client)["versions"][str(key(1))].split(":")[0]
    client.set(manifest(key(1)), b'{"v": "x", "sizes": {"0": 1}}')  # not a manifest dkv wrote
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert layout(client) == {"index": {}, "versions": {}, "used": 0, "manifests": [], "data": 0}
    assert not string_keys(client, f"{data(key(1))}{version}:*")
    tier.put(key(1), [b"again"])
    assert [bytes(f) for f in tier.get(key(1))] == [b"again"]
    client.close()


def test_the_audit_repairs_the_bookkeeping_from_the_manifests_of_the_entries_it_counts(tier, redis_url):
    client = raw(redis_url)
    for i in range(6):
        tier.put(key(i), [bytes([i]) * (100 + i), b"x" * 7])
    lost_versions = [layout(client)["versions"][str(key(i))].split(":")[0] for i in (0, 1)]
    client.delete(manifest(key(0)), manifest(key(1)))  # manifests evicted
    client.hdel(INDEX, str(key(2)), str(key(3)))  # fields of the index lost (as when Redis evicted the hash) ...
    client.hdel(VERSIONS, str(key(4)))  # ... and of the versions hash
    client.hset(INDEX, str(key(5)), 1)  # a size that another write of the key made stale
    client.delete(USED)
    held = tier.audit()
    expected = {key(i): 100 + i + 7 for i in range(2, 6)}
    assert held == expected
    state = layout(client)
    assert state["index"] == {str(k): n for k, n in expected.items()} and state["used"] == sum(expected.values())
    assert sorted(state["versions"]) == sorted(map(str, expected)) and state["manifests"] == sorted(map(str, expected))
    # the data keys of the two lost entries are gone (found through the versions hash), the others kept
    assert state["data"] == 4 * 2 and not any(
        string_keys(client, f"{data(key(i))}{v}:*") for i, v in zip((0, 1), lost_versions)
    )
    assert tier.used_bytes() == sum(expected.values()) and sorted(tier.keys()) == sorted(expected)
    assert tier.audit() == expected and layout(client) == state  # nothing left to repair
    client.close()


def test_entries_whose_bookkeeping_redis_lost_are_counted_again(redis_url):
    """Redis evicted a store's index, versions and counter: the store's audit counts its entries that
    are still there again (it knows them: no scan), the others are lost; an entry no store indexes
    any more is counted again by the first store that reads it."""
    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import build_store

    def store():
        return build_store(StoreSettings(cpu_bytes=0, redis_url=redis_url, redis_bytes=CAP))

    entries = [synthetic_entry(seq_len=32, num_layers=1, seed=i) for i in range(4)]
    first = store()
    for entry in entries:
        first.put(codec.encode(entry))
    client = raw(redis_url)
    client.delete(manifest(entries[0].key))  # evicted ...
    client.delete(INDEX, VERSIONS, USED)  # ... and then the bookkeeping
    assert first.audit()["lost"] == 1 and first.stats().entries == 3
    state = layout(client)
    assert sorted(state["index"]) == sorted(str(e.key) for e in entries[1:]) == state["manifests"]
    assert state["used"] == sum(state["index"].values()) == first.stats().tiers[0].used_bytes

    client.delete(INDEX, VERSIONS, USED)
    second = store()  # a restart: nothing counted, nothing known
    assert second.stats().entries == 0
    assert codec.decode(second.get(entries[1].key).frames).key == entries[1].key
    assert second.stats().entries == 1 and list(layout(client)["index"]) == [str(entries[1].key)]
    client.close()


def test_with_a_cluster_secret_an_entry_written_without_it_is_corrupt_never_served(redis_url):
    from dkv.kvstore.errors import CorruptEntry
    from dkv.kvstore.mac import EntryMac

    signed = RedisTier("redis", CAP, redis_url, mac=EntryMac("cluster secret"))
    frames = [b"header", b"data" * 100]
    signed.put(key(1), frames)
    assert [bytes(f) for f in signed.get(key(1))] == frames
    assert len(json.loads(raw(redis_url).get(manifest(key(1))))["mac"]) == 64
    # whoever can write to Redis but lacks the secret: no MAC, or another secret's
    for forger in (RedisTier("redis", CAP, redis_url), RedisTier("redis", CAP, redis_url, mac=EntryMac("guess"))):
        forger.put(key(1), [b"header", b"forged" * 100])
        assert [bytes(f) for f in forger.get(key(1))] == [b"header", b"forged" * 100]  # its own checks pass
        with pytest.raises(CorruptEntry, match="MAC"):
            signed.get(key(1))
        forger.close()
    signed.close()
