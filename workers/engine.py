"""The decode loop: streams join and leave a running batch at step boundaries (continuous batching).

``Batch`` is the loop's body, single-threaded: ``join`` places a stream's entries in a free row of
the ``BatchCache`` and runs its query (one forward over the query tokens, the first token picked);
``step`` runs one forward over every active row with one token each and picks each row's next
token with that stream's own ``pick`` (greedy, or its temperature / top-p / seed). A stream leaves
at its stop token, at ``max_new_tokens``, or when cancelled, at the next step boundary; its row is
reused at once.

``DecodeEngine`` runs a ``Batch`` in one thread per worker (the model loop) behind a queue:
``admit`` takes a place in the queue or raises ``QueueFull`` (RESOURCE_EXHAUSTED: the bounds are in
the message), ``submit`` hands over a prepared stream, the loop joins waiting streams while rows
are free (``max_active``) and steps. Everything a request does before it has its entries in memory
(store lookups, fetches, a recompute through prefill) happens in the caller's thread, never in
the loop. Streams that read their entry page by page from the store (``SoloStream``: paged
decoding) are advanced one token per loop iteration beside the batch.

What transformers' own continuous batching (``transformers.generation.continuous_batching``) does
and why it is not used here: its ``PagedAttentionCache`` keeps every head of a token in the same
block, and a compressed dkv entry keeps a different set of tokens per layer and KV head; its
scheduler and request states are built around its own prefill of full prompts. The model forward,
the ``AttentionInterface`` hook and the ``Cache`` contract are transformers' (``workers.batch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dkv.kvstore.entry import CompressedKV
from dkv.workers.batch import BatchCache, RowSelection
from dkv.workers.model import model_info

log = logging.getLogger("dkv.decode.engine")

# Quest and HATA keep the first two layers dense (their attention is broad). Counted in the
# attended tokens, that costs more than it gives: on SmolLM2 at 1/8 of the context attended in all,
# two dense layers leave the other 28 a 1/16 budget, and exact top-k loses 0.098 nats/token of
# extra NLL against 0.038 with every layer selecting at 1/8 (docs/benchmarks.md, decode).
DENSE_LAYERS = 0
IDLE_RELEASE_S = 60.0  # an idle model loop gives its batch rows' memory back after this long


class QueueFull(RuntimeError):
    """The worker holds as many streams as it takes; the message gives its bounds (RESOURCE_EXHAUSTED)."""


class Cancelled(RuntimeError):
    """The stream was cancelled (its client went away, its deadline passed, or a stop string ended it)."""


@dataclass
class DecodeStats:
    """What a generation did: attended slots per step, timings.

    ``selected_per_step``: the slots one KV head attended at each step, mean over the heads and
    every layer (dense layers attend all of theirs), everything counted: sinks, recent tokens,
    the query's and the generated tokens.
    """

    steps: int = 0
    cached_slots: int = 0  # entry slots per layer and KV head (mean)
    selected_per_step: list[float] = field(default_factory=list)
    seconds_per_token: list[float] = field(default_factory=list)
    query_seconds: float = 0.0
    selection_cache_hits: int = 0


class Sampler:
    """Greedy when ``temperature`` is 0; else softmax(logits / T), nucleus ``top_p``, own generator."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))


@dataclass(eq=False)
class Stream:
    """One generation in the batch. ``on_token`` gets each token id, ``on_end`` None when it
    finished or the exception that ended it; both are called from the loop's thread."""

    entries: list[CompressedKV]  # the context's entry, or its chunks' entries in order
    query_ids: list[int]
    max_new_tokens: int
    on_token: Callable[[int], None]
    on_end: Callable[[BaseException | None], None]
    pick: Callable[[torch.Tensor], int] = field(default_factory=Sampler)
    stop_ids: frozenset[int] = frozenset()
    selection: RowSelection | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    produced: int = 0
    last: int = -1
    cancelled: bool = False
    entry_tokens: list[float] = field(default_factory=list)  # kept tokens per KV head (mean), per layer

    def cancel(self) -> None:
        """Leave at the next step boundary (safe from any thread)."""
        self.cancelled = True

    def _emit(self, token: int) -> bool:
        """Hand out ``token``; True when the stream is done."""
        self.produced += 1
        self.last = token
        self.on_token(token)
        return token in self.stop_ids or self.produced >= self.max_new_tokens


