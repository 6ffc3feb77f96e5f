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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dkv.kvstore import quant as kvquant
from dkv.kvstore.entry import CompressedKV, EntryKey, Identity, Recipe, make_layer, quantize_layer
from dkv.kvstore.prefix import chunk_keys
from dkv.workers.cache import DkvCache, DkvLayer
from dkv.workers.capture import LayerCapture, prefill
from dkv.workers.methods import Method, group_heads, make_method


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


@dataclass(frozen=True)
class PrefillPlan:
    """One context's prefill, decided once per request: the recipe, the method it names (built and
    checked here, once), and the key of the entry that ends at each chunk boundary of the tokens
    (and at their end). The prefill worker makes it, finds the entries it or the store holds with
    its keys, and hands it whole to ``compress_plan``; nothing is hashed or validated again."""

    recipe: Recipe
    method: Method
    token_ids: list[int]
    fingerprint: str
    tenant: str
    keys: list[EntryKey]  # one per chunk of recipe.chunk_size tokens, the last chunk may be partial

    @classmethod
    def make(cls, recipe: Recipe, token_ids: Sequence[int], fingerprint: str, tenant: str = "default") -> PrefillPlan:
        """Raises ``ValueError`` saying what is wrong with the recipe's method or its parameters."""
        if recipe.method == "full" and (recipe.ratio or recipe.budget):
            raise ValueError(
                f"method 'full' keeps every token: use ratio 0 and no budget (got ratio {recipe.ratio}, "
                f"budget {recipe.budget}), or a compression method such as snapkv"
            )
        method = make_method(recipe.method, **method_params(recipe))
        token_ids = list(token_ids)
        return cls(recipe, method, token_ids, fingerprint, tenant, chunk_keys(token_ids, recipe, fingerprint, tenant))

    def end(self, chunk: int) -> int:
        """The token the entry of chunks ``0..chunk`` ends at."""
        return min((chunk + 1) * self.recipe.chunk_size, len(self.token_ids))


def method_params(recipe: Recipe) -> dict[str, float]:
    """The method's own parameters in ``recipe.params`` (``merge`` is the compressor's)."""
    return {k: v for k, v in recipe.params if k != "merge"}


def compress(
    model,
    input_ids: torch.Tensor,
    method: str = "full",
    ratio: float = 0.0,
    *,
    budget: int = 0,
    quant: str = "none",
    merge: bool = False,
    tenant: str = "default",
    page_size: int = 16,
    timings: dict | None = None,
    **params,
) -> CompressedKV:
    """Prefill ``input_ids`` ``[1, T]`` and compress its KV cache with ``method``.

    ``ratio`` is the fraction of tokens removed per layer on average (0.75 keeps a quarter, as in
    kvpress); ``budget`` (tokens per KV head) overrides it. ``quant``: none, int8, int4 or mixed
    (ZipCache: the most important 60% of tokens at 4 bits, the rest at 2). ``merge``: merge
    evicted tokens into their most similar kept token (D2O). ``timings``, if given, receives
    ``prefill_s`` (the model's forward and the capture) and ``compress_s`` (the rest). ``params``:
    the method's own.
    """
    plan = _plan(model, input_ids, _recipe(method, ratio, budget, quant, merge, 0, params), tenant)
    return compress_plan(model, plan, page_size=page_size, timings=timings)[0]


def compress_chunks(
    model,
    input_ids: torch.Tensor,
    method: str = "full",
    ratio: float = 0.0,
    *,
    budget: int = 0,
    quant: str = "none",
    merge: bool = False,
    chunk_size: int = 256,
    tenant: str = "default",
    page_size: int = 16,
    cached: Sequence[CompressedKV] = (),
    timings: dict | None = None,
    **params,
) -> list[CompressedKV]:
    """The chunked recipe: one entry per chunk of ``chunk_size`` tokens (see module docstring).

    ``cached`` are the entries of the first chunks when a store already has them: only the
    rest is prefilled. Returns the entries of every chunk, cached ones first. ``timings`` as
    in ``compress``, summed over the chunks.
    """
    plan = _plan(model, input_ids, _recipe(method, ratio, budget, quant, merge, chunk_size, params), tenant)
    return compress_plan(model, plan, cached=cached, page_size=page_size, timings=timings)


