"""The prefill worker: reuse what the store has, prefill and compress the rest, write it back.

``PrefillWorker.prefill`` is what the Prefill gRPC service calls. One model serves one request
at a time (a lock): on CPU two forwards side by side only slow each other down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from dkv.kvstore.entry import CompressedKV, Recipe
from dkv.services.store_client import StoreClient
from dkv.workers.compression import compress, compress_chunks, make_method
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


class PrefillWorker:
    def __init__(self, model, tokenizer, store: StoreClient, max_tokens: int | None = None,
                 storage_dtype: str = "auto", min_chunk_size: int = 16):
        """``storage_dtype``: the dtype entries are stored in (``auto``: float16 for a float32 model,
        else the model's own): halves a float32 model's bytes in the store and on the wire.
        ``min_chunk_size``: the smallest recipe chunk_size accepted (a chunked recipe stores one
        entry per chunk: the client would otherwise choose how many entries a request makes)."""
        self.model, self.tokenizer, self.store = model, tokenizer, store
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = (torch.float16 if model_dtype == torch.float32 else model_dtype) \
            if storage_dtype == "auto" else getattr(torch, storage_dtype)
        self.info = model_info(model)
        self.max_tokens = min(max_tokens or self.info.max_positions, self.info.max_positions)
        self.min_chunk_size = min_chunk_size
        self.fingerprint = model.dkv_fingerprint
        self._lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def check(self, token_ids: list[int], recipe: Recipe) -> None:
        """Raise ``ValueError`` saying what is wrong with a request (INVALID_ARGUMENT)."""
        if not token_ids:
            raise ValueError("the context is empty: send text or token_ids")
        if len(token_ids) > self.max_tokens:
            raise ValueError(f"the context has {len(token_ids)} tokens; this worker takes at most {self.max_tokens}")
        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})")
        if recipe.chunk_size < self.min_chunk_size:
            raise ValueError(f"recipe chunk_size {recipe.chunk_size} is below this worker's min_chunk_size "
                             f"{self.min_chunk_size}: use larger chunks")
        make_method(recipe.method, **_method_params(recipe))

    def prefill(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> PrefillResult:
        self.check(token_ids, recipe)
        t = {"lookup": time.perf_counter()}
        found = self.store.lookup(self.fingerprint, recipe, token_ids, tenant)
        t["fetch"] = time.perf_counter()
        if found is not None and found.cached_tokens == len(token_ids):
            return self._hit(found, token_ids, t)
        cached = self._fetch(found.keys if found else [], recipe)
        t["prefill"] = time.perf_counter()
        timings: dict[str, float] = {}
        ids = torch.tensor([token_ids])
        kwargs = dict(method=recipe.method, ratio=recipe.ratio, budget=recipe.budget, quant=recipe.quant,
                      merge=dict(recipe.params).get("merge", 0.0) > 0, tenant=tenant, timings=timings,
                      **_method_params(recipe))
        with self._lock:
            if recipe.chunked:
                entries = compress_chunks(self.model, ids, chunk_size=recipe.chunk_size, cached=cached, **kwargs)
            else:
                cached = []
                entries = [compress(self.model, ids, **kwargs)]
        t["store"] = time.perf_counter()
        entries = cached + [e.cast(self.storage_dtype) for e in entries[len(cached):]]
        new = entries[len(cached):]
        stored = sum(self.store.put(e).stored_bytes for e in new)
        stored += sum(e.nbytes for e in cached)
        t["end"] = time.perf_counter()
        cached_tokens = cached[-1].seq_len if cached else 0
        kept = [sum(e.layers[i].num_tokens for e in entries) for i in range(len(entries[0].layers))]
        weights = [e.seq_len - e.identity.start for e in entries]
        importance = sum(w * e.importance for w, e in zip(weights, entries)) / sum(weights)
        result = PrefillResult(
            keys=[str(e.key) for e in entries], model_fingerprint=self.fingerprint, context_tokens=len(token_ids),
            cached_tokens=cached_tokens, prefilled_tokens=len(token_ids) - cached_tokens, stored_bytes=stored,
            full_bytes=self._full_bytes(len(token_ids)),
            kept_tokens_per_layer=kept, importance=importance,
            timings_ms={"lookup": (t["fetch"] - t["lookup"]) * 1e3, "fetch": (t["prefill"] - t["fetch"]) * 1e3,
                        "prefill": timings.get("prefill_s", 0.0) * 1e3, "compress": timings.get("compress_s", 0.0) * 1e3,
                        "store": (t["end"] - t["store"]) * 1e3, "total": (t["end"] - t["lookup"]) * 1e3},
        )
        log.info("prefill %d tokens (%d cached) with %s ratio %.2f: %d entries, %d bytes, %.0f ms",
                 len(token_ids), cached_tokens, recipe.method, recipe.ratio, len(entries), stored,
                 result.timings_ms["total"])
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
        log.info("prefill %d tokens: all cached in %d entries (%s)", len(token_ids), len(found.keys), ",".join(found.tiers))
        return PrefillResult(
            keys=[str(k) for k in found.keys], model_fingerprint=self.fingerprint, context_tokens=len(token_ids),
            cached_tokens=len(token_ids), prefilled_tokens=0, stored_bytes=sum(bytes_),
            full_bytes=self._full_bytes(len(token_ids)), kept_tokens_per_layer=found.kept_tokens_per_layer,
            importance=importance,
            timings_ms={"lookup": lookup_ms, "fetch": 0.0, "prefill": 0.0, "compress": 0.0, "store": 0.0,
                        "total": lookup_ms})

    def _fetch(self, keys: list, recipe: Recipe) -> list[CompressedKV]:
        """The cached entries, up to the first one that is gone (a miss falls back to recompute)."""
        entries = []
        for key in keys:
            entry = self.store.get(key)
            if entry is None or entry.identity.recipe != recipe:
                break
            entries.append(entry)
        return entries


def _method_params(recipe: Recipe) -> dict:
    return {k: v for k, v in recipe.params if k != "merge"}
