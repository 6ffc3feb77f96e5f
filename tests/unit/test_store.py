"""TieredStore: placement, demotion, promotion, admission, graded shrinking, checks, lookup."""

from __future__ import annotations

import pytest
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import EntryKey, Recipe
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, EntryTooLarge, InvalidEntry, OverQuota
from dkv.kvstore.memory_tier import MemoryTier
from dkv.kvstore.policy import LRUPolicy, ValuePolicy
from dkv.kvstore.prefix import chain_hashes
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.store import MAX_CLAIMED_COMPRESSION, TieredStore, TierSpec
from dkv.testing import synthetic_entry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frames_of(seed: int, importance: float = 1.0, seq_len: int = 128, **kw) -> list[bytes]:
    return codec.encode(synthetic_entry(seq_len=seq_len, seed=seed, importance=importance, **kw), max_frame_bytes=16384)


ENTRY_BYTES = sum(map(len, frames_of(0)))


def make_store(*capacities: int, policy=None, shrink: ShrinkRule | None = None, clock=None) -> TieredStore:
    names = ["device", "cpu", "redis"]
    specs = [
        TierSpec(MemoryTier(names[i], cap), shrink if (shrink and i > 0) else ShrinkRule())
        for i, cap in enumerate(capacities)
    ]
    return TieredStore(specs, policy or ValuePolicy(), clock=clock or Clock())


def assert_within_capacity(store: TieredStore) -> None:
    for spec in store.tiers:
        assert spec.tier.used_bytes() <= spec.tier.capacity_bytes


def test_put_get_round_trip_is_exact():
    store = make_store(10 * ENTRY_BYTES)
    entry = synthetic_entry(seq_len=300, keep_fraction=0.5, quant_scheme="mixed", seed=3)
    result = store.put(codec.encode(entry, max_frame_bytes=16384))
    assert result.key == entry.key and result.tier == "device" and not result.replaced
    got = codec.decode(store.get(entry.key).frames)
    for a, b in zip(entry.layers, got.layers):
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name]), name


def test_new_entries_go_to_the_fastest_tier_then_demote_one_tier_down_then_drop():
    clock = Clock()
    store = make_store(2 * ENTRY_BYTES, 2 * ENTRY_BYTES, clock=clock)
    keys = []
    for i in range(6):
        clock.now += 1
        keys.append(store.put(frames_of(i)).key)
        assert_within_capacity(store)
    tiers = [store.tier_of(k) for k in keys]
    assert tiers == [None, None, "cpu", "cpu", "device", "device"]
    s = store.stats()
    assert (s.demotions, s.evictions, s.entries) == (4, 2, 4)
    with pytest.raises(EntryNotFound):
        store.get(keys[0])


def test_a_hit_in_a_slower_tier_promotes_the_entry():
    clock = Clock()
    store = make_store(2 * ENTRY_BYTES, 4 * ENTRY_BYTES, clock=clock)
    keys = []
    for i in range(4):
        clock.now += 1
        keys.append(store.put(frames_of(i)).key)
    assert store.tier_of(keys[0]) == "cpu"
    clock.now += 1
    assert store.get(keys[0]).tier == "cpu"
    assert store.tier_of(keys[0]) == "device"
    assert store.stats().promotions == 1
    assert_within_capacity(store)


def test_important_entries_survive_longer_than_unimportant_ones():
    clock = Clock()
    store = make_store(3 * ENTRY_BYTES, 3 * ENTRY_BYTES, clock=clock)
    important, unimportant = [], []
    for i in range(40):
        clock.now += 1
        imp = 1.0 if i % 2 else 0.1
        key = store.put(frames_of(i, importance=imp)).key
        (important if imp == 1.0 else unimportant).append(key)
        assert_within_capacity(store)
    alive = lambda keys: sum(store.contains(k) for k in keys)  # noqa: E731
    assert alive(important) > alive(unimportant)
    assert alive(important) + alive(unimportant) == 6


