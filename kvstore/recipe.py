"""The recipe of an entry: how its KV cache was compressed.

Apart from ``kvstore.entry`` because clients name recipes too: this module imports nothing
beyond the standard library, so ``dkv.Client`` works where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from dkv.kvstore.errors import InvalidEntry

KEY_PART = re.compile(r"[A-Za-z0-9._-]{1,128}")  # one part of an entry key or a recipe method; used with fullmatch
# recipe quant scheme -> (bits of important tokens, bits of the rest); ZipCache's split for "mixed"
SCHEMES = {"none": None, "int8": (8, 8), "int4": (4, 4), "mixed": (4, 2)}


@dataclass(frozen=True)
class Recipe:
    """How an entry was compressed. Its ``recipe_id`` is part of the entry key.

    ``ratio`` is the fraction of tokens removed (0.75 keeps a quarter, as in kvpress);
    ``budget`` (tokens per KV head, 0 = unused) overrides it. ``quant`` is ``none``, ``int8``,
    ``int4`` or ``mixed``. ``chunk_size`` is the prefix-hash chunk; ``chunked`` recipes also
    compress chunk by chunk and store one entry per chunk (``workers.compression``).
    """

    method: str = "full"
    ratio: float = 0.0
    budget: int = 0
    quant: str = "none"
    chunk_size: int = 256
    chunked: bool = False
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not KEY_PART.fullmatch(self.method):
            raise InvalidEntry(f"recipe method {self.method!r} must be 1-128 chars of [A-Za-z0-9._-]")
        if not 0.0 <= self.ratio < 1.0:
            raise InvalidEntry(f"recipe ratio {self.ratio} must be in [0, 1): it is the fraction removed")
        if self.budget < 0:
            raise InvalidEntry(f"recipe budget {self.budget} must be >= 0 (0 = use ratio)")
        if self.quant not in SCHEMES:
            raise InvalidEntry(f"recipe quant {self.quant!r} must be one of {sorted(SCHEMES)}")
        if not 1 <= self.chunk_size <= 1 << 16:
            raise InvalidEntry(f"recipe chunk_size {self.chunk_size} must be in [1, 65536]")
        # one spelling per value, so equal recipes always have the same recipe_id
        for name, kind in (("ratio", float), ("budget", int), ("chunk_size", int), ("chunked", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "params", tuple(sorted((str(k), float(v)) for k, v in self.params)))

    @property
    def recipe_id(self) -> str:
        """Short stable hash of the canonical recipe (method, ratio, budget, quant, chunk, params)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "budget": self.budget,
            "quant": self.quant,
            "chunk_size": self.chunk_size,
            "chunked": self.chunked,
            "params": [list(p) for p in self.params],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        try:
            return cls(
                method=str(d["method"]),
                ratio=float(d["ratio"]),
                budget=int(d["budget"]),
                quant=str(d["quant"]),
                chunk_size=int(d["chunk_size"]),
                chunked=bool(d.get("chunked", False)),
                params=tuple((str(k), float(v)) for k, v in d.get("params", ())),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise InvalidEntry(f"recipe is malformed ({e}); expected method, ratio, budget, quant, chunk_size") from e


# What a request that names no recipe gets (the gateway, the HTTP API, dkv generate, the demo).
# Chosen in docs/benchmarks.md (issue 16): of the chunked recipes within 1/4 of the fp16 bytes
# (ratio 0.5 + int4: 0.159), LagKV answers the most retrieval tasks (11 of 21; KNorm 10, TOVA 7,
# SnapKV 6) at 0.080 extra NLL; SnapKV's answers drop when the question comes after the context.
DEFAULT_RECIPE = Recipe(method="lagkv", ratio=0.5, chunk_size=256, chunked=True, quant="int4")
