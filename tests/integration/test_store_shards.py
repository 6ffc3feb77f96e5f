"""Store shards behind one client (services.shards) with real store servers on loopback and the
real SmolLM2 prefill worker: entries spread over the shards, a chunked prompt's entries found
across them, and a lost shard that costs misses, never errors or wrong bytes."""

from __future__ import annotations

import grpc
import pytest

from dkv.kvstore import codec
from dkv.kvstore.entry import Recipe
from dkv.services.shards import ShardedStoreClient, open_store, owner
from dkv.services.store_client import StoreClient
from dkv.testing import synthetic_entry
from dkv.workers.prefill import PrefillWorker

pytestmark = pytest.mark.timeout(300)

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. Members discussed the cost of "
    "shelving, the hours of the reading room and a plan to lend laptops to students. "
) * 8
MORE = " In the end they agreed to open on Sundays and to buy more chairs for the reading room."
RECIPE = Recipe(method="snapkv", ratio=0.5, chunk_size=32, chunked=True)


@pytest.fixture
def shards(store_service):
    return [store_service() for _ in range(3)]


def entries_per_shard(servers) -> list[int]:
    counts = []
    for server in servers:
        with StoreClient(server.address) as client:
            counts.append(client.stats().entries)
    return counts


def test_entries_live_on_the_shard_their_key_picks(shards):
    addresses = ",".join(s.address for s in shards)
    entries = [synthetic_entry(seq_len=32, num_layers=1, seed=i) for i in range(48)]
    with open_store(addresses) as client:
        assert isinstance(client, ShardedStoreClient)
        for i, entry in enumerate(entries):
            # both ways in: a decoded entry, and frames (the key read from the header frame)
            reply = client.put(entry) if i % 2 else client.put_frames(codec.encode(entry))
            assert reply.key == entry.key
        counts = entries_per_shard(shards)
        assert sum(counts) == 48 and min(counts) >= 3, counts  # ~16 each; fewer than 3: p < 1e-5
        for entry in entries:
            home = shards[owner(entry.key, client.addresses)]
            with StoreClient(home.address) as direct:
                assert direct.get_frames(entry.key) is not None  # on its owner, and only there
            got = client.get(entry.key)
            assert got is not None and got.key == entry.key
            assert all((a.keys == b.keys).all() for a, b in zip(got.layers, entry.layers))
        assert client.delete(entries[0].key) and client.get(entries[0].key) is None
    with open_store(shards[0].address) as single:  # one address: one shard, the same lookup path
        assert isinstance(single, ShardedStoreClient) and single.addresses == [shards[0].address]


