"""``compress``: prefill a context, keep what matters, build the entry.

The methods are small dataclasses in one registry (``workers.methods.METHODS``, by name, as
requests name them). A method scores the new tokens of every layer (``score``: ``[H_kv, n]``,
higher = keep; GQA scores are aggregated over the query heads of each KV head) and may split the
budget unevenly over layers (``budgets``). Everything else lives here once: the prefill capture it asks for, the
per-head top-k and gather, optional D2O-style merging of evicted tokens, quantization, the
entry's importance, and the chunked recipe.

Chunked recipe (prefix reuse): the context is cut into chunks of ``chunk_size`` tokens; chunk c is
prefilled on top of the compressed chunks before it and compressed using only what it saw, so
the entries of a prefix's chunks are the same for every longer prompt, and the store's
longest-prefix lookup can hand them to any prompt that starts with that prefix.
"""

from __future__ import annotations

import time

import torch

from dkv.kvstore import quant as kvquant
from dkv.kvstore.entry import CompressedKV, Identity, Recipe, make_layer, quantize_layer
from dkv.kvstore.prefix import chain_hashes
from dkv.workers.cache import DkvCache, DkvLayer
from dkv.workers.capture import LayerCapture, prefill
from dkv.workers.methods import group_heads, make_method


def _n_keep(n: int, ratio: float, budget: int) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} must be in [0, 1): it is the fraction of tokens removed")
    if budget < 0:
        raise ValueError(f"budget {budget} must be >= 0 (0 = use ratio)")
    keep = budget if budget else round(n * (1.0 - ratio))
    return max(1, min(n, keep))


def _finite_scores(s: torch.Tensor) -> torch.Tensor:
    """Protected tokens score +inf; store them as the layer's highest finite score instead."""
    finite = s[torch.isfinite(s)]
    top = float(finite.max()) if finite.numel() else 1.0
    return torch.nan_to_num(s.float(), nan=0.0, posinf=top, neginf=float(finite.min()) if finite.numel() else 0.0)


def compress(model, input_ids: torch.Tensor, method: str = "full", ratio: float = 0.0, *, budget: int = 0,
             quant: str = "none", merge: bool = False, tenant: str = "default", page_size: int = 16,
             timings: dict | None = None, **params) -> CompressedKV:
    """Prefill ``input_ids`` ``[1, T]`` and compress its KV cache with ``method``.

    ``ratio`` is the fraction of tokens removed per layer on average (0.75 keeps a quarter, as in
    kvpress); ``budget`` (tokens per KV head) overrides it. ``quant``: none, int8, int4 or mixed
    (ZipCache: the most important 60% of tokens at 4 bits, the rest at 2). ``merge``: merge
    evicted tokens into their most similar kept token (D2O). ``timings``, if given, receives
    ``prefill_s`` (the model's forward and the capture) and ``compress_s`` (the rest). ``params``:
    the method's own.
    """
    return _compress(model, input_ids, _recipe(method, ratio, budget, quant, merge, 0, params), tenant,
                     page_size, past=None, timings=timings)


def compress_chunks(model, input_ids: torch.Tensor, method: str = "full", ratio: float = 0.0, *,
                    budget: int = 0, quant: str = "none", merge: bool = False, chunk_size: int = 256,
                    tenant: str = "default", page_size: int = 16, cached: list[CompressedKV] = (),
                    timings: dict | None = None, **params) -> list[CompressedKV]:
    """The chunked recipe: one entry per chunk of ``chunk_size`` tokens (see module docstring).

    ``cached`` are the entries of the first chunks when a store already has them: only the
    rest is prefilled. Returns the entries of every chunk, cached ones first. ``timings`` as
    in ``compress``, summed over the chunks.
    """
    recipe = _recipe(method, ratio, budget, quant, merge, chunk_size, params)
    ids = input_ids[0]
    entries = list(cached)
    for e in entries:
        if e.identity.recipe != recipe:
            raise ValueError(f"cached entry {e.key} has recipe {e.identity.recipe}, not {recipe}")
    start = entries[-1].seq_len if entries else 0
    while start < len(ids):
        end = min(start + chunk_size, len(ids))
        past = _past_cache(entries, model) if entries else None
        entries.append(_compress(model, ids[:end].unsqueeze(0), recipe, tenant, page_size, past=past,
                                 timings=timings))
        start = end
    return entries


def _recipe(method, ratio, budget, quant, merge, chunk_size, params) -> Recipe:
    make_method(method, **params)  # validates the name and the parameters
    _n_keep(1, ratio, budget)  # ValueError for a ratio outside [0, 1) or a negative budget
    if method == "full" and (ratio or budget):
        raise ValueError(f"method 'full' keeps every token: use ratio 0 and no budget (got ratio {ratio}, budget "
                         f"{budget}), or a compression method such as snapkv")
    if quant not in kvquant.SCHEMES:
        raise ValueError(f"quant {quant!r} must be one of {sorted(kvquant.SCHEMES)}")
    extra = dict(params)
    if merge:
        extra["merge"] = 1.0
    return Recipe(method=method, ratio=ratio, budget=budget, quant=quant, chunk_size=chunk_size or 256,
                  chunked=bool(chunk_size), params=tuple(extra.items()))


