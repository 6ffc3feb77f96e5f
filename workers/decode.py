"""Decoding from a compressed entry with query-aware sparse attention.

``generate`` continues a ``CompressedKV`` at its original length: the query tokens attend to the
whole cache (one dense pass), then every generated token attends only to the slots its selection
picks (``workers.selection``), through ``kernels.sparse_attention`` (Triton on CUDA, the torch
reference elsewhere). Greedy by default; ``temperature``/``top_p`` sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dkv.kernels.sparse_attention import sparse_decode_attention
from dkv.kvstore.entry import CompressedKV, page_counts
from dkv.workers.cache import ATTN_IMPLEMENTATION, DkvCache, DkvLayer, to_hf_cache
from dkv.workers.model import model_info
from dkv.workers.paged import FetchStats, PageCache, RemoteEntry, paged_cache
from dkv.workers.selection import Selection, SelectionCache, SlotView, make_selection


@dataclass
class DecodeStats:
    """What a generation did: attended slots per step (mean per KV head over layers), timings."""

    steps: int = 0
    cached_slots: int = 0  # entry slots per layer and KV head (mean)
    selected_per_step: list[float] = field(default_factory=list)
    seconds_per_token: list[float] = field(default_factory=list)
    query_seconds: float = 0.0
    selection_cache_hits: int = 0


class _LayerSparse:
    """Installed on one ``DkvLayer``: selection + sparse attention for one-token steps."""

    def __init__(self, index: int, layer: DkvLayer, entry: CompressedKV, selector, stats: list[float]):
        self.index, self.layer, self.selector, self.stats = index, layer, selector, stats
        self.entry_slots = layer.keys.shape[2]
        self.page_size = entry.page_size
        self.page_min, self.page_max, self.num_pages = _padded_pages(entry, index, layer.keys.dtype)

    def view(self) -> SlotView:
        layer = self.layer
        valid = layer.valid if layer.valid is not None else torch.ones(layer.positions.shape, dtype=torch.bool)
        return SlotView(layer.keys[0], valid, layer.positions, self.entry_slots, self.page_size,
                        self.page_min, self.page_max, self.num_pages)

    def __call__(self, query: torch.Tensor, scale: float) -> torch.Tensor | None:
        """query ``[1, H_q, q, D]``: one-token steps attend sparsely; the multi-token query step densely."""
        if query.shape[2] != 1:
            return None
        q = query[0, :, 0]
        view = self.view()
        if isinstance(self.selector, SelectionCache):
            indices, lengths = self.selector.select(self.index, q, view)
        else:
            indices, lengths = self.selector.select(q, view)
        self.stats.append(float(lengths.float().mean()))
        out = sparse_decode_attention(q, self.layer.keys[0], self.layer.values[0], indices, lengths, scale)
        return out.view(1, 1, *out.shape)


def _padded_pages(entry: CompressedKV, index: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entry's page summaries of one layer, per head: ``[H_kv, P, D]`` twice and ``[H_kv]``."""
    layer = entry.layers[index]
    pages = page_counts(layer.head_counts(), entry.page_size)
    p_max = int(pages.max()) if len(pages) else 0
    pmin = torch.zeros(entry.num_kv_heads, p_max, entry.head_dim, dtype=dtype)
    pmax = torch.zeros_like(pmin)
    start = 0
    for h, n in enumerate(pages.tolist()):
        pmin[h, :n] = layer.page_min[start:start + n].to(dtype)
        pmax[h, :n] = layer.page_max[start:start + n].to(dtype)
        start += n
    return pmin, pmax, pages.to(torch.int32)


DENSE_LAYERS = 2  # Quest and HATA keep the first two layers dense: their attention is broad


def sparse_cache(model, entry: CompressedKV, selection: str | Selection = "dense", budget: int | None = None,
                 budget_fraction: float = 0.0, selection_cache: float = 0.0, dense_layers: int = DENSE_LAYERS,
                 stats: DecodeStats | None = None, **params) -> DkvCache:
    """A ``DkvCache`` of ``entry`` whose one-token steps use ``selection``.

    ``selection_cache`` > 0 reuses a layer's selection while consecutive queries have at least
    that cosine similarity (0.9 in TokenSelect). The first ``dense_layers`` layers attend to
    every slot.
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    dtype = next(model.parameters()).dtype
    cache = to_hf_cache(entry, dtype=dtype, device=next(model.parameters()).device)
    selector = selection if isinstance(selection, Selection) else \
        make_selection(selection, budget=budget or 0, budget_fraction=budget_fraction, **params)
    if selection_cache:
        selector = SelectionCache(selector, threshold=selection_cache)
    stats = stats if stats is not None else DecodeStats()
    per_step: list[float] = []
    for i, layer in enumerate(cache.layers):
        if i >= dense_layers:
            layer.sparse_attend = _LayerSparse(i, layer, entry, selector, per_step)
    cache.dkv_selected = per_step  # per layer call, flushed into stats per step by generate
    cache.dkv_selector = selector
    stats.cached_slots = round(sum(e.keys.shape[2] for e in cache.layers) / len(cache.layers))
    return cache


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence and end-of-turn ids of the tokenizer (or of the model's generation config)."""
    ids = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            ids.add(end_of_turn)
    return ids


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def stream(model, tokenizer_or_none, cache: CompressedKV, query_ids: torch.Tensor, max_new_tokens: int,
           selection: str = "dense", budget: int | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
           seed: int | None = None, stop_ids: set[int] | None = None, stats: DecodeStats | None = None,
           **params):
    """``generate`` as an iterator: each token as soon as it is chosen."""
    _check_query(query_ids)
    check_geometry(model, cache.num_layers, cache.num_kv_heads, cache.head_dim, str(cache.key))
    stats = stats if stats is not None else DecodeStats()
    dkv = sparse_cache(model, cache, selection, budget, stats=stats, **params)
    yield from _no_grad(_tokens(model, tokenizer_or_none, dkv, dkv.dkv_selected, query_ids, max_new_tokens,
                                temperature, top_p, seed, stop_ids, stats))
    if isinstance(dkv.dkv_selector, SelectionCache):
        stats.selection_cache_hits = dkv.dkv_selector.hits


