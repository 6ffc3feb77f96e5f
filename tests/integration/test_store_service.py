"""The KV store over real gRPC on loopback: round trips, status codes, faults, health."""

from __future__ import annotations

import ctypes
import time

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dkv.kvstore import codec
from dkv.kvstore.entry import Recipe
from dkv.services.pb import store_pb2
from dkv.services.settings import StoreSettings
from dkv.services.store_client import StoreClient
from dkv.services.wire import _address
from dkv.testing import synthetic_entry

pytestmark = pytest.mark.timeout(120)


def assert_same_entry(a, b) -> None:
    assert a.key == b.key and a.seq_len == b.seq_len and a.importance == b.importance
    for la, lb in zip(a.layers, b.layers):
        for name, t in la.tensors().items():
            assert torch.equal(t, lb.tensors()[name]), name


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def test_put_get_lookup_delete_stats(store_service):
    server = store_service()
    prompt = list(range(5000, 5000 + 600))
    entry = synthetic_entry(token_ids=prompt[:512], num_layers=4, keep_fraction=0.3, quant_scheme="int4")
    with StoreClient(server.address) as client:
        reply = client.put(entry)
        assert reply.key == entry.key and reply.tier == "cpu" and not reply.replaced
        assert_same_entry(client.get(reply.key), entry)
        found = client.lookup("synthetic-model", entry.identity.recipe, prompt)
        assert (found.keys, found.cached_tokens, found.tiers) == ([entry.key], 512, ["cpu"])
        assert client.lookup("synthetic-model", Recipe(method="snapkv", ratio=0.5), prompt) is None
        stats = client.stats()
        assert (stats.entries, stats.puts, stats.hits) == (1, 1, 1)
        assert stats.tiers[0].used_bytes == reply.stored_bytes
        assert client.delete(reply.key) and not client.delete(reply.key)
        assert client.get(reply.key) is None
        assert client.stats().misses == 1