def _past_cache(entries: list[CompressedKV], model) -> DkvCache:
    """One DkvCache holding the chunk entries ``entries`` back to back."""
    from dkv.workers.cache import to_hf_cache

    dtype = next(model.parameters()).dtype
    caches = [to_hf_cache(e, dtype=dtype) for e in entries]
    layers = []
    for per_layer in zip(*(c.layers for c in caches)):
        layers.append(_concat_layers(list(per_layer)))
    return DkvCache(layers)


def _concat_layers(parts: list[DkvLayer]) -> DkvLayer:
    """Concatenate per-chunk layers slot-wise; a head's padding stays masked."""
    keys = torch.cat([p.keys for p in parts], dim=2)
    values = torch.cat([p.values for p in parts], dim=2)
    positions = torch.cat([p.positions for p in parts], dim=1)
    valid = positions >= 0
    return DkvLayer(keys, values, None if bool(valid.all()) else valid, positions, parts[-1].logical_length)


def _compress(model, ids: torch.Tensor, recipe: Recipe, tenant: str, page_size: int, past: DkvCache | None,
              timings: dict | None) -> CompressedKV:
    fingerprint = getattr(model, "dkv_fingerprint", None)
    if fingerprint is None:
        raise ValueError("the model has no fingerprint: load it with workers.model.load_model, or call "
                         "dkv.workers.model.model_fingerprint(model, tokenizer) once before compressing")
    method = make_method(recipe.method, **{k: v for k, v in recipe.params if k != "merge"})
    start = past.get_seq_length() if past is not None else 0
    new_ids = ids[:, start:]
    if model.config._attn_implementation != "dkv":
        model.set_attn_implementation("dkv")
    started = time.perf_counter()
    capture = prefill(model, new_ids, window=method.window, colsum=method.needs_colsum, past=past)
    prefilled = time.perf_counter()
    n = new_ids.shape[1]
    n_keep = _n_keep(n, recipe.ratio, recipe.budget)
    scores = [method.score(i, cap, capture).float() for i, cap in enumerate(capture.layers)]
    if method.share_heads:
        scores = [s.mean(0, keepdim=True).expand_as(s).clone() for s in scores]
    budgets = [max(1, min(n, b)) for b in method.budgets(scores, n_keep, capture)]
    merge = dict(recipe.params).get("merge", 0.0) > 0
    layers, kept_mass, total_mass = [], 0.0, 0.0
    tau = None
    for cap, score, keep in zip(capture.layers, scores, budgets):
        new = cap.new_slice
        idx = torch.topk(score, keep, dim=1).indices.sort(dim=1).values  # [H_kv, keep]
        keys = cap.keys[:, new]
        values = cap.values[:, new]
        if merge and keep < n:
            from dkv.workers.merge import d2o_merge

            keys, values, tau = d2o_merge(keys, values, idx, tau)
        head_keys = [keys[h, idx[h]] for h in range(len(idx))]
        head_values = [values[h, idx[h]] for h in range(len(idx))]
        positions = [cap.positions[h, new][idx[h]] for h in range(len(idx))]
        stored = _finite_scores(score)
        layer = make_layer(positions, head_keys, head_values, [stored[h, idx[h]] for h in range(len(idx))], page_size)
        if recipe.quant != "none":
            layer = quantize_layer(layer, kvquant.bits_for_scheme(recipe.quant, layer.scores), page_size)
        layers.append(layer)
        mass = _attention_mass(cap, capture.num_kv_heads)
        if mass is not None:
            kept_mass += float(torch.gather(mass, 1, idx).sum())
            total_mass += float(mass.sum())
    importance = kept_mass / total_mass if total_mass > 0 else sum(budgets) / (len(budgets) * n)
    tokens = ids[0].tolist()
    identity = Identity(fingerprint, recipe, tuple(chain_hashes(tokens, recipe.chunk_size, fingerprint, recipe.recipe_id)),
                        len(tokens), tenant, start=start)
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + prefilled - started
        timings["compress_s"] = timings.get("compress_s", 0.0) + time.perf_counter() - prefilled
    return CompressedKV(identity, layers, capture.num_kv_heads, capture.head_dim, page_size,
                        importance=min(1.0, max(0.0, importance)))


def _attention_mass(cap: LayerCapture, num_kv_heads: int) -> torch.Tensor | None:
    """Attention each new token received from the observation window (or all queries), ``[H_kv, n]``."""
    if cap.window_attention is not None:
        return group_heads(cap.window_attention[..., cap.new_slice].sum(1), num_kv_heads)
    if cap.attention_colsum is not None:
        return group_heads(cap.attention_colsum[:, cap.new_slice], num_kv_heads)
    return None

