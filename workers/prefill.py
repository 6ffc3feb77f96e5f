"""The prefill worker: reuse what the store has, prefill and compress the rest, write it back.

``PrefillWorker.prefill`` is what the Prefill gRPC service calls. One model serves one request
at a time (a lock): on CPU two forwards side by side only slow each other down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from dkv.kvstore.entry import CompressedKV, Recipe
from dkv.kvstore.errors import EntryNotFound
from dkv.kvstore.remote import RemoteStore
from dkv.workers.compression import PrefillPlan, compress_plan
from dkv.workers.degradation import Degradation
from dkv.workers.lru import BytesLRU
from dkv.workers.model import model_info

log = logging.getLogger("dkv.prefill")


@dataclass
class PrefillResult:
    keys: list[str]
    model_fingerprint: str
    context_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_bytes: int
    full_bytes: int
    kept_tokens_per_layer: list[int]
    importance: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_stored: bool = True  # False: the store did not take every new entry (``held`` has them)
    not_stored_reason: str = ""


class StoreDown(RuntimeError):
    """The store did not take an entry (unreachable, full, over quota, too large): the message says why."""


class PrefillWorker:
    def __init__(
        self,
        model,
        tokenizer,
        store: RemoteStore,
        max_tokens: int | None = None,
        storage_dtype: str = "auto",
        min_chunk_size: int = 16,
        held_bytes: int = 512 << 20,
        held_ttl_s: float = 120.0,
    ):
        """``storage_dtype``: the dtype entries are stored in (``auto``: float16 for a float32 model,
        else the model's own): halves a float32 model's bytes in the store and on the wire.
        ``min_chunk_size``: the smallest recipe chunk_size accepted (a chunked recipe stores one
        entry per chunk: the client would otherwise choose how many entries a request makes).
        ``held_bytes`` / ``held_ttl_s``: entries the store did not take are held that long (the
        decode worker reads them with ``entries``)."""
        self.model, self.tokenizer, self.store = model, tokenizer, store
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = (
            (torch.float16 if model_dtype == torch.float32 else model_dtype)
            if storage_dtype == "auto"
            else getattr(torch, storage_dtype)
        )
        self.info = model_info(model)
        self.max_tokens = min(max_tokens or self.info.max_positions, self.info.max_positions)
        self.min_chunk_size = min_chunk_size
        self.fingerprint = model.dkv_fingerprint
        self._lock = threading.Lock()
        # entries the store did not take, for the decode worker that asks for them (``entries``)
        self.held: BytesLRU[CompressedKV] = BytesLRU(held_bytes, lambda e: e.nbytes, ttl_s=held_ttl_s)
        self.not_stored: dict[str, int] = {}  # entries the store did not take, by reason (a metric)
        self.degraded = Degradation()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def plan(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> PrefillPlan:
        """The request's ``PrefillPlan``; ``ValueError`` saying what is wrong with it (INVALID_ARGUMENT)."""
        if not token_ids:
            raise ValueError("the context is empty: send text or token_ids")
        if len(token_ids) > self.max_tokens:
            raise ValueError(f"the context has {len(token_ids)} tokens; this worker takes at most {self.max_tokens}")
        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})")
        if recipe.chunk_size < self.min_chunk_size:
            raise ValueError(
                f"recipe chunk_size {recipe.chunk_size} is below this worker's min_chunk_size "
                f"{self.min_chunk_size}: use larger chunks"
            )
        return PrefillPlan.make(recipe, token_ids, self.fingerprint, tenant)

    def prefill(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> PrefillResult:
        """Reuse what the store has, prefill and compress the rest, store it. The store is a cache:
        when it cannot be reached or refuses an entry, the context is prefilled all the same, the
        result says ``cache_stored=False`` and why, and the entries stay in ``held`` for a while."""
        plan = self.plan(token_ids, recipe, tenant)
        t = {"lookup": time.perf_counter()}
        found = self._store_call("lookup", self.store.lookup_keys, plan.keys, recipe.chunk_size, len(token_ids))
        t["fetch"] = time.perf_counter()
        if found is not None and found.cached_tokens == len(token_ids):
            return self._hit(found, token_ids, t)
        stored_prefix = self._fetch(found.keys if found else [], recipe) if recipe.chunked else []
        held = self._held_after(stored_prefix, plan)  # the store did not take them earlier
        cached = stored_prefix + held
        t["prefill"] = time.perf_counter()
        timings: dict[str, float] = {}
        if cached and cached[-1].seq_len == len(token_ids):
            entries = cached  # nothing to compute: this worker still holds the rest
        else:
            with self._lock:
                entries = compress_plan(self.model, plan, cached=cached, timings=timings)
            entries = cached + [e.cast(self.storage_dtype) for e in entries[len(cached) :]]
        t["store"] = time.perf_counter()
        # the new entries, and the held ones again: the store may take them now it is back
        stored, not_stored = self._put(entries[len(stored_prefix) :])
        stored += sum(e.nbytes for e in stored_prefix)
        t["end"] = time.perf_counter()
        cached_tokens = cached[-1].seq_len if cached else 0
        kept = [sum(e.layers[i].num_tokens for e in entries) for i in range(len(entries[0].layers))]
        weights = [e.seq_len - e.identity.start for e in entries]
        importance = sum(w * e.importance for w, e in zip(weights, entries)) / sum(weights)
        result = PrefillResult(
            keys=[str(e.key) for e in entries],
            model_fingerprint=self.fingerprint,
            context_tokens=len(token_ids),
            cached_tokens=cached_tokens,
            prefilled_tokens=len(token_ids) - cached_tokens,
            stored_bytes=stored,
            full_bytes=self._full_bytes(len(token_ids)),
            kept_tokens_per_layer=kept,
            importance=importance,
            cache_stored=not not_stored,
            not_stored_reason=not_stored,
            timings_ms={
                "lookup": (t["fetch"] - t["lookup"]) * 1e3,
                "fetch": (t["prefill"] - t["fetch"]) * 1e3,
                "prefill": timings.get("prefill_s", 0.0) * 1e3,
                "compress": timings.get("compress_s", 0.0) * 1e3,
                "store": (t["end"] - t["store"]) * 1e3,
                "total": (t["end"] - t["lookup"]) * 1e3,
            },
        )
        log.info(
            "prefill %d tokens (%d cached) with %s ratio %.2f: %d entries, %d bytes, %.0f ms",
            len(token_ids),
            cached_tokens,
            recipe.method,
            recipe.ratio,
            len(entries),
            stored,
            result.timings_ms["total"],
        )
        return result

    def entries(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> list[CompressedKV]:
        """The entries of a context, in order: those it holds (the store could not keep them), else
        the store's, else prefilled now. What a decode worker asks for when the store cannot give it
        an entry."""
        for _ in range(2):
            result = self.prefill(token_ids, recipe, tenant)
            got = [self.held.get(key) or self._store_call("get", self.store.get, key) for key in result.keys]
            if all(e is not None for e in got):
                return got
            # the store lost one between prefill's lookup and now: the next prefill computes it
            log.info("an entry of this context went missing from the store: prefilling it again")
        raise EntryNotFound("the context's entries went missing from the store twice while being read")

    def _held_after(self, prefix: list[CompressedKV], plan: PrefillPlan) -> list[CompressedKV]:
        """The entries after ``prefix`` that this worker holds, in order (up to the first it lacks)."""
        held = []
        for key in plan.keys[len(prefix) :] if plan.recipe.chunked else plan.keys[-1:]:
            entry = self.held.get(str(key))
            if entry is None:
                break
            held.append(entry)
        return held

    def _put(self, entries: list[CompressedKV]) -> tuple[int, str]:
        """(bytes stored, why not all of them were: "" when they were). Entries the store did not
        take are held here for ``entries``."""
        stored, reasons = 0, []
        for entry in entries:
            try:
                stored += self._store_call("put", self.store.put, entry, quiet=False).stored_bytes
            except StoreDown as e:
                reasons.append(str(e))
                self.held.put(str(entry.key), entry)
                continue
            self.held.discard(str(entry.key))  # stored now: the store serves it
        if reasons:
            reason = reasons[0].split(":", 1)[0]
            self.not_stored[reason] = self.not_stored.get(reason, 0) + len(reasons)
            log.warning(
                "the store kept %d of %d entries (%s): answering without caching the rest",
                len(entries) - len(reasons),
                len(entries),
                reasons[0],
            )
        return stored, reasons[0] if reasons else ""

    def _store_call(self, what: str, fn, *args, quiet: bool = True):
        """``fn(*args)`` on the store; a failure of the store (unreachable, full, refusing) is a miss
        for a read (None) and ``StoreDown`` for a put, never an error of the request."""
        try:
            result = fn(*args)
        except grpc.RpcError as e:
            self.degraded.failed(f"store {what} failed: {e.code().name}")
            if quiet:
                log.warning(
                    "store %s failed (%s: %s): carrying on without it", what, e.code().name, (e.details() or "")[:200]
                )
                return None
            raise StoreDown(f"{e.code().name}: {(e.details() or '')[:300]}") from e
        return result

    def _full_bytes(self, tokens: int) -> int:
        """Uncompressed K and V of ``tokens`` in the model's dtype: what compression is measured against."""
        info = self.info
        itemsize = next(self.model.parameters()).element_size()
        return tokens * info.num_layers * info.num_kv_heads * info.head_dim * 2 * itemsize

    def _hit(self, found, token_ids: list[int], t: dict) -> PrefillResult:
        """Every entry is in the store: answer from the lookup, nothing fetched or computed."""
        bytes_ = found.stored_bytes
        weights = [1.0] * len(bytes_)
        importance = sum(w * i for w, i in zip(weights, found.importance)) / max(len(weights), 1)
        lookup_ms = (t["fetch"] - t["lookup"]) * 1e3
        log.info(
            "prefill %d tokens: all cached in %d entries (%s)", len(token_ids), len(found.keys), ",".join(found.tiers)
        )
        return PrefillResult(
            keys=[str(k) for k in found.keys],
            model_fingerprint=self.fingerprint,
            context_tokens=len(token_ids),
            cached_tokens=len(token_ids),
            prefilled_tokens=0,
            stored_bytes=sum(bytes_),
            full_bytes=self._full_bytes(len(token_ids)),
            kept_tokens_per_layer=found.kept_tokens_per_layer,
            importance=importance,
            timings_ms={
                "lookup": lookup_ms,
                "fetch": 0.0,
                "prefill": 0.0,
                "compress": 0.0,
                "store": 0.0,
                "total": lookup_ms,
            },
        )

    def _fetch(self, keys: list, recipe: Recipe) -> list[CompressedKV]:
        """The cached entries, up to the first one that is gone (a miss falls back to recompute)."""
        entries = []
        for key in keys:
            entry = self._store_call("get", self.store.get, key)
            if entry is None or entry.identity.recipe != recipe:
                break
            entries.append(entry)
        return entries
