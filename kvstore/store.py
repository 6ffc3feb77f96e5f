"""The tiered store: placement, promotion, demotion with graded shrinking, lookup, stats.

Tiers are ordered fastest first (device, host, Redis). A new entry goes to the fastest tier that
has room, or can make room by demoting entries the policy values less than the new one; demoted
entries move one tier down (shrunk by that tier's ``ShrinkRule``) and may push others down in
turn; the last tier drops its victims. A hit in a slower tier promotes the entry up. Every read
re-checks every frame, and a failed check deletes the entry and reports ``CorruptEntry``: the
store may lose entries, it never returns wrong bytes. A tier that fails (Redis down, full) is
skipped for ``retry_after_s`` and the store keeps serving from the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dkv.kvstore import codec
from dkv.kvstore.codec import EntryHeader
from dkv.kvstore.entry import CompressedKV, EntryKey, Recipe
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, EntryTooLarge, TierUnavailable
from dkv.kvstore.policy import EntryStats, EvictionPolicy, ValuePolicy
from dkv.kvstore.prefix import longest_cached_prefix
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.tier import Frames, StorageTier, frames_nbytes

log = logging.getLogger("dkv.store")
DECODED_ENTRIES = 8


@dataclass
class TierSpec:
    """A tier and what happens to entries that enter it from a faster tier."""

    tier: StorageTier
    shrink: ShrinkRule = field(default_factory=ShrinkRule)


@dataclass
class _Stored:
    stats: EntryStats
    header: EntryHeader


@dataclass
class PutResult:
    key: EntryKey
    tier: str
    stored_bytes: int
    replaced: bool


@dataclass
class GetResult:
    header: EntryHeader
    frames: list
    tier: str


@dataclass
class LookupResult:
    keys: list[EntryKey]  # the entries covering the prefix, in order (one for a whole-context recipe)
    cached_tokens: int
    tiers: list[str]
    headers: list[EntryHeader]
    stored_bytes: list[int]


@dataclass
class TierStatus:
    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    healthy: bool
    hits: int
    errors: int


@dataclass
class StoreStats:
    tiers: list[TierStatus]
    entries: int
    hits: int
    misses: int
    evictions: int
    demotions: int
    promotions: int
    checksum_failures: int
    puts: int
    rejected_puts: int


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[TierSpec],
        policy: EvictionPolicy | None = None,
        max_entry_bytes: int = 1 << 30,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        protect_unread_s: float = 60.0,
    ):
        """``protect_unread_s``: for this long after its put, an entry not yet read is dropped
        from the last tier only when other entries cannot make the room (the newest such entries,
        up to half the tier): the reader it was written for (a decode worker, the next chunk of a
        prompt) finds it even in a full store whose policy ranks it lowest."""
        if not tiers:
            raise ValueError("a store needs at least one tier")
        names = [spec.tier.name for spec in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.policy = policy or ValuePolicy()
        self.max_entry_bytes = max_entry_bytes
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.protect_unread_s = protect_unread_s
        self._entries: dict[EntryKey, _Stored] = {}
        # decoded entries (zero-copy views of verified frames) for Summaries/Select, which read
        # one layer per decode step: a few, most recently used last
        self._decoded: OrderedDict[EntryKey, tuple[bytes, CompressedKV]] = OrderedDict()
        self._lock = threading.RLock()
        self._down_until = [0.0] * len(self.tiers)
        self._tier_hits = [0] * len(self.tiers)
        self._tier_errors = [0] * len(self.tiers)
        self.misses = self.evictions = self.demotions = self.promotions = 0
        self.checksum_failures = self.puts = self.rejected_puts = 0
        self._recover()

    # ---------------------------------------------------------------- public API

    def put(self, frames: Frames, header: EntryHeader | None = None) -> PutResult:
        """Verify and store an entry given as codec frames; the key comes from its header.

        Raises ``InvalidEntry`` / ``CorruptEntry`` for bad input, ``EntryTooLarge`` if it fits
        no tier, ``TierUnavailable`` if every tier that could hold it is failing. Nothing is
        stored unless every check passed.
        """
        try:
            if header is None:
                header, frames = codec.check_frames(frames, self.max_entry_bytes)
            size = frames_nbytes(frames)
            if size > self.max_entry_bytes:
                raise EntryTooLarge(f"entry of {size} bytes is over the store's limit of {self.max_entry_bytes} "
                                    "bytes: compress it more (higher ratio, quantization) or raise max_entry_bytes")
            codec.decode_checked(header, frames)  # every shape, dtype and value; raises InvalidEntry
        except Exception:
            self.rejected_puts += 1
            raise
        key = header.key
        with self._lock:
            replaced = key in self._entries
            if replaced:
                self._remove(key)
            placed = self._place(header, list(frames), self._new_stats(header, size), 0, len(self.tiers), True)
            if placed is None:
                self.rejected_puts += 1
                self._raise_unplaceable(size)
            self.puts += 1
            stored = self._entries[key]
            log.info("put %s: %d bytes in tier %s%s", key, stored.stats.nbytes, self.tiers[placed].tier.name,
                     " (replaced)" if replaced else "")
            return PutResult(key, self.tiers[placed].tier.name, stored.stats.nbytes, replaced)

    def count_rejected(self) -> None:
        """Count a Put refused before it reached ``put`` (e.g. a broken frame stream)."""
        self.rejected_puts += 1

    def get(self, key: EntryKey) -> GetResult:
        """The verified frames of ``key``; promotes it on a hit in a slower tier.

        Raises ``EntryNotFound`` on a miss and ``CorruptEntry`` (after deleting the entry) when a
        stored frame fails its check.
        """
        with self._lock:
            stored = self._entries.get(key)
            tier_index = stored.stats.tier if stored else -1
        if stored is None or not self._healthy(tier_index):
            self.misses += 1
            raise EntryNotFound(f"no entry {key}")
        tier = self.tiers[tier_index].tier
        try:
            frames = tier.get(key)
        except TierUnavailable as e:
            self._mark_down(tier_index, e)
            frames = None
        if frames is None:
            with self._lock:
                if self._entries.get(key) is stored:
                    del self._entries[key]
            self.misses += 1
            raise EntryNotFound(f"no entry {key} (lost from tier {tier.name})")
        try:
            header, frames = codec.check_frames(frames)
            if header.key != key:
                raise CorruptEntry(f"tier {tier.name} returned the frames of {header.key} for {key}")
        except (CorruptEntry, ValueError) as e:
            self.checksum_failures += 1
            log.warning("entry %s failed its check in tier %s and was deleted: %s", key, tier.name, e)
            with self._lock:
                if self._entries.get(key) is stored:
                    self._remove(key)
            raise CorruptEntry(f"entry {key} was corrupted in tier {tier.name} and has been deleted; "
                               f"recompute it ({e})") from e
        with self._lock:
            self._tier_hits[tier_index] += 1
            stored.stats.hits += 1
            stored.stats.last_access = self.clock()
            if tier_index > 0 and self._entries.get(key) is stored:
                self._promote(stored, frames)
        return GetResult(header, frames, tier.name)

    def entry(self, key: EntryKey) -> CompressedKV:
        """The decoded entry (read-only views), verified once and kept among the last few used.

        Raises like ``get``.
        """
        stored = self._entries.get(key)
        cached = self._decoded.get(key)
        if cached is not None and stored is not None and cached[0] == stored.header.entry_id:
            self._decoded.move_to_end(key)
            return cached[1]
        result = self.get(key)
        entry = codec.decode_checked(result.header, result.frames)
        with self._lock:
            self._decoded[key] = (result.header.entry_id, entry)
            while len(self._decoded) > DECODED_ENTRIES:
                self._decoded.popitem(last=False)
        return entry

    def lookup(self, tenant: str, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int] | np.ndarray
               ) -> LookupResult | None:
        """The longest cached prefix of ``token_ids`` for this tenant, model and recipe, or None."""
        found = longest_cached_prefix(token_ids, recipe, model_fingerprint, tenant, self._start_of)
        if found is None:
            return None
        keys, tokens = found
        stored = [self._entries.get(k) for k in keys]
        if None in stored:  # evicted meanwhile
            return None
        return LookupResult(keys, tokens, [self.tiers[s.stats.tier].tier.name for s in stored],
                            [s.header for s in stored], [s.stats.nbytes for s in stored])

    def probe(self, key: EntryKey) -> tuple[EntryHeader, str, int] | None:
        """(header, tier, stored bytes) of ``key`` when a healthy tier holds it, else None."""
        stored = self._entries.get(key)
        if stored is None or not self._healthy(stored.stats.tier):
            return None
        return stored.header, self.tiers[stored.stats.tier].tier.name, stored.stats.nbytes

    def _start_of(self, key: EntryKey) -> int | None:
        found = self.probe(key)
        return None if found is None else found[0].identity.start

    def contains(self, key: EntryKey) -> bool:
        return self.probe(key) is not None

    def header(self, key: EntryKey) -> EntryHeader:
        stored = self._entries.get(key)
        if stored is None:
            raise EntryNotFound(f"no entry {key}")
        return stored.header

    def tier_of(self, key: EntryKey) -> str | None:
        stored = self._entries.get(key)
        return self.tiers[stored.stats.tier].tier.name if stored else None

    def delete(self, key: EntryKey) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._remove(key)
            return True

    def stats(self) -> StoreStats:
        with self._lock:
            counts = [0] * len(self.tiers)
            for stored in self._entries.values():
                counts[stored.stats.tier] += 1
            tiers = []
            for i, spec in enumerate(self.tiers):
                try:
                    used = spec.tier.used_bytes() if self._healthy(i) else 0
                except TierUnavailable as e:
                    self._mark_down(i, e)
                    used = 0
                tiers.append(TierStatus(spec.tier.name, counts[i], used, spec.tier.capacity_bytes,
                                        self._healthy(i), self._tier_hits[i], self._tier_errors[i]))
            return StoreStats(tiers, len(self._entries), sum(self._tier_hits), self.misses, self.evictions,
                              self.demotions, self.promotions, self.checksum_failures, self.puts, self.rejected_puts)

    def close(self) -> None:
        for spec in self.tiers:
            spec.tier.close()

    # ---------------------------------------------------------------- placement

    def _new_stats(self, header: EntryHeader, size: int) -> EntryStats:
        return EntryStats(key=header.key, nbytes=size, importance=header.importance,
                          seq_len=header.identity.seq_len, num_layers=header.num_layers, last_access=self.clock())

    def _place(self, header: EntryHeader, frames: list, stats: EntryStats, start: int, stop: int,
               shrink: bool) -> int | None:
        """Put the entry in the first tier of [start, stop) that takes it; its index, or None.

        ``shrink`` applies each tier's ShrinkRule on the way (new puts and demotions, not
        promotions). Must hold the lock.
        """
        key = header.key
        for i in range(start, stop):
            spec = self.tiers[i]
            if not self._healthy(i):
                continue
            if shrink and i > 0 and not spec.shrink.is_noop:
                header, frames = _shrunk(frames, spec.shrink)
                stats.nbytes, stats.importance = frames_nbytes(frames), header.importance
            if stats.nbytes > spec.tier.capacity_bytes:
                continue
            try:
                # the last healthy tier admits whatever fits; a faster one only what is worth more
                last = stop == len(self.tiers) and not any(self._healthy(j) for j in range(i + 1, stop))
                victims = self._make_room(i, stats, last)
                if victims is None:
                    continue
                spec.tier.put(key, frames)
            except TierUnavailable as e:
                self._mark_down(i, e)
                continue
            stats.tier = i
            self._entries[key] = _Stored(stats, header)
            return i
        return None

    def _make_room(self, i: int, incoming: EntryStats, last: bool) -> list[EntryStats] | None:
        """Demote the least valuable entries of tier ``i`` until ``incoming`` fits.

        Returns the victims, or None when the tier cannot or should not take ``incoming``: not
        enough bytes to free, or (above the last tier) the victims are worth more than it.
        """
        tier = self.tiers[i].tier
        need = tier.used_bytes() + incoming.nbytes - tier.capacity_bytes
        if need <= 0:
            return []
        now = self.clock()
        residents = [s.stats for s in self._entries.values() if s.stats.tier == i and s.stats.key != incoming.key]
        victims = None
        if last:  # victims leave the store: spare the newest entries still waiting for their first read
            protected = self._protected(residents, tier.capacity_bytes // 2, now)
            victims = self.policy.choose_victims([s for s in residents if s.key not in protected], need, now)
        if victims is None:
            victims = self.policy.choose_victims(residents, need, now)
        if victims is None:
            return None
        if not last and victims and self.policy.value(incoming, now) < max(self.policy.value(v, now) for v in victims):
            return None
        for victim in victims:
            self._demote(victim, i)
        if tier.used_bytes() + incoming.nbytes > tier.capacity_bytes:
            return None  # the tier's own accounting disagrees (e.g. a shared Redis filled up)
        return victims

    def _protected(self, residents: list[EntryStats], budget: int, now: float) -> set[EntryKey]:
        """Keys of the newest unread entries put less than ``protect_unread_s`` ago, up to ``budget`` bytes."""
        unread = sorted((s for s in residents if not s.hits and now - s.last_access < self.protect_unread_s),
                        key=lambda s: s.last_access, reverse=True)
        keys, total = set(), 0
        for s in unread:
            total += s.nbytes
            if total > budget:
                break
            keys.add(s.key)
        return keys

    def _demote(self, victim: EntryStats, i: int) -> None:
        """Move ``victim`` from tier ``i`` to a slower tier, or drop it from the last."""
        stored = self._entries[victim.key]
        tier = self.tiers[i].tier
        placed = None
        if i + 1 < len(self.tiers):
            try:
                frames = tier.get(victim.key)
            except TierUnavailable as e:
                self._mark_down(i, e)
                frames = None
            if frames is not None:
                placed = self._place(stored.header, list(frames), victim, i + 1, len(self.tiers), True)
        try:
            tier.remove(victim.key)
        except TierUnavailable as e:
            self._mark_down(i, e)
        if placed is None:
            self._entries.pop(victim.key, None)
            self.evictions += 1
            log.debug("evicted %s from tier %s", victim.key, tier.name)
        else:
            self.demotions += 1
            log.debug("demoted %s from tier %s to %s", victim.key, tier.name, self.tiers[placed].tier.name)

    def _promote(self, stored: _Stored, frames: list) -> None:
        src = stored.stats.tier
        stats = EntryStats(**{**stored.stats.__dict__})
        placed = self._place(stored.header, frames, stats, 0, src, False)
        if placed is None:
            return
        try:
            self.tiers[src].tier.remove(stats.key)
        except TierUnavailable as e:
            self._mark_down(src, e)
        self.promotions += 1
        log.debug("promoted %s from tier %s to %s", stats.key, self.tiers[src].tier.name, self.tiers[placed].tier.name)

    def _remove(self, key: EntryKey) -> None:
        self._decoded.pop(key, None)
        stored = self._entries.pop(key)
        try:
            self.tiers[stored.stats.tier].tier.remove(key)
        except TierUnavailable as e:
            self._mark_down(stored.stats.tier, e)

    def _raise_unplaceable(self, size: int) -> None:
        if all(size > spec.tier.capacity_bytes for spec in self.tiers):
            largest = max(spec.tier.capacity_bytes for spec in self.tiers)
            raise EntryTooLarge(f"entry of {size} bytes is larger than every tier (largest: {largest} bytes): "
                                "compress it more or give a tier more capacity")
        raise TierUnavailable("no tier could take the entry: the tiers large enough for it are failing or full "
                              "of entries being written; retry later")

    # ---------------------------------------------------------------- health and recovery

    def _healthy(self, i: int) -> bool:
        return self.clock() >= self._down_until[i]

    def _mark_down(self, i: int, error: Exception) -> None:
        self._down_until[i] = self.clock() + self.retry_after_s
        self._tier_errors[i] += 1
        log.warning("tier %s failed; skipping it for %.1fs: %s", self.tiers[i].tier.name, self.retry_after_s, error)

    def _recover(self) -> None:
        """Index entries that outlived a restart (Redis); unreadable ones are removed."""
        for i, spec in enumerate(self.tiers):
            try:
                keys = spec.tier.keys()
                for key in keys:
                    frame = spec.tier.header_frame(key)
                    try:
                        header = codec.parse_header(frame) if frame is not None else None
                    except (CorruptEntry, ValueError) as e:
                        log.warning("dropping unreadable entry %s in tier %s: %s", key, spec.tier.name, e)
                        header = None
                    if header is None or header.key != key:
                        spec.tier.remove(key)
                        continue
                    size = len(frame) + header.data_bytes + codec.FRAME_HEAD_BYTES * (header.total_frames - 1)
                    stats = self._new_stats(header, size)
                    stats.tier = i
                    self._entries.setdefault(key, _Stored(stats, header))
            except TierUnavailable as e:
                self._mark_down(i, e)
                continue
            recovered = sum(1 for s in self._entries.values() if s.stats.tier == i)
            if recovered:
                log.info("tier %s: %d entries recovered", spec.tier.name, recovered)


def _shrunk(frames: list, rule: ShrinkRule) -> tuple[EntryHeader, list]:
    shrunk = codec.encode(rule.apply(codec.decode(frames)))
    header = codec.parse_header(shrunk[0])
    return header, shrunk