def compress_plan(
    model, plan: PrefillPlan, *, cached: Sequence[CompressedKV] = (), page_size: int = 16, timings: dict | None = None
) -> list[CompressedKV]:
    """The entries of ``plan``: one per chunk for a chunked recipe, after the ``cached`` first
    chunks (which are returned first); one of the whole context otherwise."""
    if not plan.recipe.chunked:
        if cached:
            raise ValueError("cached entries are chunks of a chunked recipe; this recipe compresses the whole context")
        return [_compress(model, plan, len(plan.keys), page_size, past=None, timings=timings)]
    entries = list(cached)
    for e in entries:
        if e.identity.recipe != plan.recipe:
            raise ValueError(f"cached entry {e.key} has recipe {e.identity.recipe}, not {plan.recipe}")
    for chunk in range(len(entries), len(plan.keys)):
        past = _past_cache(entries, model) if entries else None
        entries.append(_compress(model, plan, chunk + 1, page_size, past=past, timings=timings))
    return entries


def _plan(model, input_ids: torch.Tensor, recipe: Recipe, tenant: str) -> PrefillPlan:
    fingerprint = getattr(model, "dkv_fingerprint", None)
    if fingerprint is None:
        raise ValueError(
            "the model has no fingerprint: load it with workers.model.load_model, or call "
            "dkv.workers.model.model_fingerprint(model, tokenizer) once before compressing"
        )
    return PrefillPlan.make(recipe, input_ids[0].tolist(), fingerprint, tenant)


def _recipe(method, ratio, budget, quant, merge, chunk_size, params) -> Recipe:
    """The recipe of ``compress``'s arguments; ``ValueError`` for a ratio, budget or quant out of range."""
    _n_keep(1, ratio, budget)  # ValueError for a ratio outside [0, 1) or a negative budget
    if quant not in kvquant.SCHEMES:
        raise ValueError(f"quant {quant!r} must be one of {sorted(kvquant.SCHEMES)}")
    extra = dict(params)
    if merge:
        extra["merge"] = 1.0
    return Recipe(
        method=method,
        ratio=ratio,
        budget=budget,
        quant=quant,
        chunk_size=chunk_size or 256,
        chunked=bool(chunk_size),
        params=tuple(extra.items()),
    )


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


def _compress(
    model, plan: PrefillPlan, chunks: int, page_size: int, past: DkvCache | None, timings: dict | None
) -> CompressedKV:
    """The entry of the plan's first ``chunks`` chunks; ``past`` holds those before the new tokens."""
    recipe, method = plan.recipe, plan.method
    ids = torch.tensor([plan.token_ids[: plan.end(chunks - 1)]])
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
    identity = Identity(
        plan.fingerprint,
        recipe,
        tuple(k.prefix_hash for k in plan.keys[:chunks]),
        ids.shape[1],
        plan.tenant,
        start=start,
    )
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + prefilled - started
        timings["compress_s"] = timings.get("compress_s", 0.0) + time.perf_counter() - prefilled
    return CompressedKV(
        identity, layers, capture.num_kv_heads, capture.head_dim, page_size, importance=min(1.0, max(0.0, importance))
    )


def _attention_mass(cap: LayerCapture, num_kv_heads: int) -> torch.Tensor | None:
    """Attention each new token received from the observation window (or all queries), ``[H_kv, n]``."""
    if cap.window_attention is not None:
        return group_heads(cap.window_attention[..., cap.new_slice].sum(1), num_kv_heads)
    if cap.attention_colsum is not None:
        return group_heads(cap.attention_colsum[:, cap.new_slice], num_kv_heads)
    return None