def test_bad_input_gets_a_status_code_and_a_message_and_nothing_is_stored(store_service):
    server = store_service(StoreSettings(port=0, cpu_bytes=4 << 20, max_entry_bytes=2 << 20))
    good = codec.encode(synthetic_entry(seq_len=64, seed=1), max_frame_bytes=8192)
    assert len(good) >= 4
    nan_entry = synthetic_entry(seq_len=64, seed=2)
    nan_entry.layers[0].values[0, 0] = float("inf")
    big = codec.encode(synthetic_entry(seq_len=4096, num_layers=2))
    cases = [
        (codec.encode(nan_entry), grpc.StatusCode.INVALID_ARGUMENT, "layer 0: values contain NaN or Inf"),
        (good[:-1], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ([good[0], good[2], good[1]] + good[3:], grpc.StatusCode.INVALID_ARGUMENT, "reordered"),
        ([good[0]] + [good[1]] * 2 + good[2:], grpc.StatusCode.INVALID_ARGUMENT, "reordered, duplicated or lost"),
        ([b"not a frame at all, and long enough to have a head"], grpc.StatusCode.INVALID_ARGUMENT, "not a dkv frame"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "no frames received"),
        (big, grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit"),
    ]
    with StoreClient(server.address) as client:
        corrupted = [bytearray(f) for f in good]
        corrupted[1][200] ^= 1
        cases.append(([bytes(f) for f in corrupted], grpc.StatusCode.INVALID_ARGUMENT, "checksum"))
        for frames, code, message in cases:
            err = rpc_error(client.put_frames, frames)
            assert err.code() == code, (message, err.details())
            assert message in err.details()
        for key, code in (
            ("", grpc.StatusCode.INVALID_ARGUMENT),
            ("a/b", grpc.StatusCode.INVALID_ARGUMENT),
            ("t/m/r/../x", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            assert rpc_error(client.get_frames, key).code() == code
        err = rpc_error(client.lookup, "m", Recipe(), [])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids is empty" in err.details()
        bad_recipe = store_pb2.LookupRequest(
            model_fingerprint="m", recipe={"method": "snapkv", "ratio": 1.5}, token_ids=[1, 2]
        )
        err = rpc_error(client._lookup, bad_recipe)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ratio 1.5" in err.details()
        stats = client.stats()
        assert stats.entries == 0 and stats.rejected_puts == len(cases)
        assert client.put_frames(good).tier == "cpu"  # the server kept running


def test_entry_larger_than_every_tier_is_resource_exhausted(store_service):
    server = store_service(StoreSettings(port=0, cpu_bytes=1 << 20))
    with StoreClient(server.address) as client:
        err = rpc_error(client.put, synthetic_entry(seq_len=4096, num_layers=2))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than every tier" in err.details()


def test_a_flipped_byte_in_host_memory_is_data_loss_then_a_miss(store_service):
    server = store_service()
    entry = synthetic_entry(seq_len=300, num_layers=3)
    with StoreClient(server.address) as client:
        key = client.put(entry).key
        held = server.server.store.tiers[0].tier._entries[key][1]  # a data frame as the host tier keeps it
        ctypes.memset(_address(held) + 500, 0x5A, 1)  # flip it in place, as a memory fault would
        err = rpc_error(lambda: list(client._get(store_pb2.GetRequest(key=str(key)), timeout=10)))
        assert err.code() == grpc.StatusCode.DATA_LOSS and "deleted" in err.details()
        assert client.get(key) is None
        stats = client.stats()
        assert stats.checksum_failures == 1 and stats.entries == 0 and stats.tiers[0].used_bytes == 0


@pytest.mark.redis
def test_a_flipped_byte_in_redis_is_a_miss_never_wrong_bytes(store_service, redis_url):
    server = store_service(StoreSettings(port=0, cpu_bytes=0, redis_url=redis_url))
    entry = synthetic_entry(seq_len=300, num_layers=3)
    with StoreClient(server.address) as client:
        key = client.put(entry).key
        r = redis.Redis.from_url(redis_url)
        data_key = sorted(r.scan_iter(match=f"dkv:d:{{{key}}}:*"))[1]
        value = bytearray(r.get(data_key))
        value[1234] ^= 0xFF
        r.set(data_key, bytes(value))
        assert client.get(key) is None
        assert client.stats().checksum_failures == 1
        assert not list(r.scan_iter(match=f"dkv:*{key}*"))  # the entry was deleted from Redis
        assert_same_entry(client.get(client.put(entry).key), entry)  # and can be written again


@pytest.mark.redis
def test_the_store_keeps_serving_when_redis_dies_and_resumes_when_it_returns(store_service, fresh_redis):
    entry_bytes = sum(map(len, codec.encode(synthetic_entry(seq_len=512, num_layers=4))))
    settings = StoreSettings(port=0, cpu_bytes=int(2.5 * entry_bytes), redis_url=fresh_redis.url)
    server = store_service(settings)
    server.server.store.retry_after_s = 0.2
    entries = [synthetic_entry(seq_len=512, num_layers=4, seed=i) for i in range(5)]
    with StoreClient(server.address, timeout_s=10) as client:
        keys = [client.put(e).key for e in entries]
        tiers = [server.server.store.tier_of(k) for k in keys]
        assert tiers.count("redis") == 3 and tiers.count("cpu") == 2
        fresh_redis.kill()
        started = time.monotonic()
        for key, entry, tier in zip(keys, entries, tiers):
            got = client.get(key)
            if tier == "cpu":
                assert_same_entry(got, entry)
            else:
                assert got is None  # a miss: the caller recomputes
        assert time.monotonic() - started < 10
        extra = synthetic_entry(seq_len=512, num_layers=4, seed=99)
        assert client.put(extra).tier == "cpu"  # still taking writes in the tiers that work
        health = [t.healthy for t in client.stats().tiers]
        assert health == [True, False]
        fresh_redis.start()  # back on the same port, empty
        time.sleep(0.3)
        later = synthetic_entry(seq_len=512, num_layers=4, seed=100)
        for e in (later, *entries[:2]):
            client.put(e)
        assert [t.healthy for t in client.stats().tiers] == [True, True]
        assert any(server.server.store.tier_of(e.key) == "redis" for e in (later, *entries[:2]))
        assert_same_entry(client.get(later.key), later)


def test_health_and_reflection(store_service):
    server = store_service()
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dkv.v1.KVStore"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"dkv.v1.KVStore", "grpc.health.v1.Health"} <= names
    channel.close()


def test_concurrent_clients_never_see_torn_entries(store_service):
    """Writers replace and delete the same keys while readers read: every read is whole or a miss."""
    import threading

    server = store_service(StoreSettings(port=0, cpu_bytes=8 << 20))
    versions = [synthetic_entry(token_ids=list(range(200)), num_layers=2, seed=s) for s in range(3)]
    key = versions[0].key
    assert all(v.key == key for v in versions)
    errors = []

    def writer(seed: int) -> None:
        with StoreClient(server.address) as client:
            for i in range(15):
                client.put(versions[(seed + i) % 3])
                if i % 5 == 4:
                    client.delete(key)

    def reader() -> None:
        with StoreClient(server.address) as client:
            for _ in range(30):
                got = client.get(key)
                if got is not None and not any(
                    all(torch.equal(a.keys, b.keys) for a, b in zip(got.layers, v.layers)) for v in versions
                ):
                    errors.append("a read matched no written version")

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_keepalive_and_connection_age_reach_the_grpc_server():
    from dkv.services.store_server import StoreServer

    options = dict(
        StoreServer(
            StoreSettings(
                port=0, cpu_bytes=1 << 20, keepalive_s=20, keepalive_timeout_s=5, max_connection_age_s=600, grace_s=7
            )
        ).grpc_options()
    )
    assert options == {
        "grpc.keepalive_time_ms": 20_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 7_000,
    }
    assert StoreServer(StoreSettings(port=0, cpu_bytes=1 << 20, keepalive_s=0)).grpc_options() == []


def test_a_store_with_redis_says_at_start_whether_its_entries_are_signed(redis_url, caplog):
    from dkv.services.store_server import StoreServer

    caplog.set_level("INFO", logger="dkv.store.server")
    StoreServer(StoreSettings(port=0, cpu_bytes=1 << 20, redis_url=redis_url)).close()
    assert any(r.levelname == "WARNING" and "no cluster_secret" in r.getMessage() for r in caplog.records)
    caplog.clear()
    StoreServer(StoreSettings(port=0, cpu_bytes=1 << 20, redis_url=redis_url, cluster_secret="s")).close()
    assert [r.getMessage() for r in caplog.records] == [
        "entries in Redis carry a keyed MAC (cluster_secret); reads check it"
    ]
