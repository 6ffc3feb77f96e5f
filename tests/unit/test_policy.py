"""dkv.kvstore.policy: ValuePolicy and LRUPolicy ranking, and victim selection."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dkv.kvstore.entry import EntryKey
from dkv.kvstore.policy import POLICIES, EntryStats, LRUPolicy, ValuePolicy, make_policy

NOW = 10_000.0


def _stats(
    name="e", nbytes=1000, importance=1.0, seq_len=100, num_layers=4, hits=0, last_access=NOW, tier=0
) -> EntryStats:
    return EntryStats(EntryKey("t", "m", "r", name), nbytes, importance, seq_len, num_layers, hits, last_access, tier)


def _ranked(policy, entries, now=NOW) -> list[str]:
    """Names from least to most valuable."""
    return [e.key.prefix_hash for e in sorted(entries, key=lambda e: policy.value(e, now))]


def test_value_formula():
    p = ValuePolicy(half_life_s=600)
    e = _stats(nbytes=2048, importance=0.5, seq_len=300, num_layers=8, hits=3, last_access=NOW - 1200)
    want = 0.5 * (1 + 3) * 2 ** (-1200 / 600) * 300 * 8 / 2048
    assert math.isclose(p.value(e, NOW), want, rel_tol=1e-12)


def test_value_ranks_by_importance():
    p = ValuePolicy()
    entries = [_stats("i9", importance=0.9), _stats("i1", importance=0.1), _stats("i5", importance=0.5)]
    assert _ranked(p, entries) == ["i1", "i5", "i9"]
    assert math.isclose(p.value(entries[0], NOW), 9 * p.value(entries[1], NOW))
    assert p.value(_stats(importance=0.0), NOW) == 0.0


def test_value_ranks_by_hits():
    p = ValuePolicy()
    entries = [_stats("h5", hits=5), _stats("h0", hits=0), _stats("h1", hits=1)]
    assert _ranked(p, entries) == ["h0", "h1", "h5"]
    assert math.isclose(p.value(entries[0], NOW), 6 * p.value(entries[1], NOW))
    assert p.value(entries[1], NOW) > 0  # never-hit entries still have value


def test_value_ranks_by_recency_with_half_life():
    p = ValuePolicy(half_life_s=100)
    fresh, one, two = _stats("fresh"), _stats("one", last_access=NOW - 100), _stats("two", last_access=NOW - 200)
    assert _ranked(p, [two, fresh, one]) == ["two", "one", "fresh"]
    assert math.isclose(p.value(one, NOW), p.value(fresh, NOW) / 2)
    assert math.isclose(p.value(two, NOW), p.value(fresh, NOW) / 4)
    # Access times in the future (clock skew) count as age 0, not as a bonus.
    assert p.value(_stats(last_access=NOW + 500), NOW) == p.value(fresh, NOW)
    # A longer half-life forgets more slowly.
    assert ValuePolicy(half_life_s=1000).value(one, NOW) > p.value(one, NOW)


def test_recency_can_outweigh_hits():
    p = ValuePolicy(half_life_s=60)
    stale_popular = _stats("stale", hits=7, last_access=NOW - 600)  # 8 * 2^-10
    fresh_unhit = _stats("fresh", hits=0)
    assert _ranked(p, [fresh_unhit, stale_popular]) == ["stale", "fresh"]


def test_value_ranks_by_recompute_cost():
    p = ValuePolicy()
    entries = [_stats("long", seq_len=4000), _stats("short", seq_len=100), _stats("deep", seq_len=100, num_layers=40)]
    assert _ranked(p, entries) == ["short", "deep", "long"]
    assert math.isclose(p.value(entries[0], NOW), 40 * p.value(entries[1], NOW))
    assert math.isclose(p.value(entries[2], NOW), 10 * p.value(entries[1], NOW))
    # seq_len x layers is what counts: 200 x 4 == 100 x 8.
    assert math.isclose(
        p.value(_stats(seq_len=200, num_layers=4), NOW), p.value(_stats(seq_len=100, num_layers=8), NOW)
    )


def test_value_ranks_by_bytes():
    p = ValuePolicy()
    entries = [_stats("small", nbytes=100), _stats("big", nbytes=10_000), _stats("mid", nbytes=1000)]
    assert _ranked(p, entries) == ["big", "mid", "small"]
    assert math.isclose(p.value(entries[0], NOW), 100 * p.value(entries[1], NOW))
    assert p.value(_stats(nbytes=0), NOW) == p.value(_stats(nbytes=1), NOW)  # no division by zero


def test_value_policy_rejects_bad_half_life():
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="half_life_s"):
            ValuePolicy(half_life_s=bad)


def test_lru_ranks_by_last_access_only():
    p = LRUPolicy()
    entries = [
        _stats("new", last_access=NOW, importance=0.01, nbytes=10**9),
        _stats("old", last_access=NOW - 1000, hits=100, importance=1.0, nbytes=1, seq_len=10**6),
        _stats("mid", last_access=NOW - 10),
    ]
    assert _ranked(p, entries) == ["old", "mid", "new"]
    assert p.value(entries[0], NOW) == NOW
    assert p.value(entries[0], NOW + 5000) == p.value(entries[0], NOW)


@pytest.mark.parametrize("policy", [ValuePolicy(), LRUPolicy()])
def test_choose_victims_least_valuable_first_until_enough(policy):
    entries = [_stats(f"e{i}", nbytes=100, last_access=NOW - 1000 + i * 100, hits=i) for i in range(6)]
    shuffled = [entries[i] for i in (3, 0, 5, 1, 4, 2)]
    assert [v.key.prefix_hash for v in policy.choose_victims(shuffled, 1, NOW)] == ["e0"]
    assert [v.key.prefix_hash for v in policy.choose_victims(shuffled, 100, NOW)] == ["e0"]
    assert [v.key.prefix_hash for v in policy.choose_victims(shuffled, 101, NOW)] == ["e0", "e1"]
    assert [v.key.prefix_hash for v in policy.choose_victims(shuffled, 300, NOW)] == ["e0", "e1", "e2"]
    assert len(policy.choose_victims(shuffled, 600, NOW)) == 6


def test_choose_victims_stops_once_enough_even_with_large_entries():
    p = ValuePolicy()
    cheap_big = _stats("big", nbytes=10_000, importance=0.01)
    small = [_stats(f"s{i}", nbytes=10, importance=0.5) for i in range(3)]
    victims = p.choose_victims(small + [cheap_big], 50, NOW)
    assert [v.key.prefix_hash for v in victims] == ["big"]


@pytest.mark.parametrize("needed", [0, -1, -(10**9)])
def test_choose_victims_nothing_needed(needed):
    assert ValuePolicy().choose_victims([_stats()], needed, NOW) == []
    assert LRUPolicy().choose_victims([], needed, NOW) == []


def test_choose_victims_none_when_not_enough():
    entries = [_stats("a", nbytes=100), _stats("b", nbytes=200)]
    assert ValuePolicy().choose_victims(entries, 301, NOW) is None
    assert LRUPolicy().choose_victims(entries, 301, NOW) is None
    assert ValuePolicy().choose_victims([], 1, NOW) is None
    assert len(ValuePolicy().choose_victims(entries, 300, NOW)) == 2


def test_choose_victims_accepts_any_iterable_and_does_not_mutate():
    entries = [_stats("a", nbytes=10, hits=5), _stats("b", nbytes=10)]
    before = [dataclasses.asdict(e) for e in entries]
    victims = ValuePolicy().choose_victims(iter(entries), 10, NOW)
    assert [v.key.prefix_hash for v in victims] == ["b"]
    assert victims[0] is entries[1]
    assert [dataclasses.asdict(e) for e in entries] == before


def test_make_policy():
    assert isinstance(make_policy("value"), ValuePolicy)
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert make_policy("value").name == "value" and make_policy("lru").name == "lru"
    assert set(POLICIES) == {"value", "lru"}


@pytest.mark.parametrize("name", ["lfu", "", "LRU", "Value"])
def test_make_policy_unknown(name):
    with pytest.raises(ValueError, match=r"unknown; use one of \['lru', 'value'\]"):
        make_policy(name)
