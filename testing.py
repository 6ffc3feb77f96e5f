"""Synthetic entries of real shapes, for the tests, benchmarks and load tests that need no model.

Test data, not storage: so it lives beside the package's other entry points (as ``numpy.testing``
and ``torch.testing`` do), not in ``kvstore/``, and bench/ and loadtest/ (which may not import each
other, nor tests/) share it from here. It imports only ``kvstore``.
"""

from __future__ import annotations

import torch

from dkv.kvstore import quant
from dkv.kvstore.entry import CompressedKV, Identity, Recipe, make_layer, quantize_layer
from dkv.kvstore.prefix import chain_hashes


def synthetic_entry(
    seq_len: int = 256,
    num_layers: int = 2,
    num_kv_heads: int = 3,
    head_dim: int = 64,
    keep_fraction: float = 1.0,
    dtype: torch.dtype = torch.float16,
    quant_scheme: str = "none",
    page_size: int = 16,
    importance: float = 1.0,
    seed: int = 0,
    tenant: str = "default",
    model_fingerprint: str = "synthetic-model",
    token_ids: list[int] | None = None,
) -> CompressedKV:
    """An entry with random K/V that keeps ``keep_fraction`` of ``seq_len`` tokens per head.

    Every head keeps its own random positions (the first token always) with random scores.
    """
    gen = torch.Generator().manual_seed(seed)
    recipe = Recipe(
        method="full" if keep_fraction >= 1 else "synthetic", ratio=round(1 - keep_fraction, 6), quant=quant_scheme
    )
    tokens = token_ids if token_ids is not None else torch.randint(0, 49152, (seq_len,), generator=gen).tolist()
    identity = Identity(
        model_fingerprint,
        recipe,
        tuple(chain_hashes(tokens, recipe.chunk_size, model_fingerprint, recipe.recipe_id)),
        len(tokens),
        tenant,
    )
    keep = max(1, round(len(tokens) * keep_fraction))
    layers = []
    for _ in range(num_layers):
        positions, keys, values, scores = [], [], [], []
        for _ in range(num_kv_heads):
            rest = torch.randperm(len(tokens) - 1, generator=gen)[: keep - 1] + 1
            positions.append(torch.cat([torch.zeros(1, dtype=torch.long), rest]))
            keys.append(torch.randn(keep, head_dim, generator=gen).to(dtype))
            values.append(torch.randn(keep, head_dim, generator=gen).to(dtype))
            scores.append(torch.rand(keep, generator=gen))
        layer = make_layer(positions, keys, values, scores, page_size)
        if quant_scheme != "none":
            layer = quantize_layer(layer, quant.bits_for_scheme(quant_scheme, layer.scores), page_size)
        layers.append(layer)
    return CompressedKV(identity, layers, num_kv_heads, head_dim, page_size, importance)
