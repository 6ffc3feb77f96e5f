"""The one storage interface every tier implements.

A tier stores an entry as the list of its codec frames (``kvstore.codec``): frame 0 is the
header, then the data frames, each at most 4 MiB. Tiers do not decode or verify frames (the
``TieredStore`` does) and never choose what to evict (the ``EvictionPolicy`` does): they hold
bytes up to a capacity, and say how much they hold.

Call order: ``put`` only after the store made room (``used_bytes() + size <= capacity``);
``get`` returns None for a miss; ``remove`` is idempotent; ``close`` last.
Failures of the backing system raise ``TierUnavailable``.

A ``remote`` tier (Redis) is reached over the network: the store never calls it while holding its
lock, and asks it now and then to ``audit`` its own bookkeeping against what it really holds (a
remote system may lose entries behind the store's back). In-process tiers are exact by
construction.

A ``shared`` tier (Redis, the last tier) holds the entries of every store that writes to it, each
store counting its own (``keys``, ``used_bytes``, ``audit``): ``get``, ``contains`` and
``header_frame`` find any store's entry, and a store that finds one it has no index entry for
``adopt``-s it (a lost shard's entries, read by the shard that owns their keys now).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from dkv.kvstore.entry import EntryKey

Frames = Sequence[bytes | memoryview]


def frames_nbytes(frames: Frames) -> int:
    return sum(len(f) for f in frames)


class StorageTier(ABC):
    """One level of the hierarchy (device memory, host memory, Redis)."""

    remote = False
    shared = False

    def __init__(self, name: str, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"tier {name}: capacity_bytes {capacity_bytes} must be >= 0")
        self.name = name
        self.capacity_bytes = capacity_bytes

    @abstractmethod
    def put(self, key: EntryKey, frames: Frames) -> None:
        """Store ``frames`` under ``key``, replacing what was there; visible only once complete."""

    @abstractmethod
    def get(self, key: EntryKey) -> list[bytes | memoryview] | None:
        """The frames of ``key``, or None on a miss."""

    @abstractmethod
    def contains(self, key: EntryKey) -> bool: ...

    @abstractmethod
    def remove(self, key: EntryKey) -> bool:
        """Remove ``key``; True if it was there."""

    @abstractmethod
    def keys(self) -> list[EntryKey]:
        """Every key held."""

    @abstractmethod
    def used_bytes(self) -> int: ...

    def header_frame(self, key: EntryKey) -> bytes | memoryview | None:
        """Frame 0 of ``key`` (its header), or None; tiers override to avoid reading the rest."""
        frames = self.get(key)
        return frames[0] if frames else None

    def batch_contains(self, keys: Iterable[EntryKey]) -> int:
        """How many of ``keys``, from the first, are present (longest-prefix semantics)."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def adopt(self, keys: Sequence[EntryKey]) -> dict[EntryKey, bytes | memoryview]:
        """For a ``shared`` tier: count the entries of ``keys`` that are here (another store wrote them)
        as this store's too, and return their header frames; keys not here are left out."""
        raise NotImplementedError(f"tier {self.name} is not shared: no other store writes entries into it")

    def audit(self) -> dict[EntryKey, int]:
        """Repair the tier's own bookkeeping (index, byte counter) against what it really holds, and
        return the bytes of each entry it holds. In-process tiers are exact: they only report (this
        default reads every entry; tiers override it with something cheaper)."""
        return {key: frames_nbytes(self.get(key) or ()) for key in self.keys()}

    def close(self) -> None:  # noqa: B027  a tier without connections has nothing to release
        """Release connections and memory."""