class Batch:
    """The model loop's body (see the module docstring); one thread drives it."""

    def __init__(self, model, dense_layers: int = DENSE_LAYERS):
        info = model_info(model)
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.cache = BatchCache(
            info.num_layers, info.num_kv_heads, info.head_dim, param.dtype, param.device, dense_layers
        )
        self.streams: list[Stream] = []  # by row

    @property
    def rows(self) -> int:
        return self.cache.rows

    def join(self, streams: list[Stream]) -> None:
        """Place ``streams`` (queries of one length) in new rows, run their queries in one forward,
        hand out each one's first token. On failure none of them stays."""
        first = self.rows
        try:
            for stream in streams:
                row = self.cache.place(stream.entries, len(stream.query_ids) + stream.max_new_tokens, stream.selection)
                self.streams.append(stream)
                stream.stats.cached_slots = round(float(self.cache.entry_slots[:, row].float().mean()))
                stream.entry_tokens = self.cache.entry_tokens(row)
            started = time.perf_counter()
            logits = self._forward(torch.tensor([s.query_ids for s in streams]), first, len(streams))
        except BaseException:
            for row in reversed(range(first, self.rows)):
                self._remove(row)
            raise
        seconds = time.perf_counter() - started
        done = []
        for i, stream in enumerate(streams):
            stream.stats.query_seconds = seconds
            if self._pick(first + i, logits[i]):
                done.append(first + i)
        for row in reversed(done):
            self._finish(row, None)

    def step(self) -> None:
        """Drop cancelled streams, then one token for every active row."""
        for row in reversed(range(self.rows)):
            if self.streams[row].cancelled:
                self._finish(row, Cancelled("cancelled"))
        if not self.rows:
            return
        started = time.perf_counter()
        try:
            logits = self._forward(torch.tensor([[s.last] for s in self.streams]), 0, self.rows)
        except BaseException as e:
            for row in reversed(range(self.rows)):
                self._finish(row, e)
            raise
        seconds = time.perf_counter() - started
        done = []
        for row, stream in enumerate(self.streams):
            stream.stats.steps += 1
            stream.stats.seconds_per_token.append(seconds)
            stream.stats.selected_per_step.append(self._attended(row, stream))
            if self._pick(row, logits[row]):
                done.append(row)
        for row in reversed(done):
            self._finish(row, None)

    def _attended(self, row: int, stream: Stream) -> float:
        """Slots one KV head attended in this step, mean over heads and layers (``DecodeStats``)."""
        selection = self.cache.selections[row]
        selected = selection.selected if selection is not None else []
        dense = stream.entry_tokens[: len(stream.entry_tokens) - len(selected)]  # every kept token, all appended
        return (sum(dense) + len(dense) * float(self.cache.appended[row]) + sum(selected)) / len(stream.entry_tokens)

    def cancel_all(self, error: BaseException) -> None:
        for row in reversed(range(self.rows)):
            self._finish(row, error)

    def _forward(self, input_ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Logits ``[count, vocab]`` of the last new token of rows ``first..first+count-1``."""
        position_ids = self.cache.cover(first, count, input_ids.shape[1])
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache.advance()
        return out.logits[:, -1]

    def _pick(self, row: int, logits: torch.Tensor) -> bool:
        stream = self.streams[row]
        return stream._emit(stream.pick(logits))

    def _finish(self, row: int, error: BaseException | None) -> None:
        stream = self.streams[row]
        self._remove(row)
        selector = stream.selection.selector if stream.selection is not None else None
        stream.stats.selection_cache_hits = getattr(selector, "hits", 0)
        try:
            stream.on_end(error)
        except Exception:
            log.exception("a stream's end handler failed")

    def _remove(self, row: int) -> None:
        last = self.rows - 1
        self.cache.remove(row)
        self.streams[row] = self.streams[last]
        self.streams.pop()


@dataclass(eq=False)
class SoloStream:
    """A generation that runs its own cache (paged decoding reads pages from the store as it
    goes): the loop advances ``tokens`` by one per iteration."""

    tokens: Iterator[int]
    on_token: Callable[[int], None]
    on_end: Callable[[BaseException | None], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class DecodeEngine:
    """One model loop in its own thread, fed by a bounded queue (see the module docstring)."""

    def __init__(self, model, max_active: int = 16, max_queued: int = 64, dense_layers: int = DENSE_LAYERS):
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"max_active {max_active} must be >= 1 and max_queued {max_queued} >= 0")
        self.batch = Batch(model, dense_layers)
        self.max_active, self.max_queued = max_active, max_queued
        self._waiting: deque[Stream | SoloStream] = deque()
        self._solo: list[SoloStream] = []
        self._queued = 0  # admitted and not yet running: being prepared, or waiting for a row
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="dkv-decode-loop", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return self.batch.rows + len(self._solo)

    @property
    def queued(self) -> int:
        return self._queued

    def admit(self) -> None:
        """Take a place in the queue, or raise ``QueueFull``. Follow with ``submit`` or ``release``."""
        with self._wake:
            if self._closed:
                raise QueueFull("the decode worker is shutting down")
            if self._queued >= self.max_queued:
                raise QueueFull(
                    f"the decode worker is full: {self.active} streams running (max_active_streams "
                    f"{self.max_active}) and {self._queued} requests queued (max_queued_requests "
                    f"{self.max_queued}); retry later or add decode workers"
                )
            self._queued += 1

    def release(self) -> None:
        """Give back an admitted place that will not be submitted (its preparation failed)."""
        with self._wake:
            self._queued -= 1

    def submit(self, stream: Stream | SoloStream) -> None:
        """Queue an admitted stream; it joins the batch when a row is free."""
        with self._wake:
            self._waiting.append(stream)
            self._wake.notify()

    def close(self) -> None:
        """Stop the loop; streams still running or waiting end with ``Cancelled``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._waiting or self.active):
                        # idle: the pools keep their size for the next streams, unless it lasts
                        if not self._wake.wait(IDLE_RELEASE_S) and self.batch.rows == 0:
                            self.batch.cache.release()
                    if self._closed:
                        break
                    joining = []
                    while self._waiting and self.active + len(joining) < self.max_active:
                        joining.append(self._waiting.popleft())
                        self._queued -= 1
                self._join(joining)
                try:
                    self.batch.step()
                except Exception:
                    log.exception("a decode step failed; its streams were ended")
                self._advance_solo()
        cancelled = Cancelled("the decode worker is shutting down")
        self.batch.cancel_all(cancelled)
        for stream in [*self._solo, *self._waiting]:
            stream.on_end(cancelled)

    def _join(self, joining: list[Stream | SoloStream]) -> None:
        """Start the streams taken from the queue: those with queries of one length in one forward."""
        by_length: dict[int, list[Stream]] = {}
        for stream in joining:
            if stream.cancelled:
                stream.on_end(Cancelled("cancelled while queued"))
            elif isinstance(stream, SoloStream):
                self._solo.append(stream)
            else:
                by_length.setdefault(len(stream.query_ids), []).append(stream)
        for group in by_length.values():
            try:
                self.batch.join(group)
            except Exception as e:
                for stream in group:
                    stream.on_end(e)

    def _advance_solo(self) -> None:
        for stream in list(self._solo):
            error: BaseException | None = None
            try:
                if not stream.cancelled:
                    stream.on_token(next(stream.tokens))
                    continue
                error = Cancelled("cancelled")
            except StopIteration:
                pass
            except Exception as e:
                error = e
            self._solo.remove(stream)
            stream.on_end(error)
