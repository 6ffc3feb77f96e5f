"""Decoding from a compressed entry with query-aware sparse attention, in-process.

``generate`` continues a ``CompressedKV`` (or the entries of a context's chunks) at its original
length with the decode worker's batched decoder (``workers.engine.Batch``), one stream: the query
tokens attend to the whole cache (one pass), then every generated token attends to the slots its
selection keeps (``workers.selection``; ``dense`` is plain attention). Greedy by default;
``temperature``/``top_p`` sample.

``generate_remote`` is paged decoding: the entry stays in the store and each step fetches only
the pages its selection needs (``workers.paged``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from dkv.kvstore.entry import CompressedKV
from dkv.workers.batch import RowSelection
from dkv.workers.cache import ATTN_IMPLEMENTATION, DkvCache
from dkv.workers.engine import DENSE_LAYERS, Batch, DecodeStats, Sampler, Stream
from dkv.workers.model import model_info
from dkv.workers.paged import FetchStats, RemoteEntry, page_cache, paged_cache
from dkv.workers.selection import Dense, Pages, SelectionCache, SlotView, make_selection


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


def stream(
    model,
    tokenizer_or_none,
    entries: CompressedKV | Sequence[CompressedKV],
    query_ids: torch.Tensor,
    max_new_tokens: int,
    selection: str = "dense",
    budget: int | None = None,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | None = None,
    stats: DecodeStats | None = None,
    budget_fraction: float = 0.0,
    selection_cache: float = 0.0,
    dense_layers: int = DENSE_LAYERS,
    pick: Callable[[torch.Tensor], int] | None = None,
    observe: Callable[[int, torch.Tensor, SlotView], None] | None = None,
    **params,
):
    """``generate`` as an iterator: each token as soon as it is chosen (a batch of one stream)."""
    entries = [entries] if isinstance(entries, CompressedKV) else list(entries)
    _check_query(query_ids)
    check_geometry(model, entries[0].num_layers, entries[0].num_kv_heads, entries[0].head_dim, str(entries[0].key))
    out: list[int] = []
    ended: list[BaseException | None] = []
    one = Stream(
        entries,
        query_ids[0].tolist(),
        max_new_tokens,
        out.append,
        ended.append,
        pick=pick or Sampler(temperature, top_p, seed),
        stop_ids=frozenset(stop_token_ids(model, tokenizer_or_none) if stop_ids is None else stop_ids),
        selection=row_selection(selection, budget or 0, budget_fraction, selection_cache, observe, **params),
        stats=stats if stats is not None else DecodeStats(),
    )
    batch = Batch(model, dense_layers)
    with torch.inference_mode():
        batch.join([one])
        while True:
            yield from out
            out.clear()
            if ended:
                break
            batch.step()
    if ended[0] is not None:
        raise ended[0]


def row_selection(
    selection: str,
    budget: int = 0,
    budget_fraction: float = 0.0,
    selection_cache: float = 0.0,
    observe: Callable[[int, torch.Tensor, SlotView], None] | None = None,
    **params,
) -> RowSelection | None:
    """The per-stream selection of the batched decoder; None for ``dense`` (plain attention)."""
    selector = make_selection(selection, budget=budget, budget_fraction=budget_fraction, **params)
    if isinstance(selector, Dense):
        return None
    page_size = selector.page_size if isinstance(selector, Pages) else 0
    if selection_cache:
        selector = SelectionCache(selector, threshold=selection_cache)
    return RowSelection(selector, page_size, observe)


def generate(
    model,
    tokenizer_or_none,
    entries: CompressedKV | Sequence[CompressedKV],
    query_ids: torch.Tensor,
    max_new_tokens: int,
    selection: str = "dense",
    budget: int | None = None,
    **kwargs,
) -> list[int]:
    """Generate after ``entries`` (a compressed context, or its chunks' entries) and ``query_ids`` ``[1, T]``.

    ``budget`` is the slots each KV head attends per step (None = all); other keyword arguments:
    ``temperature``, ``top_p``, ``seed``, ``stop_ids``, ``stats`` (a ``DecodeStats`` to fill), ``pick``
    (a function of the logits that returns the next token, instead of sampling), ``observe`` (called
    with each layer's choice: ``workers.batch.RowSelection``) and the selection's
    (``budget_fraction``, ``sink``, ``recent``, ``page_size``, ``selection_cache``). Stops at the
    tokenizer's end-of-turn / end-of-sequence token (included in the output) or after
    ``max_new_tokens``. Greedy unless ``temperature`` > 0. The same batched decoder as the decode
    worker's, with one stream.
    """
    return list(stream(model, tokenizer_or_none, entries, query_ids, max_new_tokens, selection, budget, **kwargs))


def generate_remote(
    model,
    tokenizer_or_none,
    store,
    key: str,
    query_ids: torch.Tensor,
    max_new_tokens: int,
    budget: int,
    *,
    page_cache_bytes: int = 256 << 20,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | None = None,
    stats: DecodeStats | None = None,
    fetch: FetchStats | None = None,
):
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
    entry = RemoteEntry(store, key, param.dtype, param.device, page_cache(page_cache_bytes), fetch)
    check_geometry(model, len(entry.layers), entry.num_kv_heads, entry.head_dim, key)
    recorder: list[float] = []
    dkv = paged_cache(entry, budget, recorder)
    stats.cached_slots = round(
        sum(int(layer.num_pages.sum()) for layer in entry.layers)
        * entry.page_size
        / (len(entry.layers) * entry.num_kv_heads)
    )

    def record_step() -> None:
        fetch.bytes_per_step.append(entry.step_bytes)
        fetch.pages_per_step.append(entry.step_pages)
        entry.step_bytes = entry.step_pages = 0

    return _paged_tokens(
        model,
        tokenizer_or_none,
        dkv,
        recorder,
        query_ids,
        max_new_tokens,
        Sampler(temperature, top_p, seed),
        stop_ids,
        stats,
        record_step,
    )


def check_geometry(model, num_layers: int, num_kv_heads: int, head_dim: int, key: str) -> None:
    """Raise ``ValueError`` unless an entry has the model's layers, KV heads and head dim."""
    info = model_info(model)
    if (num_layers, num_kv_heads, head_dim) != (info.num_layers, info.num_kv_heads, info.head_dim):
        raise ValueError(
            f"entry {key} has {num_layers} layers x {num_kv_heads} KV heads x head dim {head_dim}; "
            f"the model has {info.num_layers} x {info.num_kv_heads} x {info.head_dim}"
        )


def _check_query(query_ids: torch.Tensor) -> None:
    if query_ids.dim() != 2 or query_ids.shape[0] != 1 or query_ids.shape[1] < 1:
        raise ValueError(f"query_ids must be [1, T] with T >= 1, got {tuple(query_ids.shape)}")


def _paged_tokens(
    model,
    tokenizer,
    dkv: DkvCache,
    selected: list[float],
    query_ids,
    max_new_tokens,
    pick: Sampler,
    stop_ids,
    stats: DecodeStats,
    on_step,
):
    """Paged decoding's loop (its cache fetches pages as it goes): yields each token."""
    stop = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(input_ids=query_ids, cache=dkv, use_cache=True, logits_to_keep=1).logits[0, -1]
        stats.query_seconds = time.perf_counter() - started
        on_step()
    for produced in range(1, max_new_tokens + 1):
        token = pick(logits)
        yield token
        if token in stop or produced == max_new_tokens:
            return
        with torch.inference_mode():
            step = time.perf_counter()
            selected.clear()
            logits = model(
                input_ids=torch.tensor([[token]], device=query_ids.device), cache=dkv, use_cache=True
            ).logits[0, -1]
            stats.seconds_per_token.append(time.perf_counter() - step)
        stats.selected_per_step.append(sum(selected) / max(len(selected), 1))
        stats.steps += 1
        on_step()
