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

from dkv.kvstore.entry import EntryKey, Identity, Recipe
from dkv.kvstore.errors import InvalidEntry

DIGEST_BYTES = 16


def _as_uint32(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise InvalidEntry(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
        raise InvalidEntry("token ids must be integers in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def chain_hashes(
    token_ids: Sequence[int] | np.ndarray, chunk_size: int, model_fingerprint: str, recipe_id: str
) -> list[str]:
    """Hex hash of every chunk boundary: one per ``chunk_size`` tokens, the last chunk may be partial."""
    tokens = _as_uint32(token_ids)
    h = hashlib.blake2b(f"{model_fingerprint}\0{recipe_id}".encode(), digest_size=DIGEST_BYTES).digest()
    out = []
    for start in range(0, len(tokens), chunk_size):
        h = hashlib.blake2b(h + tokens[start : start + chunk_size].tobytes(), digest_size=DIGEST_BYTES).digest()
        out.append(h.hex())
    return out


def longest_cached_prefix(
    token_ids: Sequence[int] | np.ndarray,
    recipe: Recipe,
    model_fingerprint: str,
    tenant: str,
    starts_of: Callable[[list[EntryKey]], Sequence[int | None]],
) -> tuple[list[EntryKey], int] | None:
    """The entries that together cover the longest cached prefix of ``token_ids``, and its length.

    ``starts_of(keys)`` is asked once, for the key of every chunk boundary (``chunk_keys``), so a
    store can look them up in one batch; see ``longest_chain``.
    """
    keys = chunk_keys(token_ids, recipe, model_fingerprint, tenant)
    return longest_chain(keys, starts_of(keys), recipe.chunk_size, len(token_ids))


def longest_chain(
    keys: Sequence[EntryKey], starts: Sequence[int | None], chunk_size: int, context_tokens: int
) -> tuple[list[EntryKey], int] | None:
    """The longest prefix of a context of ``context_tokens`` tokens that stored entries cover: the
    chain of their keys, in order (one key for a whole-context entry), and its length; or None.

    ``keys`` end at every chunk boundary and at the full length (``chunk_keys``, made once by the
    caller). ``starts[i]`` is the first position of ``keys[i]``'s stored entry (None if absent): 0
    for a whole-context entry, the chunk start for a chunked recipe's entry, which only counts when
    the entries before it reach its start.
    """
    chains: dict[int, list[EntryKey]] = {0: []}  # entries covering [0, end), by end
    best = None
    for i, (key, start) in enumerate(zip(keys, starts)):
        if start is None or start not in chains:
            continue
        end = min((i + 1) * chunk_size, context_tokens)
        chains[end] = chains[start] + [key]
        best = (chains[end], end)
    return best


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray, recipe: Recipe, model_fingerprint: str, tenant: str
) -> list[EntryKey]:
    """The key an entry ending at each chunk boundary of ``token_ids`` (and at its end) has."""
    recipe_id = recipe.recipe_id  # a JSON dump and a hash: once, not once per chunk
    return [
        EntryKey(tenant, model_fingerprint, recipe_id, h)
        for h in chain_hashes(token_ids, recipe.chunk_size, model_fingerprint, recipe_id)
    ]


def check_chain(identities: Sequence[Identity]) -> None:
    """Raise ``ValueError`` unless these entries, in this order, are the chunks of one context.

    They must share the model, recipe and tenant; the first starts at 0; each starts where the
    one before ends (no gap, no overlap); and each one's chained chunk hashes extend the previous
    one's, so they hold the chunks of the same tokens, not equally long spans of other prompts.
    One entry of a whole context (start 0) is a chain of one.
    """
    if not identities:
        raise ValueError("no entries: a context needs at least one")
    first = identities[0]
    if first.start != 0:
        raise ValueError(
            f"the first entry starts at token {first.start}, not 0: the chunks before it are missing "
            "or the keys are out of order"
        )
    for i, (before, ident) in enumerate(zip(identities, identities[1:]), start=1):
        for part in ("model_fingerprint", "recipe", "tenant"):
            if getattr(ident, part) != getattr(first, part):
                raise ValueError(
                    f"entry {i} has another {part} than entry 0: chunks of one context share the model, "
                    "recipe and tenant"
                )
        if ident.start != before.seq_len:
            raise ValueError(
                f"entry {i} covers tokens [{ident.start}, {ident.seq_len}) but entry {i - 1} ends at "
                f"{before.seq_len}: chunk keys must be consecutive, in order, without gaps"
            )
        if ident.chunk_hashes[: len(before.chunk_hashes)] != before.chunk_hashes:
            raise ValueError(
                f"entry {i} is a chunk of other tokens than entry {i - 1}: its chained hashes do not "
                f"extend entry {i - 1}'s"
            )
