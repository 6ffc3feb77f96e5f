"""Chained hashes of fixed token chunks, and the longest-cached-prefix query.

``h_0 = blake2b(model_fingerprint, recipe_id)`` and ``h_i = blake2b(h_{i-1} || tokens of chunk i)``
with tokens as little-endian uint32. The last chunk may be partial. An entry for a context of
``T`` tokens is keyed by its last hash, so a longer prompt that starts with the same ``T`` tokens
reproduces that hash at ``T`` when ``T`` is a chunk boundary, and the store finds the entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from dkv.kvstore.entry import EntryKey, Recipe
from dkv.kvstore.errors import InvalidEntry

DIGEST_BYTES = 16


def _as_uint32(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise InvalidEntry(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
        raise InvalidEntry("token ids must be integers in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def chain_hashes(token_ids: Sequence[int] | np.ndarray, chunk_size: int, model_fingerprint: str, recipe_id: str) -> list[str]:
    """Hex hash of every chunk boundary: one per ``chunk_size`` tokens, the last chunk may be partial."""
    tokens = _as_uint32(token_ids)
    h = hashlib.blake2b(f"{model_fingerprint}\0{recipe_id}".encode(), digest_size=DIGEST_BYTES).digest()
    out = []
    for start in range(0, len(tokens), chunk_size):
        h = hashlib.blake2b(h + tokens[start:start + chunk_size].tobytes(), digest_size=DIGEST_BYTES).digest()
        out.append(h.hex())
    return out


def longest_cached_prefix(
    token_ids: Sequence[int] | np.ndarray,
    recipe: Recipe,
    model_fingerprint: str,
    tenant: str,
    start_of: Callable[[EntryKey], int | None],
) -> tuple[list[EntryKey], int] | None:
    """The entries that together cover the longest cached prefix of ``token_ids``, and its length.

    Candidates end at every chunk boundary and at the full length. ``start_of(key)`` is the first
    position of a stored entry (None if absent): 0 for a whole-context entry, the chunk start for
    a chunked recipe's entry, which only counts when the entries before it reach its start.
    Returns the chain of keys in order (one key for a whole-context entry), or None.
    """
    keys = chunk_keys(token_ids, recipe, model_fingerprint, tenant)
    return longest_chain(keys, len(token_ids), recipe.chunk_size, start_of)


def chunk_keys(token_ids: Sequence[int] | np.ndarray, recipe: Recipe, model_fingerprint: str,
               tenant: str) -> list[EntryKey]:
    """The key an entry ending at each chunk boundary of ``token_ids`` (and at its end) has."""
    return [EntryKey(tenant, model_fingerprint, recipe.recipe_id, h)
            for h in chain_hashes(token_ids, recipe.chunk_size, model_fingerprint, recipe.recipe_id)]


def longest_chain(keys: list[EntryKey], n_tokens: int, chunk_size: int,
                  start_of: Callable[[EntryKey], int | None]) -> tuple[list[EntryKey], int] | None:
    """``longest_cached_prefix`` over the ``chunk_keys`` of an ``n_tokens`` prompt."""
    chains: dict[int, list[EntryKey]] = {0: []}
    best = None
    for i, key in enumerate(keys):
        start = start_of(key)
        if start is None or start not in chains:
            continue
        end = min((i + 1) * chunk_size, n_tokens)
        chains[end] = chains[start] + [key]
        best = (chains[end], end)
    return best
