"""Synthetic store entries for the store users: real shapes and sizes, any number of distinct keys.

An entry is built by ``dkv.testing`` with SmolLM2-135M's shapes (30 layers, 3 KV heads,
head dim 64). Building one takes a second or more of CPU, so a few templates are built once and
every key reuses a template's layers under its own identity (its own token ids, hence its own
prefix hash and key); encoding it then costs milliseconds. Keys are numbered: key ``i`` always has
the same tokens and the same template, in every locust process, so users share the key space.

The templates (tokens, kept fraction, quantization) give entries of about 0.5 to 2 MB; the key
space is sized from the store's capacity so that key space x mean entry size is a few times what
the store holds, and eviction runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
from collections.abc import Sequence

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV, Identity
from dkv.kvstore.prefix import chain_hashes
from dkv.testing import synthetic_entry

MODEL_FINGERPRINT = "loadtest-synthetic"
SHAPE = dict(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
# (tokens, fraction kept, quantization): about 0.6, 1.1, 1.8 and 1.6 MB encoded
TEMPLATES = ((256, 0.25, "int4"), (256, 0.5, "int4"), (512, 0.25, "int8"), (512, 0.375, "int4"))
VOCAB = 49152


class EntryFactory:
    """Encoded frames of entry ``i`` for any ``i``; ``token_ids(i)`` are the tokens it caches."""

    def __init__(self, tenant: str = "default", templates: Sequence[tuple[int, float, str]] = TEMPLATES):
        self.tenant = tenant
        self.templates: list[CompressedKV] = [
            synthetic_entry(
                seq_len=n,
                keep_fraction=keep,
                quant_scheme=q,
                seed=j,
                tenant=tenant,
                model_fingerprint=MODEL_FINGERPRINT,
                **SHAPE,
            )
            for j, (n, keep, q) in enumerate(templates)
        ]
        self.sizes = [sum(len(f) for f in codec.encode(t)) for t in self.templates]

    @property
    def mean_bytes(self) -> float:
        return sum(self.sizes) / len(self.sizes)

    def template(self, i: int) -> CompressedKV:
        return self.templates[i % len(self.templates)]

    def recipe(self, i: int):
        return self.template(i).identity.recipe

    def token_ids(self, i: int) -> list[int]:
        rng = random.Random(f"dkv-loadtest-key-{i}")
        return [rng.randrange(VOCAB) for _ in range(self.template(i).identity.seq_len)]

    def entry(self, i: int) -> CompressedKV:
        t = self.template(i)
        recipe = t.identity.recipe
        tokens = self.token_ids(i)
        identity = Identity(
            MODEL_FINGERPRINT,
            recipe,
            tuple(chain_hashes(tokens, recipe.chunk_size, MODEL_FINGERPRINT, recipe.recipe_id)),
            len(tokens),
            self.tenant,
        )
        return dataclasses.replace(t, identity=identity)

    def frames(self, i: int) -> list[bytes]:
        return codec.encode(self.entry(i))

    def key(self, i: int) -> str:
        return str(self.entry(i).key)


class Zipf:
    """Ranks ``0..n-1`` drawn with probability proportional to ``1 / (rank + 1) ** s``: a few hot keys."""

    def __init__(self, n: int, s: float = 1.0):
        self.n = n
        self.cumulative = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def sample(self, rng: random.Random) -> int:
        return min(self.n - 1, bisect.bisect_left(self.cumulative, rng.random() * self.cumulative[-1]))


def key_space(capacity_bytes: int, mean_entry_bytes: float, factor: float) -> int:
    """Number of keys whose entries add up to ``factor`` times the store's capacity (at least 16)."""
    return max(16, math.ceil(factor * capacity_bytes / mean_entry_bytes))
