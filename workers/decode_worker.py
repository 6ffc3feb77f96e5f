"""The decode worker: resolve a request's entries, fall back to recompute on a miss, batch, report.

``DecodeWorker.open`` prepares a request in the caller's thread (checks it, takes a place in the
engine's queue, finds its entries in the store: all chunks fetched at once, or recomputed
through prefill when they are gone) and hands it to the worker's ``DecodeEngine``, whose one model
loop decodes every stream together (``workers.engine``). Results reach the caller's ``sink`` as
they come: each token id, then one ``DecodeResult``, or the exception that ended the request. The
returned ``Handle`` cancels it (the stream leaves the batch at the next step). ``run`` is the same
as a blocking iterator.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from dkv.kvstore.entry import CompressedKV, EntryKey, Recipe
from dkv.kvstore.errors import EntryNotFound
from dkv.kvstore.prefix import check_chain
from dkv.workers.decode import (
    check_geometry,
    generate_remote,
    row_selection,
    stop_token_ids,
)
from dkv.workers.degradation import Degradation
from dkv.workers.engine import (
    DENSE_LAYERS,
    DecodeEngine,
    DecodeStats,
    Sampler,
    SoloStream,
    Stream,
)
from dkv.workers.lru import BytesLRU
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
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass
class DecodeResult:
    stats: DecodeStats
    bytes_by_tier: dict[str, int]
    fetch_ms: float
    prefilled: bool
    context_tokens: int


FETCH_WINDOW = 8  # chunk entries read from the store side by side
LOCAL_TIER = "worker"  # bytes_fetched_by_tier's name for entries this worker still held
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # below, logits / T overflow to inf

Sink = Callable[["int | DecodeResult | BaseException"], None]


def check_decoding(
    selection: str, budget_fraction: float, selection_cache: float, temperature: float, top_p: float
) -> None:
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


class Handle:
    """A request in the worker: ``cancel()`` ends it within one decode step (safe from any thread)."""

    def __init__(self):
        self._stream: Stream | SoloStream | None = None
        self._lock = threading.Lock()
        self.cancelled = False

    def _attach(self, stream: Stream | SoloStream) -> None:
        with self._lock:
            self._stream = stream
            if self.cancelled:
                stream.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._stream is not None:
                self._stream.cancel()


class DecodeWorker:
    def __init__(
        self,
        model,
        tokenizer,
        store,
        prefill=None,
        page_cache_bytes: int = 256 << 20,
        max_active: int = 16,
        max_queued: int = 64,
        dense_layers: int = DENSE_LAYERS,
        entry_cache_bytes: int = 1 << 30,
        entry_cache_ttl_s: float = 300.0,
    ):
        """``store``: a ``StoreClient``; ``prefill``: a ``PrefillClient`` (its ``entries`` and ``keys``)
        that computes what the store does not have (None: a miss is NOT_FOUND). ``max_active`` streams decode
        together; ``max_queued`` more may wait (RESOURCE_EXHAUSTED beyond). The entries it decoded
        from stay in a local cache of ``entry_cache_bytes`` for ``entry_cache_ttl_s``: a context
        asked again (the gateway sends it back here) skips the store."""
        self.model, self.tokenizer, self.store, self.prefill = model, tokenizer, store, prefill
        self.info = model_info(model)
        self.page_cache_bytes = page_cache_bytes
        self.entries: BytesLRU[CompressedKV] = BytesLRU(entry_cache_bytes, lambda e: e.nbytes, entry_cache_ttl_s)
        self.degraded = Degradation()
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))
        self.engine = DecodeEngine(model, max_active, max_queued, dense_layers)
        # chunk fetches and the recompute of an entry lost mid-way: blocking I/O, never in the model loop
        self._io = ThreadPoolExecutor(max_workers=FETCH_WINDOW, thread_name_prefix="dkv-decode-io")

    def close(self) -> None:
        self.engine.close()
        self._io.shutdown(wait=False, cancel_futures=True)

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
                raise ValueError(
                    f"entry {key} was computed by model {key.model_fingerprint}; this worker runs "
                    f"{self.model.dkv_fingerprint}: send the context to have it recomputed"
                )
        if job.context_ids is not None and job.recipe is None:
            raise ValueError("a context needs its recipe")

    def open(self, job: DecodeJob, sink: Sink) -> Handle:
        """Prepare ``job`` (blocking: store reads, maybe a recompute) and start decoding it; results
        go to ``sink`` (see the module docstring). Raises what makes the request fail before its
        first token: ``ValueError``, ``QueueFull``, ``EntryNotFound``, gRPC errors of the store."""
        self.check(job)
        self.engine.admit()
        handle = Handle()
        try:
            self._start(job, handle, sink, time.perf_counter())
        except BaseException:
            self.engine.release()
            raise
        return handle

    def run(self, job: DecodeJob) -> Iterator[int | DecodeResult]:
        """``open`` as a blocking iterator: the token ids, then one ``DecodeResult``. Closing the
        iterator early cancels the request."""
        results: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.open(job, results.put)
        try:
            while True:
                item = results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, DecodeResult):
                    return
        finally:
            handle.cancel()

    # ------------------------------------------------------------------ preparation

    def _start(
        self,
        job: DecodeJob,
        handle: Handle,
        sink: Sink,
        started: float,
        sent: list[int] | None = None,
        recompute: bool = False,
    ) -> None:
        """Resolve and fetch ``job``'s entries, then submit its stream. ``sent``: tokens already
        handed out by an attempt that lost its entry (regenerated, checked and skipped)."""
        fetch = FetchStats()
        sent = sent if sent is not None else []
        stats = DecodeStats()
        if job.paged:
            stream, context_tokens, prefilled = self._paged(job, stats, fetch, recompute)
        else:
            entries, prefilled = self._entries(job, fetch)
            context_tokens = entries[-1].seq_len
            self._check_length(context_tokens, job)
            stream = self._stream(job, entries, stats)
        fetch_ms = (time.perf_counter() - started) * 1e3
        produced = [0]

        def on_token(token: int) -> None:
            produced[0] += 1
            if produced[0] <= len(sent):  # a retry regenerating what was already handed out
                if token != sent[produced[0] - 1]:
                    log.warning("recomputed entry continued differently at token %d", produced[0] - 1)
                return
            sent.append(token)
            sink(token)

        def on_end(error: BaseException | None) -> None:
            if error is None:
                sink(DecodeResult(stats, fetch.tiers, fetch_ms, prefilled, context_tokens))
            elif isinstance(error, EntryLost) and not recompute and job.context_ids is not None and self.prefill:
                log.info("entry lost while decoding (%s): recomputing it through prefill", error)
                self._io.submit(self._retry, job, handle, sink, started, sent)
            else:
                sink(error)

        stream.on_token, stream.on_end = on_token, on_end
        handle._attach(stream)
        self.engine.submit(stream)

    def _retry(self, job: DecodeJob, handle: Handle, sink: Sink, started: float, sent: list[int]) -> None:
        try:
            self.engine.admit()
            try:
                self._start(job, handle, sink, started, sent, recompute=True)
            except BaseException:
                self.engine.release()
                raise
        except Exception as e:
            sink(e)

    def _stream(self, job: DecodeJob, entries: list[CompressedKV], stats: DecodeStats) -> Stream:
        first = entries[0]
        check_geometry(self.model, first.num_layers, first.num_kv_heads, first.head_dim, str(first.key))
        return Stream(
            entries,
            list(job.query_ids),
            job.max_new_tokens,
            on_token=_unset,
            on_end=_unset,
            pick=Sampler(job.temperature, job.top_p, job.seed),
            stop_ids=frozenset() if job.ignore_eos else self.stop_ids,
            selection=row_selection(job.selection, job.budget, job.budget_fraction, job.selection_cache),
            stats=stats,
        )

    def _paged_stream(
        self, job: DecodeJob, keys: list[str], stats: DecodeStats, fetch: FetchStats
    ) -> tuple[SoloStream, int]:
        if len(keys) != 1:
            raise ValueError("paged decoding reads one entry; this context has one entry per chunk")
        tokens = generate_remote(
            self.model,
            self.tokenizer,
            self.store,
            keys[0],
            torch.tensor([job.query_ids]),
            job.max_new_tokens,
            job.budget,
            page_cache_bytes=self.page_cache_bytes,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            stop_ids=set() if job.ignore_eos else set(self.stop_ids),
            stats=stats,
            fetch=fetch,
        )
        self._check_length(fetch.context_tokens, job)
        return SoloStream(tokens, on_token=_unset, on_end=_unset), fetch.context_tokens

    def _fetch(self, keys: list[str], fetch: FetchStats) -> list[CompressedKV]:
        """Every entry of ``keys`` (a chunked context has one per chunk): from the local cache, else
        from the store, ``FETCH_WINDOW`` at a time side by side; the first miss ends it."""
        entries = []
        for start in range(0, len(keys), FETCH_WINDOW):
            window = keys[start : start + FETCH_WINDOW]
            local = [self.entries.get(key) for key in window]
            missing = [key for key, entry in zip(window, local) if entry is None]
            fetched = dict(zip(missing, self._io.map(self.store.get_with_tier, missing)))
            for key, entry in zip(window, local):
                if entry is not None:
                    fetch.tiers[LOCAL_TIER] = fetch.tiers.get(LOCAL_TIER, 0) + entry.nbytes
                else:
                    got = fetched[key]
                    if got is None:
                        raise EntryNotFound(f"the store has no entry {key}")
                    entry, tier, nbytes = got
                    fetch.tiers[tier] = fetch.tiers.get(tier, 0) + nbytes
                entries.append(entry)
        check_chain([e.identity for e in entries])  # the chunks of one context, in order (ValueError)
        for key, entry in zip(keys, entries):
            self.entries.put(key, entry)
        return entries

    def _check_length(self, seq_len: int, job: DecodeJob) -> None:
        total = seq_len + len(job.query_ids) + job.max_new_tokens
        if total > self.info.max_positions:
            raise ValueError(
                f"context {seq_len} + query {len(job.query_ids)} + max_new_tokens {job.max_new_tokens} "
                f"= {total} tokens is more than the model's {self.info.max_positions}"
            )

    def _entries(self, job: DecodeJob, fetch: FetchStats) -> tuple[list[CompressedKV], bool]:
        """(the job's entries, whether they were prefilled now): from this worker's cache or the
        store; when they are not there (or the store cannot be reached: it is a cache), from the
        prefill worker, which hands over what it computed."""
        try:
            keys = list(job.keys) or self._lookup(job)
            if keys:
                return self._fetch(keys, fetch), False
        except (EntryNotFound, grpc.RpcError) as missing:
            if isinstance(missing, grpc.RpcError):
                self.degraded.failed(f"store unreachable: {missing.code().name}")
            if job.context_ids is None or self.prefill is None:
                if isinstance(missing, EntryNotFound):
                    raise EntryNotFound(f"{missing}; send the context and its recipe to have it recomputed") from None
                raise
            log.info("entries not in the store (%s): asking the prefill worker for them", _why(missing))
        if job.context_ids is None or self.prefill is None:
            raise EntryNotFound("the context is not cached and this worker has no prefill service to compute it")
        entries = self.prefill.entries(job.context_ids, job.recipe, job.tenant)
        for entry in entries:  # a context asked again finds them here, also while the store is down
            self.entries.put(str(entry.key), entry)
        check_chain([e.identity for e in entries])
        return entries, True

    def _lookup(self, job: DecodeJob) -> list[str]:
        """The keys of the job's context if the store holds all of it, else []."""
        found = self.store.lookup(self.model.dkv_fingerprint, job.recipe, job.context_ids, job.tenant)
        return [str(k) for k in found.keys] if found is not None and found.cached_tokens == len(job.context_ids) else []

    def _paged(
        self, job: DecodeJob, stats: DecodeStats, fetch: FetchStats, recompute: bool
    ) -> tuple[SoloStream, int, bool]:
        """Paged decoding reads the entry from the store as it goes: recomputed through prefill (into
        the store) when it is missing."""
        keys = list(job.keys) if job.keys and not recompute else [] if recompute else self._lookup(job)
        for attempt in range(2):
            if keys:
                try:
                    return (*self._paged_stream(job, keys, stats, fetch), attempt > 0 or recompute)
                except (EntryLost, EntryNotFound) as lost:
                    if attempt or job.context_ids is None or self.prefill is None:
                        raise EntryNotFound(f"{lost}; send the context and its recipe to have it recomputed") from lost
            if job.context_ids is None or self.prefill is None:
                raise EntryNotFound("the context is not cached and this worker has no prefill service to compute it")
            log.info("entry for paged decoding missing: recomputing it through prefill")
            keys = self.prefill.keys(job.context_ids, job.recipe, job.tenant)
        raise EntryNotFound("the recomputed entry is not in the store: paged decoding reads it from there")


def _why(error: BaseException) -> str:
    return f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)


def _unset(*_) -> None:
    raise RuntimeError("a stream's handlers are set before it is submitted")
