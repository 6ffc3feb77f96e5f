"""TieredStore: placement, demotion, promotion, admission, graded shrinking, checks, lookup."""

from __future__ import annotations

import pytest
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import EntryKey, Recipe
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, EntryTooLarge, InvalidEntry
from dkv.kvstore.memory_tier import MemoryTier
from dkv.kvstore.policy import LRUPolicy, ValuePolicy
from dkv.kvstore.prefix import chain_hashes
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.store import TieredStore, TierSpec
from dkv.kvstore.synthetic import synthetic_entry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frames_of(seed: int, importance: float = 1.0, seq_len: int = 128, **kw) -> list[bytes]:
    return codec.encode(synthetic_entry(seq_len=seq_len, seed=seed, importance=importance, **kw),
                        max_frame_bytes=16384)


ENTRY_BYTES = sum(map(len, frames_of(0)))


def make_store(*capacities: int, policy=None, shrink: ShrinkRule | None = None, clock=None) -> TieredStore:
    names = ["device", "cpu", "redis"]
    specs = [TierSpec(MemoryTier(names[i], cap), shrink if (shrink and i > 0) else ShrinkRule())
             for i, cap in enumerate(capacities)]
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
    assert shrunk.nbytes < ENTRY_BYTES / 5
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
