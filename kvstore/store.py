"""The tiered store: placement, promotion, demotion with graded shrinking, quotas, lookup, stats.

Tiers are ordered fastest first (device, host, Redis). A new entry goes to the fastest tier that
has room, or can make room by demoting entries the policy values less than the new one; demoted
entries move one tier down (shrunk by that tier's ``ShrinkRule``) and may push others down in
turn; the last tier drops its victims. A hit in a slower tier promotes the entry up. Every read
re-checks every frame, and a failed check deletes the entry and reports ``CorruptEntry``: the
store may lose entries, it never returns wrong bytes. A tier that fails (Redis down, full) is
skipped for ``retry_after_s`` and the store keeps serving from the others; a failure of some of a
tier's keys only (a Redis Cluster master, until its replica takes over) fails those calls alone.

Locking. One lock guards the index and the byte accounting; the store never holds it across the
I/O of a ``remote`` tier (Redis), so a Redis that hangs slows only the calls that need Redis,
never a read from host memory. Decisions are taken under the lock (which entries move where, who
is evicted), each tier's bytes counted there at once, and in-process tiers written there too;
the Redis writes and removals those decisions imply run after the lock is released. An entry on
its way into Redis is indexed at once and read from the frames in hand until its write lands; if
the write fails, it is dropped (an eviction). ``audit`` reconciles the index with what each tier
really holds (Redis may evict entries behind the store's back).

The shared last tier. Store shards may share their last tier (Redis, ``StorageTier.shared``):
each counts its own entries there, but a key this store has no index entry for is looked for there
before it is a miss (``get``, ``probe``, ``lookup``, ``delete``), and found entries are adopted:
indexed here, counted as this store's. When a shard is lost, the shard its keys move to reads the
entries the lost one had demoted instead of having them recomputed.

Quotas. A ``TierSpec`` may cap the bytes one tenant holds in its tier. A tenant over its quota
in a tier makes room there from its own entries (demoting them, by the same value rule as for
everyone; the last tier drops them), never from those still waiting for their first read: its
new entry goes to a slower tier instead, and a tenant writing faster than it reads gets
``OverQuota`` (RESOURCE_EXHAUSTED) rather than push out what it wrote a moment ago. The eviction value of an entry is computed
from what the store can check: kept tokens of its own tensor table, and a cap on the recompute
cost any header may claim per stored byte (``MAX_CLAIMED_COMPRESSION``), so no header can buy a
place in the fast tiers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dkv.kvstore import codec
from dkv.kvstore.codec import EntryHeader
from dkv.kvstore.entry import CompressedKV, EntryKey, Recipe
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, EntryTooLarge, OverQuota, TierUnavailable
from dkv.kvstore.policy import EntryStats, EvictionPolicy, ValuePolicy
from dkv.kvstore.prefix import longest_cached_prefix
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.tier import Frames, StorageTier, frames_nbytes

log = logging.getLogger("dkv.store")
DECODED_ENTRIES = 8
# The most recompute cost an entry may claim per stored byte, as the compression it claims: the
# fp16 K and V of the tokens and layers it says it covers (4 bytes per KV dim) over its bytes. An
# int4 entry keeping 1/16 of its tokens is 64x; past that a header's seq_len buys no more value, so
# one claiming 65536 tokens in a few KB ranks with honest, well-compressed entries, not 10^5 above.
MAX_CLAIMED_COMPRESSION = 64
DEFAULT_TENANT = "default"  # whom a Put is counted against before its header could be read


@dataclass
class TierSpec:
    """A tier, what happens to entries that enter it from a faster tier, and how much of it one
    tenant may hold (``tenant_quota`` bytes; 0 = no quota)."""

    tier: StorageTier
    shrink: ShrinkRule = field(default_factory=ShrinkRule)
    tenant_quota: int = 0

    def __post_init__(self) -> None:
        if self.tenant_quota < 0:
            raise ValueError(f"tier {self.tier.name}: tenant_quota {self.tenant_quota} must be >= 0 (0 = none)")


@dataclass(eq=False)
class _Stored:
    """One indexed entry (compared by identity: a moved or replaced entry is a new object)."""

    stats: EntryStats
    header: EntryHeader
    seq: int = 0  # when it was indexed (the store's counter): an audit leaves newer entries alone


@dataclass
class _Batch:
    """Remote-tier I/O decided under the lock, run after it is released, in order."""

    ops: list[tuple] = field(default_factory=list)  # ("put", i, stored, frames) or ("remove", i, key)
    new: _Stored | None = None  # the entry a Put places (its failed write is the Put's, not an eviction)
    failed: list[_Stored] = field(default_factory=list)  # the entries whose remote write failed


@dataclass
class Counters:
    """What happened to one tenant's entries (the store's totals are their sums)."""

    hits: list[int]  # per tier
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    checksum_failures: int = 0
    puts: int = 0
    rejected_puts: int = 0
    over_quota: int = 0
    lost: int = 0  # gone from a tier behind the store's back (Redis eviction, a flush)

    NAMES = (
        "misses",
        "evictions",
        "demotions",
        "promotions",
        "checksum_failures",
        "puts",
        "rejected_puts",
        "over_quota",
        "lost",
    )


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
    quota_bytes: int  # what one tenant may hold here; 0 = no quota


@dataclass
class StoreStats:
    """The store's numbers, or (``tenant`` set) one tenant's: its entries, bytes, hits, puts."""

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
    over_quota: int
    lost: int
    tenant: str | None = None
    tenants: list[StoreStats] = field(default_factory=list)  # each tenant's, in the store-wide view


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
        remote = [spec.tier.remote for spec in tiers]
        if remote != sorted(remote):
            raise ValueError(
                f"remote tiers must come after every in-process tier, got {names}: entries are "
                "demoted out of a tier without reading it over the network under the store's lock"
            )
        if any(spec.tier.shared for spec in tiers[:-1]):
            raise ValueError(
                f"only the last tier may be shared with other stores, got {names}: a key missing "
                "from the index is looked for in the last tier"
            )
        self.tiers = list(tiers)
        self.policy = policy or ValuePolicy()
        self.max_entry_bytes = max_entry_bytes
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.protect_unread_s = protect_unread_s
        self._entries: dict[EntryKey, _Stored] = {}
        # entries being written to a remote tier, readable from the frames in hand until it lands
        self._moving: dict[EntryKey, tuple[_Stored, list]] = {}
        # keys being looked for in the shared last tier: counted there, about to be indexed here
        self._adopting: set[EntryKey] = set()
        # decoded entries (zero-copy views of verified frames) for Summaries/Select, which read
        # one layer per decode step: a few, most recently used last
        self._decoded: OrderedDict[EntryKey, tuple[bytes, CompressedKV]] = OrderedDict()
        self._lock = threading.RLock()
        self._batch: _Batch | None = None
        self._seq = 0
        n = len(self.tiers)
        self._used = [0] * n
        self._tenant_used: list[Counter[str]] = [Counter() for _ in range(n)]
        self._tenant_entries: list[Counter[str]] = [Counter() for _ in range(n)]
        self._counters: defaultdict[str, Counters] = defaultdict(lambda: Counters(hits=[0] * n))
        self._down_until = [0.0] * n
        self._partial_logged = [float("-inf")] * n
        self._tier_errors = [0] * n
        self.audit(adopt=True)

    # ---------------------------------------------------------------- public API

    def put(self, frames: Frames, header: EntryHeader | None = None) -> PutResult:
        """Verify and store an entry given as codec frames; the key comes from its header.

        Raises ``InvalidEntry`` / ``CorruptEntry`` for bad input, ``EntryTooLarge`` if it fits
        no tier, ``OverQuota`` if it fits none within its tenant's quota, ``TierUnavailable`` if
        every tier that could hold it is failing. Nothing is stored unless every check passed.
        """
        tenant = header.identity.tenant if header is not None else DEFAULT_TENANT
        try:
            if header is None:
                header, frames = codec.check_frames(frames, self.max_entry_bytes)
                tenant = header.identity.tenant
            size = frames_nbytes(frames)
            self.check_admissible(header, size)
            codec.decode_checked(header, frames)  # every shape, dtype and value; raises InvalidEntry
            key = header.key
            stored = _Stored(self._new_stats(header, size), header)
            with self._critical() as batch:
                replaced = key in self._entries
                if replaced:
                    self._remove(key)
                placed = self._place(stored, list(frames), 0, len(self.tiers), True)
                if placed is None:
                    raise self._unplaceable(stored.stats)
                stored = batch.new = self._entries[key]
            if stored in batch.failed:
                raise TierUnavailable(
                    f"no tier could take the entry: tier {self.tiers[placed].tier.name} failed while "
                    "it was written there and no faster tier had room; retry later"
                )
        except Exception as e:
            self.count_rejected(tenant, e)
            raise
        self._count(tenant, "puts")
        log.info(
            "put %s: %d bytes in tier %s%s",
            key,
            stored.stats.nbytes,
            self.tiers[placed].tier.name,
            " (replaced)" if replaced else "",
        )
        return PutResult(key, self.tiers[placed].tier.name, stored.stats.nbytes, replaced)

    def check_admissible(self, header: EntryHeader, size: int) -> None:
        """Raise ``EntryTooLarge`` or ``OverQuota`` when an entry of ``size`` bytes could never be
        stored, whatever is evicted: cheap enough to ask before its data arrives."""
        if size > self.max_entry_bytes:
            raise EntryTooLarge(
                f"entry of {size} bytes is over the limit of {self.max_entry_bytes} bytes "
                "(max_entry_bytes): compress it more (higher ratio, quantization) or raise the limit"
            )
        if all(size > spec.tier.capacity_bytes for spec in self.tiers):
            largest = max(spec.tier.capacity_bytes for spec in self.tiers)
            raise EntryTooLarge(
                f"entry of {size} bytes is larger than every tier (largest: {largest} bytes): "
                "compress it more or give a tier more capacity"
            )
        if all(
            size > min(spec.tier.capacity_bytes, spec.tenant_quota or spec.tier.capacity_bytes) for spec in self.tiers
        ):
            raise OverQuota(
                f"entry of {size} bytes is larger than tenant {header.identity.tenant!r}'s quota in "
                f"every tier ({self._quotas()}): compress it more or ask for a larger quota"
            )

    def count_rejected(self, tenant: str, error: Exception) -> None:
        """Count a Put of ``tenant`` refused with ``error`` (here, or before it reached ``put``)."""
        self._count(tenant, "rejected_puts")
        if isinstance(error, OverQuota):
            self._count(tenant, "over_quota")

    def get(self, key: EntryKey) -> GetResult:
        """The verified frames of ``key``; promotes it on a hit in a slower tier.

        Raises ``EntryNotFound`` on a miss and ``CorruptEntry`` (after deleting the entry) when a
        stored frame fails its check.
        """
        with self._lock:
            stored = self._entries.get(key)
            moving = self._moving.get(key)
        if stored is None:
            stored = self._adopt_shared([key]).get(key)
        if stored is None or not self._healthy(stored.stats.tier):
            self._count(key.tenant, "misses")
            raise EntryNotFound(f"no entry {key}")
        tier_index = stored.stats.tier
        tier = self.tiers[tier_index].tier
        try:
            frames: Sequence[bytes | memoryview] | None
            if moving is not None and moving[0] is stored:
                frames = moving[1]  # on its way into this tier: the frames in hand
            else:
                frames = tier.get(key)
            if frames is not None:
                header, frames = codec.check_frames(frames)
                if header.key != key:
                    raise CorruptEntry(f"tier {tier.name} returned the frames of {header.key} for {key}")
        except TierUnavailable as e:  # a miss for now; the entry is likely still there once the tier is back
            self._mark_down(tier_index, e)
            self._count(key.tenant, "misses")
            raise EntryNotFound(f"no entry {key} for now: tier {tier.name} is failing") from e
        except (CorruptEntry, ValueError) as e:
            self._count(key.tenant, "checksum_failures")
            log.warning("entry %s failed its check in tier %s and was deleted: %s", key, tier.name, e)
            with self._critical():
                if self._entries.get(key) is stored:
                    self._remove(key)
            raise CorruptEntry(
                f"entry {key} was corrupted in tier {tier.name} and has been deleted; recompute it ({e})"
            ) from e
        if frames is None:
            with self._critical():
                if self._entries.get(key) is stored:
                    self._unindex(stored)
                    self._count(key.tenant, "lost")
            self._count(key.tenant, "misses")
            raise EntryNotFound(f"no entry {key} (lost from tier {tier.name})")
        with self._critical():
            self._counters[key.tenant].hits[tier_index] += 1
            stored.stats.hits += 1
            stored.stats.last_access = self.clock()
            if tier_index > 0 and self._entries.get(key) is stored and key not in self._moving:
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

    def lookup(
        self, tenant: str, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int] | np.ndarray
    ) -> LookupResult | None:
        """The longest cached prefix of ``token_ids`` for this tenant, model and recipe, or None."""
        found = longest_cached_prefix(
            token_ids,
            recipe,
            model_fingerprint,
            tenant,
            lambda keys: [None if p is None else p[0].identity.start for p in self.probe(keys)],
        )
        if found is None:
            return None
        keys, tokens = found
        maybe = [self._entries.get(k) for k in keys]
        stored = [s for s in maybe if s is not None]
        if len(stored) < len(maybe):  # evicted meanwhile
            return None
        return LookupResult(
            keys,
            tokens,
            [self.tiers[s.stats.tier].tier.name for s in stored],
            [s.header for s in stored],
            [s.stats.nbytes for s in stored],
        )

    def probe(self, keys: Sequence[EntryKey]) -> list[tuple[EntryHeader, str, int] | None]:
        """For each of ``keys``: (header, tier, stored bytes) when a healthy tier holds it, else None.
        Keys not indexed here are looked for in the shared last tier, all in one batch."""
        with self._lock:
            missing = [key for key in keys if key not in self._entries]
        if missing:
            self._adopt_shared(missing)
        found: list[tuple[EntryHeader, str, int] | None] = []
        for key in keys:
            stored = self._entries.get(key)
            if stored is None or not self._healthy(stored.stats.tier):
                found.append(None)
            else:
                found.append((stored.header, self.tiers[stored.stats.tier].tier.name, stored.stats.nbytes))
        return found

    def contains(self, key: EntryKey) -> bool:
        return self.probe([key])[0] is not None

    def header(self, key: EntryKey) -> EntryHeader:
        stored = self._entries.get(key)
        if stored is None:
            raise EntryNotFound(f"no entry {key}")
        return stored.header

    def tier_of(self, key: EntryKey) -> str | None:
        stored = self._entries.get(key)
        return self.tiers[stored.stats.tier].tier.name if stored else None

    def delete(self, key: EntryKey) -> bool:
        """Delete ``key`` from this store, or (not indexed here) from the shared last tier."""
        with self._critical():
            if key in self._entries:
                self._remove(key)
                return True
        last = len(self.tiers) - 1
        tier = self.tiers[last].tier
        if not tier.shared or not self._healthy(last):
            return False
        try:
            return tier.remove(key)
        except TierUnavailable as e:
            self._mark_down(last, e)
            return False

    def stats(self, tenant: str | None = None) -> StoreStats:
        """Every tier's state and the counters: the store's (``tenant`` None, with each tenant's in
        ``tenants``), or one tenant's own entries, bytes and counters."""
        with self._lock:
            if tenant is not None:
                return self._stats_of([tenant], tenant)
            tenants = sorted(set(self._counters) | {t for c in self._tenant_entries for t in c})
            view = self._stats_of(tenants, None)
            view.tenants = [self._stats_of([t], t) for t in tenants]
            return view

    def _stats_of(self, tenants: list[str], scope: str | None) -> StoreStats:
        counters = [self._counters[t] for t in tenants if t in self._counters]
        tiers = []
        for i, spec in enumerate(self.tiers):
            entries = sum(self._tenant_entries[i][t] for t in tenants)
            used = sum(self._tenant_used[i][t] for t in tenants)
            tiers.append(
                TierStatus(
                    spec.tier.name,
                    entries,
                    used,
                    spec.tier.capacity_bytes,
                    self._healthy(i),
                    sum(c.hits[i] for c in counters),
                    self._tier_errors[i],
                    spec.tenant_quota,
                )
            )
        totals = {name: sum(getattr(c, name) for c in counters) for name in Counters.NAMES}
        return StoreStats(tiers, sum(t.entries for t in tiers), sum(t.hits for t in tiers), tenant=scope, **totals)

    def audit(self, adopt: bool = False) -> dict[str, int]:
        """Reconcile the index with what each tier really holds; returns what changed.

        Each tier first repairs its own bookkeeping (``StorageTier.audit``). Entries the index
        places in a tier that no longer holds them are dropped (``lost``). Entries a tier holds
        that the index does not know are ``adopt``-ed (at start: what outlived a restart) or
        removed (later: what a removal that failed while the tier was down left behind).
        """
        changes = {"lost": 0, "adopted": 0, "removed": 0}
        for i, spec in enumerate(self.tiers):
            with self._lock:
                since, moving = self._seq, set(self._moving)
            try:
                held = set(spec.tier.audit())
                if spec.tier.shared:  # the tier no longer counts these as this store's (Redis evicted its
                    # bookkeeping): those still there are counted again, the others are lost
                    with self._lock:
                        uncounted = [
                            key
                            for key, stored in self._entries.items()
                            if stored.stats.tier == i and key not in held and key not in self._moving
                        ]
                    if uncounted:
                        held |= set(spec.tier.adopt(uncounted))
            except TierUnavailable as e:
                self._mark_down(i, e)
                continue
            with self._critical():
                for key, stored in list(self._entries.items()):
                    if (
                        stored.stats.tier == i
                        and key not in held
                        and stored.seq <= since
                        and key not in moving
                        and key not in self._moving
                    ):
                        self._unindex(stored)
                        self._count(key.tenant, "lost")
                        changes["lost"] += 1
                # held here, but indexed nowhere or in another tier (a removal that failed left it)
                unknown = [
                    key
                    for key in held
                    if (key not in self._entries or self._entries[key].stats.tier != i) and key not in self._adopting
                ]
                if not adopt:
                    for key in unknown:
                        self._drop_from(i, key)
            if adopt:
                changes["adopted"] += self._adopt(i, unknown)
            elif unknown:
                changes["removed"] += len(unknown)
                log.info("tier %s: removed %d entries the index no longer names", spec.tier.name, len(unknown))
        if changes["lost"]:
            log.warning(
                "audit: %d entries were gone from their tier (evicted or flushed behind the store's back)",
                changes["lost"],
            )
        return changes

    def close(self) -> None:
        for spec in self.tiers:
            spec.tier.close()

    # ---------------------------------------------------------------- locking and remote I/O

    @contextlib.contextmanager
    def _critical(self):
        """The lock, then (released) the remote-tier I/O decided under it. Not re-entrant."""
        batch = _Batch()
        try:
            with self._lock:
                self._batch = batch
                try:
                    yield batch
                finally:
                    self._batch = None
        finally:
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        for op, i, *args in batch.ops:
            tier = self.tiers[i].tier
            if op == "remove":
                if not self._healthy(i):
                    continue  # left behind, like a removal that fails: the next audit removes it
                try:
                    tier.remove(args[0])
                except TierUnavailable as e:
                    self._mark_down(i, e)
                continue
            placed: _Stored = args[0]
            frames = args[1]
            key = placed.stats.key
            try:
                if not self._healthy(i):
                    raise TierUnavailable(f"tier {tier.name} is being skipped after a failure")
                tier.put(key, frames)
            except TierUnavailable as e:
                if self._healthy(i):
                    self._mark_down(i, e)
                batch.failed.append(placed)
                with self._lock:
                    self._done_moving(key, placed)
                    if self._entries.get(key) is placed:
                        self._unindex(placed)
                        if placed is not batch.new:  # a demotion that could not land
                            self._count(key.tenant, "evictions")
                continue
            with self._lock:
                self._done_moving(key, placed)
                current = self._entries.get(key)
                # removed or replaced while it was written: take it back out, unless a newer write
                # of the same key went to this tier (and replaced it there)
                stale = current is not placed and (current is None or current.stats.tier != i)
            if stale:
                try:
                    tier.remove(key)
                except TierUnavailable as e:
                    self._mark_down(i, e)

    def _queue(self, op: tuple) -> None:
        """Queue a remote tier's put or remove to run after the lock is released (``_run``)."""
        assert self._batch is not None, "remote tier operations are decided inside a batch"
        self._batch.ops.append(op)

    def _done_moving(self, key: EntryKey, stored: _Stored) -> None:
        if key in self._moving and self._moving[key][0] is stored:
            del self._moving[key]

    def _drop_from(self, i: int, key: EntryKey) -> None:
        """Remove ``key`` from tier ``i``: now for an in-process tier, after the lock for a remote one."""
        tier = self.tiers[i].tier
        if tier.remote:
            self._queue(("remove", i, key))
            return
        try:
            tier.remove(key)
        except TierUnavailable as e:
            self._mark_down(i, e)

    # ---------------------------------------------------------------- index and accounting

    def _index(self, stored: _Stored) -> None:
        key, i, n = stored.stats.key, stored.stats.tier, stored.stats.nbytes
        self._seq += 1
        stored.seq = self._seq
        self._entries[key] = stored
        self._used[i] += n
        self._tenant_used[i][key.tenant] += n
        self._tenant_entries[i][key.tenant] += 1

    def _unindex(self, stored: _Stored) -> None:
        key, i, n = stored.stats.key, stored.stats.tier, stored.stats.nbytes
        if self._entries.get(key) is not stored:
            return
        del self._entries[key]
        self._decoded.pop(key, None)
        self._used[i] -= n
        self._tenant_used[i][key.tenant] -= n
        self._tenant_entries[i][key.tenant] -= 1
        if not self._tenant_entries[i][key.tenant]:
            del self._tenant_used[i][key.tenant], self._tenant_entries[i][key.tenant]

    def _count(self, tenant: str, name: str, n: int = 1) -> None:
        with self._lock:
            counters = self._counters[tenant]
            setattr(counters, name, getattr(counters, name) + n)

    def _quotas(self) -> str:
        return ", ".join(f"{s.tier.name} {s.tenant_quota or 'none'}" for s in self.tiers)

    # ---------------------------------------------------------------- placement

    def _new_stats(self, header: EntryHeader, size: int) -> EntryStats:
        """What the policy ranks the entry by, from what the store can check: the layers that hold
        rows in its tensor table, and tokens capped by ``MAX_CLAIMED_COMPRESSION``."""
        layers = max(1, sum(1 for rows in header.kept_tokens_per_layer() if rows))
        width = header.num_kv_heads * header.head_dim
        tokens = min(header.identity.seq_len, max(1, MAX_CLAIMED_COMPRESSION * size // (4 * layers * width)))
        importance = header.importance if 0.0 <= header.importance <= 1.0 else 0.0  # (NaN too)
        return EntryStats(
            key=header.key,
            nbytes=size,
            importance=importance,
            seq_len=tokens,
            num_layers=layers,
            kv_width=width,
            last_access=self.clock(),
        )

    def _place(self, stored: _Stored, frames: list, start: int, stop: int, shrink: bool) -> int | None:
        """Index the entry in the first tier of [start, stop) that takes it; its index, or None.

        ``shrink`` applies each tier's ShrinkRule on the way (new puts and demotions, not
        promotions). Must hold the lock.
        """
        key, header, stats = stored.stats.key, stored.header, stored.stats
        for i in range(start, stop):
            spec = self.tiers[i]
            if not self._healthy(i):
                continue
            if shrink and i > 0 and not spec.shrink.is_noop:
                header, frames = _shrunk(frames, spec.shrink)
                stats = dataclasses.replace(stats, nbytes=frames_nbytes(frames), importance=header.importance)
            if stats.nbytes > spec.tier.capacity_bytes:
                continue
            # the last healthy tier admits whatever fits; a faster one only what is worth more
            last = stop == len(self.tiers) and not any(self._healthy(j) for j in range(i + 1, stop))
            if self._make_room(i, stats, last) is None:
                continue
            placed = _Stored(dataclasses.replace(stats, tier=i), header)
            if spec.tier.remote:
                self._moving[key] = (placed, frames)
                self._queue(("put", i, placed, frames))
            else:
                try:
                    spec.tier.put(key, frames)
                except TierUnavailable as e:
                    self._mark_down(i, e)
                    continue
            self._index(placed)
            return i
        return None

    def _make_room(self, i: int, incoming: EntryStats, last: bool) -> list[EntryStats] | None:
        """Demote the least valuable entries of tier ``i`` until ``incoming`` fits, its tenant's
        quota included.

        Returns the victims, or None when the tier cannot or should not take ``incoming``: not
        enough bytes to free, or (above the last tier) the victims are worth more than it.
        """
        spec, tenant = self.tiers[i], incoming.key.tenant
        now = self.clock()
        residents = [
            s.stats
            for s in self._entries.values()
            if s.stats.tier == i and s.stats.key != incoming.key and s.stats.key not in self._moving
        ]
        victims: list[EntryStats] = []
        over = self._tenant_used[i][tenant] + incoming.nbytes - spec.tenant_quota if spec.tenant_quota else 0
        if over > 0:  # room from the tenant's own entries, except those still waiting for their first read
            own = [s for s in residents if s.key.tenant == tenant]
            unread = self._protected(own, spec.tenant_quota, now)
            own_victims = self.policy.choose_victims([s for s in own if s.key not in unread], over, now)
            if own_victims is None:
                return None
            victims = own_victims
        need = self._used[i] - sum(v.nbytes for v in victims) + incoming.nbytes - spec.tier.capacity_bytes
        if need > 0:
            chosen = {v.key for v in victims}
            others = [s for s in residents if s.key not in chosen]
            more = None
            if last:  # victims leave the store: spare the newest entries still waiting for their first read
                protected = self._protected(others, spec.tier.capacity_bytes // 2, now)
                more = self.policy.choose_victims([s for s in others if s.key not in protected], need, now)
            if more is None:
                more = self.policy.choose_victims(others, need, now)
            if more is None:
                return None
            victims += more
        if not last and victims and self.policy.value(incoming, now) < max(self.policy.value(v, now) for v in victims):
            return None
        for victim in victims:
            self._demote(victim, i)
        return victims

    def _protected(self, residents: list[EntryStats], budget: int, now: float) -> set[EntryKey]:
        """Keys of the newest unread entries put less than ``protect_unread_s`` ago, up to ``budget`` bytes."""
        unread = sorted(
            (s for s in residents if not s.hits and now - s.last_access < self.protect_unread_s),
            key=lambda s: s.last_access,
            reverse=True,
        )
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
        self._unindex(stored)
        tier = self.tiers[i].tier
        placed = None
        if i + 1 < len(self.tiers) and not tier.remote:
            try:
                frames = tier.get(victim.key)
            except TierUnavailable as e:
                self._mark_down(i, e)
                frames = None
            if frames is not None:
                placed = self._place(stored, list(frames), i + 1, len(self.tiers), True)
        self._drop_from(i, victim.key)
        if placed is None:
            self._count(victim.key.tenant, "evictions")
            log.debug("evicted %s from tier %s", victim.key, tier.name)
        else:
            self._count(victim.key.tenant, "demotions")
            log.debug("demoted %s from tier %s to %s", victim.key, tier.name, self.tiers[placed].tier.name)

    def _promote(self, stored: _Stored, frames: list) -> None:
        src = stored.stats.tier
        self._unindex(stored)
        placed = self._place(stored, frames, 0, src, False)
        if placed is None:
            self._index(stored)
            return
        self._drop_from(src, stored.stats.key)
        self._count(stored.stats.key.tenant, "promotions")
        log.debug(
            "promoted %s from tier %s to %s", stored.stats.key, self.tiers[src].tier.name, self.tiers[placed].tier.name
        )

    def _remove(self, key: EntryKey) -> None:
        stored = self._entries[key]
        self._unindex(stored)
        self._moving.pop(key, None)  # a write still under way takes itself back out when it lands
        self._drop_from(stored.stats.tier, key)

    def _unplaceable(self, stats: EntryStats) -> Exception:
        """Why no tier took an entry that passed ``check_admissible``."""
        tenant = stats.key.tenant
        usable = [
            (i, s) for i, s in enumerate(self.tiers) if self._healthy(i) and stats.nbytes <= s.tier.capacity_bytes
        ]
        if usable and all(
            s.tenant_quota and self._tenant_used[i][tenant] + stats.nbytes > s.tenant_quota for i, s in usable
        ):
            held = ", ".join(f"{s.tier.name} {self._tenant_used[i][tenant]} of {s.tenant_quota}" for i, s in usable)
            return OverQuota(
                f"tenant {tenant!r} is at its quota (bytes held: {held}) and its entries that could make "
                f"room are still waiting for their first read: read or delete them, or retry in "
                f"{self.protect_unread_s:.0f} s"
            )
        return TierUnavailable(
            "no tier could take the entry: the tiers large enough for it are failing or full "
            "of entries being written; retry later"
        )

    # ---------------------------------------------------------------- health and recovery

    def _healthy(self, i: int) -> bool:
        return self.clock() >= self._down_until[i]

    def _mark_down(self, i: int, error: Exception) -> None:
        self._tier_errors[i] += 1
        now = self.clock()
        if isinstance(error, TierUnavailable) and error.partial:  # one node of a cluster: the rest still serve
            if now >= self._partial_logged[i] + self.retry_after_s:  # at most one line per retry_after_s
                self._partial_logged[i] = now
                log.warning(
                    "tier %s failed for some of its keys; still using it for the others: %s",
                    self.tiers[i].tier.name,
                    error,
                )
            return
        self._down_until[i] = now + self.retry_after_s
        log.warning("tier %s failed; skipping it for %.1fs: %s", self.tiers[i].tier.name, self.retry_after_s, error)

    def _adopt(self, i: int, keys: list[EntryKey]) -> int:
        """Index entries of tier ``i`` that outlived a restart, from their headers; unreadable ones
        are removed. (Their MAC, when the tier keeps one, is checked on their first read.)"""
        tier = self.tiers[i].tier
        adopted = 0
        try:
            for key in keys:
                frame = tier.header_frame(key)
                try:
                    header = codec.parse_header(frame) if frame is not None else None
                except (CorruptEntry, ValueError) as e:
                    log.warning("dropping unreadable entry %s in tier %s: %s", key, tier.name, e)
                    header = None
                if header is None or frame is None or header.key != key:
                    tier.remove(key)
                    continue
                stored = _Stored(self._new_stats(header, codec.stored_nbytes(header, frame)), header)
                stored.stats.tier = i
                with self._lock:
                    if key not in self._entries:
                        self._index(stored)
                        adopted += 1
        except TierUnavailable as e:
            self._mark_down(i, e)
        if adopted:
            log.info("tier %s: %d entries recovered", tier.name, adopted)
        return adopted

    def _adopt_shared(self, keys: list[EntryKey]) -> dict[EntryKey, _Stored]:
        """The entries of ``keys`` that other stores left in the shared last tier, now indexed here
        in that tier (and counted there as this store's); never under the lock. Their MAC, when the
        tier keeps one, is checked on their first read."""
        i = len(self.tiers) - 1
        tier = self.tiers[i].tier
        if not tier.shared or not self._healthy(i):
            return {}
        with self._lock:
            self._adopting.update(keys)
        adopted = {}
        try:
            try:
                heads = tier.adopt(keys)
            except TierUnavailable as e:
                self._mark_down(i, e)
                heads = {}
            for key, frame in heads.items():
                try:
                    header = codec.parse_header(frame)
                except (CorruptEntry, ValueError) as e:
                    log.warning("dropping unreadable entry %s from shared tier %s: %s", key, tier.name, e)
                    header = None
                if header is None or header.key != key:
                    with self._critical():
                        self._drop_from(i, key)
                    continue
                stored = _Stored(self._new_stats(header, codec.stored_nbytes(header, frame)), header)
                stored.stats.tier = i
                with self._lock:
                    if key not in self._entries:
                        self._index(stored)
                    adopted[key] = self._entries[key]
        finally:
            with self._lock:
                self._adopting.difference_update(keys)
        if adopted:
            log.info("tier %s: %d entries other stores wrote there adopted", tier.name, len(adopted))
        return adopted


def _shrunk(frames: list, rule: ShrinkRule) -> tuple[EntryHeader, list]:
    shrunk = codec.encode(rule.apply(codec.decode(frames)))
    header = codec.parse_header(shrunk[0])
    return header, shrunk