def generate(model, tokenizer_or_none, cache: CompressedKV, query_ids: torch.Tensor, max_new_tokens: int,
             selection: str = "dense", budget: int | None = None, **kwargs) -> list[int]:
    """Generate after ``cache`` (a compressed context) and ``query_ids`` ``[1, T]``.

    ``budget`` is the slots each KV head attends per step (None = all); other keyword arguments:
    ``temperature``, ``top_p``, ``seed``, ``stop_ids``, ``stats`` (a ``DecodeStats`` to fill) and
    the selection's (``budget_fraction``, ``sink``, ``recent``, ``selection_cache``). Stops at the
    tokenizer's end-of-turn / end-of-sequence token (included in the output) or after
    ``max_new_tokens``. Greedy unless ``temperature`` > 0.
    """
    return list(stream(model, tokenizer_or_none, cache, query_ids, max_new_tokens, selection, budget, **kwargs))


def generate_remote(model, tokenizer_or_none, store, key: str, query_ids: torch.Tensor, max_new_tokens: int,
                    budget: int, *, page_cache_bytes: int = 256 << 20, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, stop_ids: set[int] | None = None, stats: DecodeStats | None = None,
                    fetch: FetchStats | None = None):
    """Like ``generate`` with ``selection="pages"``, reading the entry ``key`` page by page from
    ``store`` (a ``StoreClient``) instead of holding it. Fetches the page summaries now, then
    returns an iterator of tokens as they come.

    Raises ``EntryLost`` when the store misses the entry (recompute it through prefill), now or
    while iterating.
    """
    _check_query(query_ids)
    stats = stats if stats is not None else DecodeStats()
    fetch = fetch if fetch is not None else FetchStats()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    param = next(model.parameters())
    entry = RemoteEntry(store, key, param.dtype, param.device, PageCache(page_cache_bytes), fetch)
    check_geometry(model, len(entry.layers), entry.num_kv_heads, entry.head_dim, key)
    recorder: list[float] = []
    dkv = paged_cache(entry, budget, recorder)
    stats.cached_slots = round(sum(int(layer.num_pages.sum()) for layer in entry.layers) * entry.page_size
                               / (len(entry.layers) * entry.num_kv_heads))

    def record_step() -> None:
        fetch.bytes_per_step.append(entry.step_bytes)
        fetch.pages_per_step.append(entry.step_pages)
        entry.step_bytes = entry.step_pages = 0

    return _no_grad(_tokens(model, tokenizer_or_none, dkv, recorder, query_ids, max_new_tokens, temperature, top_p,
                            seed, stop_ids, stats, on_step=record_step))


def check_geometry(model, num_layers: int, num_kv_heads: int, head_dim: int, key: str) -> None:
    """Raise ``ValueError`` unless an entry has the model's layers, KV heads and head dim."""
    info = model_info(model)
    if (num_layers, num_kv_heads, head_dim) != (info.num_layers, info.num_kv_heads, info.head_dim):
        raise ValueError(f"entry {key} has {num_layers} layers x {num_kv_heads} KV heads x head dim {head_dim}; "
                         f"the model has {info.num_layers} x {info.num_kv_heads} x {info.head_dim}")


def _no_grad(tokens):
    with torch.no_grad():
        yield from tokens


def _check_query(query_ids: torch.Tensor) -> None:
    if query_ids.dim() != 2 or query_ids.shape[0] != 1 or query_ids.shape[1] < 1:
        raise ValueError(f"query_ids must be [1, T] with T >= 1, got {tuple(query_ids.shape)}")


def _tokens(model, tokenizer, dkv: DkvCache, selected: list[float], query_ids, max_new_tokens, temperature, top_p,
            seed, stop_ids, stats: DecodeStats, on_step=lambda: None):
    """The decoding loop shared by local and paged caches: yields each token."""
    stop = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    started = time.perf_counter()
    logits = model(input_ids=query_ids, cache=dkv, use_cache=True, logits_to_keep=1).logits[0, -1]
    stats.query_seconds = time.perf_counter() - started
    on_step()
    for produced in range(1, max_new_tokens + 1):
        token = _pick(logits, temperature, top_p, generator)
        yield token
        if token in stop or produced == max_new_tokens:
            return
        step = time.perf_counter()
        selected.clear()
        logits = model(input_ids=torch.tensor([[token]], device=query_ids.device), cache=dkv,
                       use_cache=True).logits[0, -1]
        stats.seconds_per_token.append(time.perf_counter() - step)
        stats.selected_per_step.append(sum(selected) / max(len(selected), 1))
        stats.steps += 1
        on_step()
