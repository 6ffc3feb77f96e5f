"""dkv.kvstore.prefix: chained chunk hashes and the longest-cached-prefix query."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dkv.kvstore.entry import EntryKey, Identity, Recipe
from dkv.kvstore.errors import InvalidEntry
from dkv.kvstore.prefix import (
    DIGEST_BYTES,
    chain_hashes,
    check_chain,
    chunk_keys,
    longest_cached_prefix,
    longest_chain,
)

MODEL = "model-a"
CHUNK = 8
RECIPE = Recipe(chunk_size=CHUNK)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


@pytest.mark.parametrize("n,expected", [(1, 1), (7, 1), (8, 1), (9, 2), (16, 2), (17, 3), (80, 10)])
def test_one_hash_per_chunk_partial_last_included(n, expected):
    hashes = chain_hashes(_tokens(n), CHUNK, MODEL, RECIPE.recipe_id)
    assert len(hashes) == expected
    assert all(len(h) == 2 * DIGEST_BYTES and int(h, 16) >= 0 for h in hashes)
    assert len(set(hashes)) == expected


def test_empty_prompt_has_no_hashes():
    assert chain_hashes([], CHUNK, MODEL, RECIPE.recipe_id) == []


def test_matches_documented_construction():
    tokens = _tokens(20)
    h = hashlib.blake2b(f"{MODEL}\0{RECIPE.recipe_id}".encode(), digest_size=DIGEST_BYTES).digest()
    want = []
    for start in range(0, 20, CHUNK):
        chunk = b"".join(t.to_bytes(4, "little") for t in tokens[start : start + CHUNK])
        h = hashlib.blake2b(h + chunk, digest_size=DIGEST_BYTES).digest()
        want.append(h.hex())
    assert chain_hashes(tokens, CHUNK, MODEL, RECIPE.recipe_id) == want


def test_deterministic_and_input_type_independent():
    tokens = _tokens(30)
    a = chain_hashes(tokens, CHUNK, MODEL, RECIPE.recipe_id)
    assert chain_hashes(list(tokens), CHUNK, MODEL, RECIPE.recipe_id) == a
    assert chain_hashes(tuple(tokens), CHUNK, MODEL, RECIPE.recipe_id) == a
    for dtype in (np.int64, np.int32, np.uint32, np.uint64):
        assert chain_hashes(np.array(tokens, dtype=dtype), CHUNK, MODEL, RECIPE.recipe_id) == a


def test_differs_by_model_recipe_and_every_token():
    tokens = _tokens(24)
    base = chain_hashes(tokens, CHUNK, MODEL, RECIPE.recipe_id)
    other_recipe = Recipe(chunk_size=CHUNK, quant="int8").recipe_id
    for hashes in (
        chain_hashes(tokens, CHUNK, "model-b", RECIPE.recipe_id),
        chain_hashes(tokens, CHUNK, MODEL, other_recipe),
    ):
        assert all(x != y for x, y in zip(hashes, base))
    # Separator: ("ab", "c") and ("a", "bc") do not collide.
    assert chain_hashes(tokens, CHUNK, "ab", "c") != chain_hashes(tokens, CHUNK, "a", "bc")
    for i in range(len(tokens)):
        changed = list(tokens)
        changed[i] += 1
        hashes = chain_hashes(changed, CHUNK, MODEL, RECIPE.recipe_id)
        chunk = i // CHUNK
        assert hashes[:chunk] == base[:chunk]  # earlier chunks unaffected
        assert all(x != y for x, y in zip(hashes[chunk:], base[chunk:]))  # this and every later one change


def test_token_order_and_length_matter():
    tokens = _tokens(16)
    base = chain_hashes(tokens, CHUNK, MODEL, RECIPE.recipe_id)
    swapped = tokens[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert chain_hashes(swapped, CHUNK, MODEL, RECIPE.recipe_id)[0] != base[0]
    # A partial last chunk is not the full chunk it starts.
    assert chain_hashes(tokens[:12], CHUNK, MODEL, RECIPE.recipe_id)[1] != base[1]
    # Token 0 is a real token: appending it changes the hash.
    assert (
        chain_hashes(tokens[:7] + [0], CHUNK, MODEL, RECIPE.recipe_id)[0]
        != chain_hashes(tokens[:7], CHUNK, MODEL, RECIPE.recipe_id)[0]
    )


def test_prefix_hashes_equal_those_of_longer_prompt():
    long = _tokens(100)
    long_hashes = chain_hashes(long, CHUNK, MODEL, RECIPE.recipe_id)
    for k in range(1, 100 // CHUNK + 1):
        short = chain_hashes(long[: k * CHUNK], CHUNK, MODEL, RECIPE.recipe_id)
        assert short == long_hashes[:k]
    for n in (3, 13, 99):  # partial chunks: the full chunks before them still match
        short = chain_hashes(long[:n], CHUNK, MODEL, RECIPE.recipe_id)
        assert short[:-1] == long_hashes[: n // CHUNK]


@pytest.mark.parametrize("bad", [[-1], [1, 2, -5], [1 << 32], [0.5, 1.0], ["1"], [True, False]])
def test_rejects_bad_token_values(bad):
    with pytest.raises(InvalidEntry, match="token ids"):
        chain_hashes(bad, CHUNK, MODEL, RECIPE.recipe_id)
    with pytest.raises(InvalidEntry, match="token ids"):
        longest_cached_prefix(bad, RECIPE, MODEL, "t", lambda keys: [0] * len(keys))


def test_accepts_largest_token_id():
    assert len(chain_hashes([(1 << 32) - 1], CHUNK, MODEL, RECIPE.recipe_id)) == 1


@pytest.mark.parametrize("bad", [[[1, 2], [3, 4]], np.zeros((2, 3), dtype=np.int64), 5])
def test_rejects_non_1d(bad):
    with pytest.raises(InvalidEntry, match="one-dimensional"):
        chain_hashes(bad, CHUNK, MODEL, RECIPE.recipe_id)
    if not isinstance(bad, int):
        with pytest.raises(InvalidEntry, match="one-dimensional"):
            longest_cached_prefix(bad, RECIPE, MODEL, "t", lambda keys: [0] * len(keys))


# ---------------------------------------------------------------------------------------------
# longest_cached_prefix


class Store:
    def __init__(self):
        self.starts: dict[EntryKey, int] = {}
        self.asked: list[EntryKey] = []

    def put(self, tokens, recipe=RECIPE, model=MODEL, tenant="t", start: int = 0) -> EntryKey:
        key = EntryKey(
            tenant, model, recipe.recipe_id, chain_hashes(tokens, recipe.chunk_size, model, recipe.recipe_id)[-1]
        )
        self.starts[key] = start
        return key

    def start_of(self, keys: list[EntryKey]) -> list[int | None]:
        self.asked += keys
        return [self.starts.get(key) for key in keys]


def test_nothing_stored_is_none():
    store = Store()
    assert longest_cached_prefix(_tokens(40), RECIPE, MODEL, "t", store.start_of) is None
    assert len(store.asked) == 5  # every chunk boundary was asked


def test_empty_prompt_is_none():
    assert longest_cached_prefix([], RECIPE, MODEL, "t", lambda keys: [0] * len(keys)) is None


def test_longest_chunk_boundary_wins():
    prompt = _tokens(45)  # boundaries 8, 16, 24, 32, 40 and the full 45
    store = Store()
    k16 = store.put(prompt[:16])
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k16], 16)
    k32 = store.put(prompt[:32])
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k32], 32)
    store.put(prompt[:8])
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k32], 32)


def test_exact_full_length_including_partial_chunk():
    prompt = _tokens(45)
    store = Store()
    store.put(prompt[:40])
    k45 = store.put(prompt)
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k45], 45)
    # A longer prompt cannot use the partial-chunk entry (45 is no boundary of it), only 40.
    longer = prompt + _tokens(10, seed=9)
    result = longest_cached_prefix(longer, RECIPE, MODEL, "t", store.start_of)
    assert result is not None and result[1] == 40


def test_exact_full_length_on_boundary():
    prompt = _tokens(48)
    store = Store()
    k = store.put(prompt)
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k], 48)
    assert longest_cached_prefix(prompt + [1, 2, 3], RECIPE, MODEL, "t", store.start_of) == ([k], 48)


def test_prefix_of_other_tokens_not_found():
    prompt = _tokens(40)
    store = Store()
    store.put(_tokens(40, seed=5)[:16])
    other = list(prompt)
    other[20] += 1
    store.put(other[:24])  # shares 16 tokens, but not 24: its key is not our 24-token key
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) is None


def test_never_a_key_of_another_tenant_model_or_recipe():
    prompt = _tokens(40)
    store = Store()
    store.put(prompt, tenant="other")
    store.put(prompt, model="model-b")
    store.put(prompt, recipe=Recipe(chunk_size=CHUNK, quant="int4"))
    store.put(prompt, recipe=Recipe(chunk_size=CHUNK, ratio=0.5, method="snapkv"))
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) is None
    for key in store.asked:
        assert (key.tenant, key.model_fingerprint, key.recipe_id) == ("t", MODEL, RECIPE.recipe_id)
    mine = store.put(prompt[:24])
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([mine], 24)


def test_chunk_size_of_recipe_is_used():
    prompt = _tokens(40)
    r16 = Recipe(chunk_size=16)
    store = Store()
    k = store.put(prompt[:32], recipe=r16)
    assert longest_cached_prefix(prompt, r16, MODEL, "t", store.start_of) == ([k], 32)
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) is None


def test_accepts_numpy_prompt():
    prompt = np.array(_tokens(40), dtype=np.int64)
    store = Store()
    k = store.put(prompt[:24].tolist())
    assert longest_cached_prefix(prompt, RECIPE, MODEL, "t", store.start_of) == ([k], 24)


def test_chunk_entries_count_only_as_an_unbroken_chain_from_the_start():
    prompt = _tokens(40)  # boundaries 8, 16, 24, 32, 40
    chunked = Recipe(chunk_size=CHUNK, chunked=True)
    store = Store()
    c1 = store.put(prompt[:8], recipe=chunked)
    c2 = store.put(prompt[:16], recipe=chunked, start=8)
    c4 = store.put(prompt[:32], recipe=chunked, start=24)  # chunk 3 is missing
    assert longest_cached_prefix(prompt, chunked, MODEL, "t", store.start_of) == ([c1, c2], 16)
    c3 = store.put(prompt[:24], recipe=chunked, start=16)
    assert longest_cached_prefix(prompt, chunked, MODEL, "t", store.start_of) == ([c1, c2, c3, c4], 32)
    longer = prompt[:32] + _tokens(20, seed=3)
    assert longest_cached_prefix(longer, chunked, MODEL, "t", store.start_of) == ([c1, c2, c3, c4], 32)


def test_a_chunk_whose_predecessors_are_gone_is_not_a_prefix():
    prompt = _tokens(24)
    chunked = Recipe(chunk_size=CHUNK, chunked=True)
    store = Store()
    store.put(prompt[:16], recipe=chunked, start=8)
    store.put(prompt[:24], recipe=chunked, start=16)
    assert longest_cached_prefix(prompt, chunked, MODEL, "t", store.start_of) is None


def test_the_chain_of_keys_made_once_is_what_the_tokens_give():
    """``longest_chain`` takes the keys a caller made already (the prefill worker's plan, a sharded
    client's Probe answers): the same chain as from the tokens, the keys made once."""
    prompt = _tokens(37)  # boundaries 8, 16, 24, 32 and the partial chunk's end, 37
    chunked = Recipe(chunk_size=CHUNK, chunked=True)
    store = Store()
    c1 = store.put(prompt[:8], recipe=chunked)
    c2 = store.put(prompt[:16], recipe=chunked, start=8)
    c4 = store.put(prompt[:32], recipe=chunked, start=24)  # after a gap: not reached
    keys = chunk_keys(prompt, chunked, MODEL, "t")
    starts = store.start_of(keys)
    assert longest_chain(keys, starts, CHUNK, len(prompt)) == ([c1, c2], 16)
    assert longest_cached_prefix(prompt, chunked, MODEL, "t", store.start_of) == ([c1, c2], 16)
    c3 = store.put(prompt[:24], recipe=chunked, start=16)
    c5 = store.put(prompt, recipe=chunked, start=32)
    chain = longest_chain(keys, store.start_of(keys), CHUNK, len(prompt))
    assert chain == ([c1, c2, c3, c4, c5], 37)  # the last chunk ends at the prompt's end, not 40
    assert longest_chain(keys, [None] * len(keys), CHUNK, len(prompt)) is None


# --- check_chain: the chunk entries a decode worker is given form one context, in order -------------

CHUNKED = Recipe(method="snapkv", ratio=0.5, chunk_size=CHUNK, chunked=True)


def _chunk_identities(tokens: list[int], recipe: Recipe = CHUNKED, tenant: str = "acme", model: str = MODEL):
    """The identities of the chunk entries a chunked recipe stores for ``tokens``."""
    hashes = chain_hashes(tokens, recipe.chunk_size, model, recipe.recipe_id)
    out = []
    for c, start in enumerate(range(0, len(tokens), recipe.chunk_size)):
        end = min(start + recipe.chunk_size, len(tokens))
        out.append(Identity(model, recipe, tuple(hashes[: c + 1]), end, tenant, start))
    return out


def test_a_context_s_chunks_in_order_chain():
    chunks = _chunk_identities(_tokens(30))
    assert len(chunks) == 4
    check_chain(chunks)
    check_chain(chunks[:2])  # a prefix of them too
    whole = Identity(MODEL, Recipe(), tuple(chain_hashes(_tokens(30), 256, MODEL, Recipe().recipe_id)), 30)
    check_chain([whole])


@pytest.mark.parametrize(
    "reorder, words",
    [
        (lambda c: [c[1], c[0], c[2]], "starts at token 8, not 0"),
        (lambda c: [c[0], c[2], c[1]], "consecutive, in order, without gaps"),
        (lambda c: [c[0], c[2]], "consecutive, in order, without gaps"),  # a chunk left out
        (lambda c: [c[0], c[1], c[1]], "consecutive"),  # one twice
        (lambda c: c[1:], "not 0"),  # the first left out
        (lambda c: [], "no entries"),
    ],
)
def test_chunks_out_of_order_missing_or_repeated_are_refused(reorder, words):
    with pytest.raises(ValueError, match=words):
        check_chain(reorder(_chunk_identities(_tokens(24))))


def test_chunks_of_another_prompt_tenant_model_or_recipe_are_refused():
    mine, other = _chunk_identities(_tokens(24, seed=1)), _chunk_identities(_tokens(24, seed=2))
    with pytest.raises(ValueError, match="chunk of other tokens"):
        check_chain([mine[0], other[1], other[2]])  # same spans, another prompt's tokens
    for part, kwargs in (
        ("tenant", {"tenant": "beta"}),
        ("model_fingerprint", {"model": "model-b"}),
        ("recipe", {"recipe": Recipe(method="snapkv", ratio=0.25, chunk_size=CHUNK, chunked=True)}),
    ):
        foreign = _chunk_identities(_tokens(24, seed=1), **kwargs)
        with pytest.raises(ValueError, match=f"another {part}"):
            check_chain([mine[0], foreign[1]])
