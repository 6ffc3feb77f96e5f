"""The decode worker: resolve an entry, fall back to recompute on a miss, generate, report.

``DecodeWorker.run`` is what the Decode gRPC service calls; it yields token ids as they come and
then one ``DecodeResult``. One model decodes one request at a time (a lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dkv.kvstore.entry import CompressedKV, EntryKey, Identity, Recipe, make_layer
from dkv.kvstore.errors import EntryNotFound
from dkv.workers.decode import DecodeStats, generate_remote, stream
from dkv.workers.model import model_info
from dkv.workers.paged import EntryLost, FetchStats
from dkv.workers.selection import SELECTIONS

log = logging.getLogger("dkv.decode")


@dataclass
class DecodeJob:
    query_ids: list[int]
    keys: list[str] = field(default_factory=list)
    context_ids: list[int] | None = None
    recipe: Recipe | None = None
    selection: str = "dense"
    budget: int = 0
    budget_fraction: float = 0.0
    selection_cache: float = 0.0
    paged: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tenant: str = "default"


@dataclass
class DecodeResult:
    stats: DecodeStats
    bytes_by_tier: dict[str, int]
    fetch_ms: float
    prefilled: bool
    context_tokens: int


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # below, logits / T overflow to inf


def check_decoding(selection: str, budget_fraction: float, selection_cache: float, temperature: float,
                   top_p: float) -> None:
    """Raise ``ValueError`` for decoding fields no worker accepts (the gateway checks them before
    it has the context prefilled, so a refused request stores nothing)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection[:64]!r}; use one of {sorted(SELECTIONS)}")
    if not 0.0 <= budget_fraction <= 1.0:
        raise ValueError(f"budget_fraction {budget_fraction} must be in [0, 1]")
    if not 0.0 <= selection_cache <= 1.0:
        raise ValueError(f"selection_cache {selection_cache} must be a cosine threshold in [0, 1]")
    if not (temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature {temperature} must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p {top_p} must be in (0, 1]")


class DecodeWorker:
    def __init__(self, model, tokenizer, store, prefill=None, page_cache_bytes: int = 256 << 20):
        """``store``: a ``StoreClient``; ``prefill``: a callable ``(context_ids, recipe, tenant) -> keys``
        used to recompute a missing entry (None: a miss is NOT_FOUND)."""
        self.model, self.tokenizer, self.store, self.prefill = model, tokenizer, store, prefill
        self.info = model_info(model)
        self.page_cache_bytes = page_cache_bytes
        self._lock = threading.Lock()

    def check(self, job: DecodeJob) -> None:
        """Raise ``ValueError`` saying what is wrong (INVALID_ARGUMENT)."""
        check_decoding(job.selection, job.budget_fraction, job.selection_cache, job.temperature, job.top_p)
        if not job.query_ids:
            raise ValueError("the query is empty: send query_text or query_ids")
        if any(not 0 <= t < self.info.vocab_size for t in job.query_ids):
            raise ValueError(f"a query token id is outside the vocabulary [0, {self.info.vocab_size})")
        if not 0 <= job.budget <= self.info.max_positions:
            raise ValueError(f"budget {job.budget} must be in [0, {self.info.max_positions}] tokens per KV head")
        if job.paged and (job.selection != "pages" or not job.budget):
            raise ValueError("paged decoding reads pages from the store: use selection 'pages' with a budget > 0")
        if not 1 <= job.max_new_tokens <= self.info.max_positions:
            raise ValueError(f"max_new_tokens {job.max_new_tokens} must be in [1, {self.info.max_positions}]")
        if not job.keys and not job.context_ids:
            raise ValueError("no entry: send its keys, or the context and a recipe")
        for key in map(EntryKey.parse, job.keys):
            if key.model_fingerprint != self.model.dkv_fingerprint:
                raise ValueError(f"entry {key} was computed by model {key.model_fingerprint}; this worker runs "
                                 f"{self.model.dkv_fingerprint}: send the context to have it recomputed")
        if job.context_ids is not None and job.recipe is None:
            raise ValueError("a context needs its recipe")

    def run(self, job: DecodeJob) -> Iterator[int | DecodeResult]:
        """Yield the generated token ids, then one ``DecodeResult``.

        A missing entry is recomputed through ``prefill`` when the job carries its context; if
        it goes missing in the middle of a paged generation, the tokens already yielded are
        generated again (the same, for the same entry and selection) and skipped.
        """
        self.check(job)
        started = time.perf_counter()
        keys, prefilled = (list(job.keys), False) if job.keys else self._resolve(job)
        sent = []
        with self._lock:
            for attempt in range(2):
                stats, fetch = DecodeStats(), FetchStats()
                try:
                    tokens, context_tokens, fetch_ms = self._start(keys, job, stats, fetch, started)
                    for i, token in enumerate(tokens):
                        if i < len(sent):
                            if token != sent[i]:
                                log.warning("recomputed entry continued differently at token %d", i)
                            continue
                        sent.append(token)
                        yield token
                    break
                except (EntryLost, EntryNotFound) as lost:
                    if attempt or job.context_ids is None:
                        raise EntryNotFound(f"{lost}; send the context and its recipe to have it recomputed") from lost
                    log.info("entry missing (%s): recomputing it through prefill", lost)
                    keys, prefilled = self.prefill(job.context_ids, job.recipe, job.tenant), True
        yield DecodeResult(stats, fetch.tiers, fetch_ms, prefilled, context_tokens)

    def _start(self, keys: list[str], job: DecodeJob, stats: DecodeStats, fetch: FetchStats, started: float):
        """(token iterator, context tokens, fetch ms) for the entries ``keys``."""
        query = torch.tensor([job.query_ids])
        if job.paged:
            if len(keys) != 1:
                raise ValueError("paged decoding reads one entry; this context has one entry per chunk")
            tokens = generate_remote(self.model, self.tokenizer, self.store, keys[0], query, job.max_new_tokens,
                                     job.budget, page_cache_bytes=self.page_cache_bytes, temperature=job.temperature,
                                     top_p=job.top_p, seed=job.seed, stats=stats, fetch=fetch)
            self._check_length(fetch.context_tokens, job)
            return tokens, fetch.context_tokens, (time.perf_counter() - started) * 1e3
        entries = []
        for key in keys:
            fetched = self.store.get_with_tier(key)
            if fetched is None:
                raise EntryNotFound(f"the store has no entry {key}")
            entry, tier, nbytes = fetched
            fetch.tiers[tier] = fetch.tiers.get(tier, 0) + nbytes
            entries.append(entry)
        entry = entries[0] if len(entries) == 1 else merge_chunks(entries)
        self._check_length(entry.seq_len, job)
        fetch_ms = (time.perf_counter() - started) * 1e3
        tokens = stream(self.model, self.tokenizer, entry, query, job.max_new_tokens, job.selection,
                        job.budget or None, temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                        stats=stats, budget_fraction=job.budget_fraction, selection_cache=job.selection_cache)
        return tokens, entry.seq_len, fetch_ms

    def _check_length(self, seq_len: int, job: DecodeJob) -> None:
        total = seq_len + len(job.query_ids) + job.max_new_tokens
        if total > self.info.max_positions:
            raise ValueError(f"context {seq_len} + query {len(job.query_ids)} + max_new_tokens {job.max_new_tokens} "
                             f"= {total} tokens is more than the model's {self.info.max_positions}")

    def _resolve(self, job: DecodeJob) -> tuple[list[str], bool]:
        """(keys of the context, whether they were prefilled now): the store's if it has them all."""
        found = self.store.lookup(self.model.dkv_fingerprint, job.recipe, job.context_ids, job.tenant)
        if found is not None and found.cached_tokens == len(job.context_ids):
            return [str(k) for k in found.keys], False
        if self.prefill is None:
            raise EntryNotFound("the context is not cached and this worker has no prefill service to compute it")
        return self.prefill(job.context_ids, job.recipe, job.tenant), True


def merge_chunks(entries: list[CompressedKV]) -> CompressedKV:
    """The chunk entries of a chunked recipe as one dense entry (rows of each head in order)."""
    first, last = entries[0], entries[-1]
    layers = []
    for parts in zip(*(e.layers for e in entries)):
        positions, keys, values, scores = [], [], [], []
        dense = [p.dequantized(first.page_size, torch.float32) for p in parts]
        for h in range(first.num_kv_heads):
            rows = [(p, k, v) for p, (k, v) in zip(parts, dense)]
            spans = [(int(p.head_offsets[h]), int(p.head_offsets[h + 1])) for p, _, _ in rows]
            positions.append(torch.cat([p.positions[a:b].long() for (p, _, _), (a, b) in zip(rows, spans)]))
            keys.append(torch.cat([k[a:b] for (_, k, _), (a, b) in zip(rows, spans)]))
            values.append(torch.cat([v[a:b] for (_, _, v), (a, b) in zip(rows, spans)]))
            scores.append(torch.cat([p.scores[a:b] for (p, _, _), (a, b) in zip(rows, spans)]))
        layers.append(make_layer(positions, keys, values, scores, first.page_size))
    ident = last.identity
    identity = Identity(ident.model_fingerprint, ident.recipe, ident.chunk_hashes, ident.seq_len, ident.tenant, start=0)
    weights = [e.seq_len - e.identity.start for e in entries]
    importance = sum(w * e.importance for w, e in zip(weights, entries)) / sum(weights)
    return CompressedKV(identity, layers, first.num_kv_heads, first.head_dim, first.page_size, importance)
