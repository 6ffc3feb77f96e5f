"""Store shards behind one client (services.shards) with real store servers on loopback and the
real SmolLM2 prefill worker: entries spread over the shards, a chunked prompt's entries found
across them, and a lost shard that costs misses, never errors or wrong bytes."""

from __future__ import annotations

import grpc
import pytest

from dkv.kvstore import codec, prefix
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


def probed_keys(server, tier: str) -> float:
    return server.server.metrics.registry.get_sample_value("dkv_store_probed_keys_total", {"tier": tier}) or 0.0


def lookups(server) -> float:
    samples = server.server.metrics.registry.collect()
    return sum(
        s.value for m in samples if m.name == "dkv_store_lookups" for s in m.samples if s.name.endswith("_total")
    )


def test_one_address_is_one_shard_that_finds_what_the_store_s_lookup_finds_hashing_each_prompt_once(
    smollm2, store_service, monkeypatch
):
    """The workers' one lookup path (the plan's keys, Probe, ``longest_chain`` on the client) against
    the store's Lookup RPC (the tokens hashed on the server), for a chunked and a whole-context recipe,
    on prompts the store holds all of, part of and none of."""
    model, tokenizer = smollm2
    server = store_service()
    fingerprint = model.dkv_fingerprint
    ids = tokenizer(TEXT).input_ids
    longer = ids + tokenizer(MORE, add_special_tokens=False).input_ids
    other = tokenizer("A different prompt about the weather in the mountains, " * 6).input_ids
    whole = Recipe(method="snapkv", ratio=0.5, chunk_size=32)
    hashed, chain_hashes = [], prefix.chain_hashes

    def counted(*args, **kwargs):
        hashed.append(len(args[0]))
        return chain_hashes(*args, **kwargs)

    monkeypatch.setattr(prefix, "chain_hashes", counted)  # the in-process store hashes through it too
    store, thin = open_store(server.address, timeout_s=120), StoreClient(server.address, timeout_s=120)
    try:
        assert isinstance(store, ShardedStoreClient) and store.address == server.address
        worker = PrefillWorker(model, tokenizer, store, max_tokens=2048)
        before = (probed_keys(server, "cpu"), probed_keys(server, "miss"), lookups(server))
        for recipe, prompt in ((RECIPE, ids), (RECIPE, ids), (RECIPE, longer), (whole, ids[:64]), (whole, ids)):
            hashed.clear()
            worker.prefill(prompt, recipe)
            assert hashed == [len(prompt)], f"the prompt's chunk keys were made {len(hashed)} times, not once"
        # the first prefill probed every chunk key, all absent; the second found them all
        chunks = -(-len(ids) // 32)
        assert probed_keys(server, "miss") - before[1] >= chunks and probed_keys(server, "cpu") - before[0] >= chunks
        assert lookups(server) == before[2]  # no Lookup RPC on the workers' path

        expected = {
            (RECIPE, "ids"): len(ids),
            (RECIPE, "longer"): len(longer),
            (RECIPE, "half"): len(ids) // 64 * 32,
            (whole, "ids"): len(ids),
            (whole, "longer"): 64,  # the whole-context entry of ids[:64]; ids' own ends off a boundary
            (whole, "half"): 64,
        }
        prompts = {"ids": ids, "longer": longer, "half": ids[: len(ids) // 2], "other": other}
        for recipe in (RECIPE, whole):
            for name, prompt in prompts.items():
                keys = prefix.chunk_keys(prompt, recipe, fingerprint, "default")
                mine = store.lookup_keys(keys, recipe.chunk_size, len(prompt))
                theirs = thin.lookup(fingerprint, recipe, prompt)
                assert (
                    (mine and mine.cached_tokens) == (theirs and theirs.cached_tokens) == expected.get((recipe, name))
                ), (recipe.chunked, name)
                if theirs is None:
                    continue
                assert (mine.keys, mine.tiers, mine.stored_bytes, mine.kept_tokens_per_layer) == (
                    theirs.keys,
                    theirs.tiers,
                    theirs.stored_bytes,
                    theirs.kept_tokens_per_layer,
                )
                assert mine.importance == pytest.approx(theirs.importance)
                assert store.lookup(fingerprint, recipe, prompt) == mine
        assert lookups(server) == before[2] + 2 * len(prompts)  # the thin client's Lookups, counted as such
    finally:
        store.close()
        thin.close()


def test_stats_of_one_shard_are_its_own_and_of_several_the_sums(store_service):
    shards = [store_service() for _ in range(2)]
    entries = [synthetic_entry(seq_len=32, num_layers=1, seed=i, tenant="acme" if i % 3 else "beta") for i in range(12)]
    with open_store(",".join(s.address for s in shards)) as both, open_store(shards[0].address) as one:
        for entry in entries:
            both.put(entry)
        for entry in entries[:5]:
            assert both.get(entry.key) is not None
        assert both.get(synthetic_entry(seq_len=32, num_layers=1, seed=98).key) is None
        direct = []
        for server in shards:
            with StoreClient(server.address) as client:
                direct.append(client.stats())
        assert all(d.entries for d in direct), "both shards hold entries"
        assert one.stats() == direct[0]

        merged = both.stats()
        for field in ("entries", "hits", "misses", "puts", "evictions", "rejected_puts"):
            assert getattr(merged, field) == sum(getattr(d, field) for d in direct), field
        assert (merged.entries, merged.puts, merged.hits, merged.misses) == (12, 12, 5, 1)
        assert [t.name for t in merged.tiers] == [t.name for t in direct[0].tiers]
        for i, tier in enumerate(merged.tiers):
            assert tier.used_bytes == sum(d.tiers[i].used_bytes for d in direct)
            assert tier.capacity_bytes == sum(d.tiers[i].capacity_bytes for d in direct)
            assert tier.entries == sum(d.tiers[i].entries for d in direct) and tier.healthy
        tenants = {t.tenant: t for t in merged.tenants}
        assert sorted(tenants) == ["acme", "beta", "default"]  # default: the miss's
        assert (tenants["acme"].entries, tenants["beta"].entries, tenants["default"].misses) == (8, 4, 1)
        assert sum(t.used_bytes for t in tenants["acme"].tiers) + sum(
            t.used_bytes for t in tenants["beta"].tiers
        ) == sum(t.used_bytes for t in merged.tiers)
        absent = synthetic_entry(seq_len=32, num_layers=1, seed=99).key
        assert [p.present for p in both.probe([entries[0].key, absent, entries[1].key])] == [True, False, True]
        assert both.address == ",".join(s.address for s in shards)


def test_a_store_whose_shards_all_fail_to_answer_a_probe_is_down_not_a_miss(store_service):
    """One shard unreachable among several costs its keys (misses); no shard answering is the store
    being down, an UNAVAILABLE the caller counts as such (the workers mark themselves degraded)."""
    servers = [store_service() for _ in range(3)]
    entries = [synthetic_entry(seq_len=32, num_layers=1, seed=i) for i in range(6)]
    chunk_size = entries[0].identity.recipe.chunk_size
    with (
        open_store(servers[0].address, timeout_s=10) as one,
        open_store(servers[1].address + "," + servers[2].address) as two,
    ):
        for entry in entries:
            one.put(entry)
            two.put(entry)
        for store in (one, two):
            for entry in entries:
                found = store.lookup_keys([entry.key], chunk_size, 32)
                assert (found.keys, found.cached_tokens, found.tiers) == ([entry.key], 32, ["cpu"])
        for server in servers:
            server.stop()
        for store in (one, two):
            with pytest.raises(grpc.RpcError) as e:
                store.lookup_keys([entry.key for entry in entries], chunk_size, 32)  # keys on both shards
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, store.address