def test_value_policy_keeps_reused_entries_that_lru_would_evict():
    """One hot entry read now and then, and a scan of one-shot entries."""
    results = {}
    for policy in (ValuePolicy(half_life_s=600), LRUPolicy()):
        clock = Clock()
        store = make_store(3 * ENTRY_BYTES, policy=policy, clock=clock)
        hot = store.put(frames_of(100)).key
        for _ in range(5):
            clock.now += 1
            store.get(hot)
        for i in range(6):
            clock.now += 1
            store.put(frames_of(i))
        results[policy.name] = store.contains(hot)
    assert results == {"value": True, "lru": False}


def test_a_new_entry_is_not_dropped_before_its_first_read_even_when_it_is_worth_least():
    """A prompt's chunks, fp16 and unread, put into a full store of better-valued entries."""
    clock = Clock()
    store = make_store(6 * ENTRY_BYTES + ENTRY_BYTES // 2, clock=clock)
    valued = [store.put(frames_of(i, importance=1.0)).key for i in range(6)]
    for key in valued:
        store.get(key)
    clock.now += 1
    chunks = [store.put(frames_of(100 + i, importance=0.01)).key for i in range(3)]
    assert all(store.contains(k) for k in chunks)  # each chunk's put dropped a valued entry, not a sibling
    assert sum(store.contains(k) for k in valued) == 3
    for key in chunks:
        store.get(key)
    clock.now += 1
    store.put(frames_of(200, importance=1.0))
    assert sum(store.contains(k) for k in chunks) == 2  # read once: ranked by the policy again


def test_admission_sends_a_less_valuable_new_entry_to_the_next_tier():
    clock = Clock()
    store = make_store(2 * ENTRY_BYTES, 4 * ENTRY_BYTES, clock=clock)
    hot = [store.put(frames_of(i, importance=1.0)).key for i in range(2)]
    for k in hot:
        store.get(k)
    cold = store.put(frames_of(9, importance=0.05)).key
    assert store.tier_of(cold) == "cpu"
    assert all(store.tier_of(k) == "device" for k in hot)


def test_demotion_shrinks_entries_by_the_tier_rule():
    clock = Clock()
    rule = ShrinkRule(keep_fraction=0.5, quant="int4")
    store = make_store(ENTRY_BYTES, 10 * ENTRY_BYTES, shrink=rule, clock=clock)
    first = store.put(frames_of(1)).key
    clock.now += 1
    store.put(frames_of(2))
    assert store.tier_of(first) == "cpu"
    header = store.header(first)
    assert header.derived == ("quant:int4", "shrink:0.5")
    assert 0 < header.importance < 1.0
    shrunk = codec.decode(store.get(first).frames)
    assert shrunk.stored_nbytes < ENTRY_BYTES / 5
    assert shrunk.kept_tokens()[0] == 3 * 64  # 128 tokens, 3 heads, half kept
    assert shrunk.layers[0].quantized


def test_a_flipped_byte_in_memory_is_a_miss_never_wrong_bytes():
    store = make_store(10 * ENTRY_BYTES)
    frames = [bytearray(f) for f in frames_of(5)]
    key = store.put(frames).key
    frames[2][100] ^= 0x40  # memory corruption after the write
    with pytest.raises(CorruptEntry, match="deleted"):
        store.get(key)
    assert store.stats().checksum_failures == 1
    assert not store.contains(key)
    with pytest.raises(EntryNotFound):
        store.get(key)
    assert store.tiers[0].tier.used_bytes() == 0


def test_entry_larger_than_every_tier_is_rejected_and_nothing_is_stored():
    store = make_store(ENTRY_BYTES // 2, ENTRY_BYTES // 2)
    with pytest.raises(EntryTooLarge, match="larger than every tier"):
        store.put(frames_of(1))
    assert store.stats().entries == 0 and store.stats().rejected_puts == 1


def test_entry_over_the_size_limit_is_rejected():
    store = TieredStore([TierSpec(MemoryTier("cpu", 10 * ENTRY_BYTES))], max_entry_bytes=ENTRY_BYTES // 2)
    with pytest.raises(EntryTooLarge, match="over"):
        store.put(frames_of(1))


def test_nan_in_keys_is_invalid_and_not_stored():
    store = make_store(10 * ENTRY_BYTES)
    entry = synthetic_entry(seq_len=64, seed=1)
    entry.layers[1].keys[3, 5] = float("nan")
    with pytest.raises(InvalidEntry, match="layer 1: keys contain NaN or Inf"):
        store.put(codec.encode(entry))
    assert store.stats().entries == 0


def test_put_of_the_same_key_replaces_it():
    store = make_store(10 * ENTRY_BYTES)
    first = store.put(frames_of(1))
    again = store.put(frames_of(1))
    assert again.replaced and again.key == first.key
    assert store.stats().entries == 1
    assert store.tiers[0].tier.used_bytes() == first.stored_bytes


def test_lookup_finds_the_longest_cached_prefix_of_a_longer_prompt():
    store = make_store(100 * ENTRY_BYTES)
    prompt = list(range(1000, 1000 + 700))
    for length in (256, 512):
        store.put(codec.encode(synthetic_entry(token_ids=prompt[:length], seed=length), max_frame_bytes=65536))
    found = store.lookup("default", "synthetic-model", Recipe(method="full"), prompt)
    assert found.cached_tokens == 512 and found.tiers == ["device"]
    assert found.keys[0].prefix_hash == chain_hashes(prompt[:512], 256, "synthetic-model", Recipe().recipe_id)[-1]
    assert store.lookup("other-tenant", "synthetic-model", Recipe(method="full"), prompt) is None
    assert store.lookup("default", "another-model", Recipe(method="full"), prompt) is None
    assert store.lookup("default", "synthetic-model", Recipe(method="full"), prompt[:200]) is None


def test_delete_frees_the_tier():
    store = make_store(10 * ENTRY_BYTES)
    key = store.put(frames_of(1)).key
    assert store.delete(key) and not store.delete(key)
    assert store.tiers[0].tier.used_bytes() == 0
    assert not store.delete(EntryKey("t", "m", "r", "h"))


def test_a_put_that_fails_a_check_leaves_the_store_as_it_was():
    store = make_store(10 * ENTRY_BYTES)
    kept = store.put(frames_of(1)).key
    frames = frames_of(2)
    broken = frames[:1] + frames[2:]  # a data frame lost
    with pytest.raises(CorruptEntry):
        store.put(broken)
    assert store.stats().entries == 1 and store.contains(kept)
    assert store.tiers[0].tier.used_bytes() == sum(map(len, frames_of(1)))


# --- quotas, values from what the store can check, audits --------------------------------------------


def tenant_frames(tenant: str, seed: int, **kw) -> list[bytes]:
    return frames_of(seed, tenant=tenant, **kw)


def test_a_tenant_over_its_quota_goes_down_the_tiers_and_is_refused_when_its_entries_are_unread():
    clock = Clock()
    specs = [
        TierSpec(MemoryTier("device", 10 * ENTRY_BYTES), tenant_quota=2 * ENTRY_BYTES),
        TierSpec(MemoryTier("cpu", 10 * ENTRY_BYTES), tenant_quota=3 * ENTRY_BYTES),
    ]
    store = TieredStore(specs, ValuePolicy(), clock=clock)
    keys = []
    for i in range(5):
        clock.now += 1
        keys.append(store.put(tenant_frames("acme", i)).key)
    # acme's quota in the fast tier is full of entries nobody read yet: its next ones go down
    assert [store.tier_of(k) for k in keys] == ["device", "device", "cpu", "cpu", "cpu"]
    clock.now += 1
    with pytest.raises(OverQuota, match="tenant 'acme' is at its quota"):
        store.put(tenant_frames("acme", 5))
    assert all(store.contains(k) for k in keys)
    other = store.put(tenant_frames("beta", 6))  # another tenant is not held back
    assert other.tier == "device"
    store.get(keys[2])  # read once: now it may make room for acme's next entry
    clock.now += 1
    assert store.put(tenant_frames("acme", 7)).tier == "cpu"
    assert not store.contains(keys[2]) and sum(store.contains(k) for k in keys) == 4
    clock.now += store.protect_unread_s  # a minute on, unread entries are ranked like any other
    assert store.put(tenant_frames("acme", 8)).tier == "device"
    stats = store.stats("acme")
    assert stats.tenant == "acme" and stats.over_quota == 1 and stats.rejected_puts == 1 and stats.puts == 7
    assert [t.entries for t in stats.tiers] == [2, 3]
    assert [t.quota_bytes for t in stats.tiers] == [2 * ENTRY_BYTES, 3 * ENTRY_BYTES]
    assert all(0 < t.used_bytes <= t.quota_bytes for t in stats.tiers)
    everyone = store.stats()
    assert [v.tenant for v in everyone.tenants] == ["acme", "beta"]
    assert everyone.entries == 6 and everyone.puts == 8 and everyone.tenants[1].entries == 1


def test_an_entry_larger_than_its_tenant_s_quota_everywhere_is_refused_before_anything_moves():
    store = TieredStore([TierSpec(MemoryTier("cpu", 10 * ENTRY_BYTES), tenant_quota=ENTRY_BYTES // 2)])
    with pytest.raises(OverQuota, match="larger than tenant 'default'"):
        store.put(frames_of(1))
    assert store.stats().over_quota == 1 and store.stats().entries == 0


def test_an_entry_s_value_comes_from_what_the_store_can_check_not_from_its_claims():
    """A tiny entry claiming a long context (1 token kept of 65536 per layer, one narrow head) may
    rank at most MAX_CLAIMED_COMPRESSION times a dense entry of the same bytes; as claimed, its
    value would be thousands of times that."""
    store = make_store(100 * ENTRY_BYTES)
    hostile = synthetic_entry(
        seq_len=65536, keep_fraction=1 / 65536, num_layers=16, num_kv_heads=1, head_dim=4, page_size=16, seed=1
    )
    honest = synthetic_entry(seq_len=128, seed=2)  # fp16, every token kept: compression 1
    values = {}
    for name, entry in (("hostile", hostile), ("honest", honest)):
        frames = codec.encode(entry)
        key = store.put(frames).key
        header, size = store.header(key), sum(map(len, frames))
        stats = store._entries[key].stats
        claimed = header.identity.seq_len * header.num_layers * header.num_kv_heads * header.head_dim / size
        values[name] = (store.policy.value(stats, stats.last_access), claimed)
    (hostile_value, hostile_claim), (honest_value, honest_claim) = values["hostile"], values["honest"]
    assert hostile_claim / honest_claim > 1000  # what the header says
    assert hostile_value / honest_value <= MAX_CLAIMED_COMPRESSION * 1.1  # what the store believes
    assert honest_value == pytest.approx(honest_claim)  # an honest entry is ranked as it says


def test_an_audit_drops_entries_a_tier_lost_and_removes_what_no_index_names():
    store = make_store(10 * ENTRY_BYTES)
    tier = store.tiers[0].tier
    kept, lost = store.put(frames_of(1)).key, store.put(frames_of(2)).key
    tier.remove(lost)  # gone behind the store's back
    stray = synthetic_entry(seq_len=64, seed=3)
    tier.put(stray.key, codec.encode(stray))  # held, but indexed nowhere
    assert store.audit() == {"lost": 1, "adopted": 0, "removed": 1}
    assert store.contains(kept) and not store.contains(lost) and not tier.contains(stray.key)
    assert store.stats().lost == 1 and store.stats().tiers[0].used_bytes == tier.used_bytes()
    with pytest.raises(EntryNotFound):
        store.get(lost)
