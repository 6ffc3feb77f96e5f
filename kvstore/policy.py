"""Eviction policies: they rank entries and choose victims; they never touch storage.

``ValuePolicy`` is dkv's default: value = importance kept × expected reuse × recompute cost ÷ bytes,
with reuse = (1 + hits) × 2^(-age / half_life) and recompute cost = original tokens × layers × KV
width (KV heads × head dim: what prefilling a token costs in a layer, and what its K and V weigh).
``LRUPolicy`` is the baseline every other store uses (value = last access time).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from dkv.kvstore.entry import EntryKey


@dataclass
class EntryStats:
    """What a policy may look at for one stored entry."""

    key: EntryKey
    nbytes: int
    importance: float  # fraction of attention importance kept, [0, 1]
    seq_len: int  # original context tokens
    num_layers: int
    hits: int = 0
    last_access: float = 0.0
    tier: int = 0
    kv_width: int = 1  # KV heads x head dim


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def value(self, entry: EntryStats, now: float) -> float:
        """Higher = more worth keeping in a fast tier."""

    def choose_victims(
        self, candidates: Iterable[EntryStats], bytes_needed: int, now: float
    ) -> list[EntryStats] | None:
        """The least valuable entries whose bytes add up to ``bytes_needed``; None if all of them do not."""
        if bytes_needed <= 0:
            return []
        victims, freed = [], 0
        for entry in sorted(candidates, key=lambda e: self.value(e, now)):
            victims.append(entry)
            freed += entry.nbytes
            if freed >= bytes_needed:
                return victims
        return None


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def value(self, entry: EntryStats, now: float) -> float:
        return entry.last_access


class ValuePolicy(EvictionPolicy):
    name = "value"

    def __init__(self, half_life_s: float = 600.0):
        if half_life_s <= 0:
            raise ValueError(f"half_life_s {half_life_s} must be > 0")
        self.half_life_s = half_life_s

    def value(self, entry: EntryStats, now: float) -> float:
        age = max(0.0, now - entry.last_access)
        reuse = (1 + entry.hits) * 2.0 ** (-age / self.half_life_s)
        cost = entry.seq_len * entry.num_layers * entry.kv_width
        return entry.importance * reuse * cost / max(entry.nbytes, 1)


POLICIES = {"value": ValuePolicy, "lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction policy {name!r} is unknown; use one of {sorted(POLICIES)}") from None