def test_a_chunked_prompt_is_found_across_shards_and_a_lost_shard_costs_only_misses(smollm2, shards):
    model, tokenizer = smollm2
    ids = tokenizer(TEXT).input_ids
    longer = ids + tokenizer(MORE, add_special_tokens=False).input_ids
    client = ShardedStoreClient([s.address for s in shards], timeout_s=120)
    worker = PrefillWorker(model, tokenizer, client, max_tokens=2048)
    try:
        first = worker.prefill(ids, RECIPE)
        chunks = len(first.keys)
        assert chunks == -(-len(ids) // 32) >= 8
        homes = [owner(k, client.addresses) for k in first.keys]
        assert len(set(homes)) >= 2, homes  # the prompt's chunks are spread over shards
        assert sum(entries_per_shard(shards)) == chunks

        again = worker.prefill(ids, RECIPE)  # every chunk found on its shard: nothing recomputed
        assert (again.cached_tokens, again.prefilled_tokens, list(again.keys)) == (len(ids), 0, list(first.keys))
        grown = worker.prefill(longer, RECIPE)  # the whole chunks of the shorter prompt are reused
        assert grown.cached_tokens == len(ids) // 32 * 32
        assert list(grown.keys[: len(ids) // 32]) == list(first.keys[: len(ids) // 32])

        found = client.lookup(model.dkv_fingerprint, RECIPE, longer)
        assert found.cached_tokens == len(longer) and [str(k) for k in found.keys] == list(grown.keys)
        assert len(found.kept_tokens_per_layer) == model.config.num_hidden_layers

        lost = next(h for h in homes if h != homes[0])  # a shard without the first chunk: stopped
        shards[lost].stop()
        first_lost = next(i for i, k in enumerate(found.keys) if owner(k, client.addresses) == lost)
        partial = client.lookup(model.dkv_fingerprint, RECIPE, longer)
        assert first_lost >= 1 and partial.keys == found.keys[:first_lost] and partial.cached_tokens == first_lost * 32
        orphan = next(
            e
            for e in (synthetic_entry(seq_len=32, num_layers=1, seed=s) for s in range(1000))
            if owner(e.key, client.addresses) == lost
        )
        with pytest.raises(grpc.RpcError) as e:  # what the lost shard owns cannot be stored: a loud error
            client.put(orphan)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.get(found.keys[0]) is not None  # the other shards still serve
    finally:
        client.close()


@pytest.mark.redis
def test_a_lost_shard_s_entries_in_redis_cluster_are_served_by_the_shards_its_keys_move_to(
    smollm2, store_service, redis_cluster_url
):
    """Three shards share a Redis Cluster as their last tier (each its own bookkeeping prefix). One is
    stopped: reads of its keys go to the shards that rank second for them (first while it is still
    listed, then after the membership drops it), which find its entries in the cluster: the prompt is
    not recomputed."""
    from dkv.services.settings import StoreSettings

    model, tokenizer = smollm2
    shards = [
        store_service(
            StoreSettings(
                port=0, cpu_bytes=0, redis_url=redis_cluster_url, redis_cluster=True, redis_prefix=f"dkv:shard-{i}:"
            )
        )
        for i in range(3)
    ]
    members = [s.address for s in shards]
    client = ShardedStoreClient(lambda: list(members), timeout_s=120, refresh_s=3600)
    worker = PrefillWorker(model, tokenizer, client, max_tokens=2048)
    ids = tokenizer(TEXT).input_ids
    try:
        first = worker.prefill(ids, RECIPE)
        homes = [owner(k, members) for k in first.keys]
        lost = max(set(homes), key=homes.count)  # the shard with the most of the prompt's chunks
        lost_keys = [k for k, h in zip(first.keys, homes) if h == lost]
        with StoreClient(shards[lost].address) as direct:
            assert {p.tier for p in direct.probe(lost_keys)} == {"redis"}
        shards[lost].stop()

        # still listed: the owner is UNAVAILABLE, the second-ranked shard answers from the cluster
        found = client.lookup(model.dkv_fingerprint, RECIPE, ids)
        assert found.cached_tokens == len(ids) and [str(k) for k in found.keys] == list(first.keys)
        entry = client.get(lost_keys[0])
        assert entry is not None and str(entry.key) == lost_keys[0]

        members.remove(shards[lost].address)  # the membership (a headless Service) drops it
        client.refresh()
        assert client.addresses == members
        again = worker.prefill(ids, RECIPE)  # nothing recomputed
        assert (again.cached_tokens, again.prefilled_tokens, list(again.keys)) == (len(ids), 0, list(first.keys))
        # the lost shard's entries are counted by the shards they moved to
        assert sum(entries_per_shard([s for i, s in enumerate(shards) if i != lost])) == len(first.keys)
    finally:
        client.close()


def test_shards_named_by_dns_are_every_address_the_name_resolves_to(store_service):
    server = store_service()
    with open_store(f"dns:///localhost:{server.port}") as client:
        assert isinstance(client, ShardedStoreClient)
        assert client.addresses == [f"localhost:{server.port}"]  # 127.0.0.1, by its own name
        entry = synthetic_entry(seq_len=32, num_layers=1, seed=5)
        client.put(entry)
        assert client.get(entry.key).key == entry.key
        client.refresh()  # looked up again: the same shard, the same connection
        assert client.addresses == [f"localhost:{server.port}"] and client.get(entry.key) is not None


def test_calls_fail_unavailable_until_the_membership_names_a_shard(store_service):
    server = store_service()
    members = []
    entry = synthetic_entry(seq_len=32, num_layers=1, seed=6)
    with ShardedStoreClient(lambda: list(members), refresh_s=3600) as client:  # the store's pods not ready yet
        for call in (
            lambda: client.get(entry.key),
            lambda: client.put(entry),
            lambda: client.lookup("synthetic-model", entry.identity.recipe, [1, 2, 3]),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no store shard" in e.value.details()
        members.append(server.address)
        client.refresh()
        client.put(entry)
        assert client.get(entry.key).key == entry.key
