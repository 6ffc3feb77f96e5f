"""The cache entry: one compressed KV cache of one context, for one model and one recipe.

Layout of one layer (``LayerKV``), for ``H`` KV heads of head dim ``D`` and page size ``P``::

    positions     int32 [N]          kept token positions, head-major, ascending within a head
    head_offsets  int32 [H + 1]      rows of head h are positions[head_offsets[h]:head_offsets[h+1]]
    scores        float32 [N]        importance of each kept token (higher = keep)
    page_min/max  [pages, D]         elementwise min / max of K over each page of P rows of a head
    keys, values  [N, D] float       dense (fp16, bf16, fp32), or quantized rows (see ``kvstore.quant``)

Rows are grouped per head and pages never straddle heads, so head ``h`` owns
``ceil(n_h / P)`` pages. Quantized keys use the page min/max as their per-channel range
(KIVI-style key quantization with the page as the token group); quantized values carry a
per-token range. Every row may have its own bit width, which is how ZipCache-style mixed
precision is stored.

Entries are immutable once published; ``shrink`` and ``requantize`` return new entries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dkv.kvstore import quant
from dkv.kvstore.errors import InvalidEntry
from dkv.kvstore.recipe import KEY_PART, Recipe

FORMAT_VERSION = 1
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, order=True)
class EntryKey:
    """Typed key of one entry: ``tenant/model_fingerprint/recipe_id/prefix_hash``.

    ``prefix_hash`` is the last chained chunk hash of the context (``kvstore.prefix``), so the
    key says which model, which recipe and exactly which tokens the entry holds.
    """

    tenant: str
    model_fingerprint: str
    recipe_id: str
    prefix_hash: str

    def __post_init__(self) -> None:
        for name in ("tenant", "model_fingerprint", "recipe_id", "prefix_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not KEY_PART.fullmatch(value):
                raise InvalidEntry(f"entry key part {name}={value!r} must be 1-128 chars of [A-Za-z0-9._-]")

    def __str__(self) -> str:
        return f"{self.tenant}/{self.model_fingerprint}/{self.recipe_id}/{self.prefix_hash}"

    @classmethod
    def parse(cls, text: str) -> EntryKey:
        parts = text.split("/")
        if len(parts) != 4:
            raise InvalidEntry(
                f"entry key {text[:200]!r} must look like tenant/model_fingerprint/recipe_id/prefix_hash"
            )
        return cls(*parts)


@dataclass(frozen=True)
class Identity:
    """What an entry is the cache of: model, recipe, tokens (as chained chunk hashes), length.

    ``seq_len`` is the length of the context up to the entry's end (decoding continues there);
    ``start`` is the first position the entry holds: 0 for a whole context, the chunk's start
    for one entry of a chunked recipe (which continues the entries of the chunks before it).
    """

    model_fingerprint: str
    recipe: Recipe
    chunk_hashes: tuple[str, ...]
    seq_len: int
    tenant: str = "default"
    start: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise InvalidEntry(f"seq_len {self.seq_len} must be >= 1")
        if not 0 <= self.start < self.seq_len:
            raise InvalidEntry(f"start {self.start} must be in [0, seq_len={self.seq_len})")
        if self.start and (not self.recipe.chunked or self.start % self.recipe.chunk_size):
            raise InvalidEntry(f"start {self.start} > 0 needs a chunked recipe and a multiple of chunk_size "
                               f"{self.recipe.chunk_size}")
        expected = math.ceil(self.seq_len / self.recipe.chunk_size)
        if len(self.chunk_hashes) != expected:
            raise InvalidEntry(
                f"{len(self.chunk_hashes)} chunk hashes for seq_len {self.seq_len} and chunk_size "
                f"{self.recipe.chunk_size}; expected {expected}"
            )

    @property
    def key(self) -> EntryKey:
        return EntryKey(self.tenant, self.model_fingerprint, self.recipe.recipe_id, self.chunk_hashes[-1])


@dataclass
class LayerKV:
    """Kept KV of one layer. Shapes in the module docstring; bits tensors are None when dense."""

    positions: torch.Tensor  # int32 [N]
    head_offsets: torch.Tensor  # int32 [H + 1]
    scores: torch.Tensor  # float32 [N]
    page_min: torch.Tensor  # [pages, D]
    page_max: torch.Tensor  # [pages, D]
    keys: torch.Tensor  # [N, D] dense, or uint8 [bytes] packed rows
    values: torch.Tensor  # [N, D] dense, or uint8 [bytes] packed rows
    key_bits: torch.Tensor | None = None  # uint8 [N]
    value_bits: torch.Tensor | None = None  # uint8 [N]
    value_min: torch.Tensor | None = None  # float16 [N]
    value_max: torch.Tensor | None = None  # float16 [N]

    TENSOR_FIELDS = (
        "positions", "head_offsets", "scores", "page_min", "page_max", "keys", "values",
        "key_bits", "value_bits", "value_min", "value_max",
    )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None

    def _quant_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key_bits, value_bits, value_min, value_max) of a quantized layer."""
        if self.key_bits is None or self.value_bits is None or self.value_min is None or self.value_max is None:
            raise InvalidEntry("the layer is not quantized: it has no bits, value_min or value_max")
        return self.key_bits, self.value_bits, self.value_min, self.value_max

    def head_counts(self) -> torch.Tensor:
        """Kept tokens per KV head, int64 [H]."""
        return (self.head_offsets[1:] - self.head_offsets[:-1]).long()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSOR_FIELDS if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select_pages(self, pages: torch.Tensor, page_size: int) -> LayerKV:
        """The layer restricted to ``pages`` (ascending page indices, head-major): a valid layer.

        Quantized rows are copied as their packed bytes, so nothing is requantized.
        """
        row_page = page_of_rows(self.head_offsets, page_size)
        rows = torch.isin(row_page, pages).nonzero().squeeze(1)
        head_of_row = torch.repeat_interleave(torch.arange(len(self.head_offsets) - 1), self.head_counts())
        counts = torch.bincount(head_of_row[rows], minlength=len(self.head_offsets) - 1)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(counts, 0)
        present = torch.unique(row_page[rows])
        picked = dict(positions=self.positions[rows], head_offsets=offsets, scores=self.scores[rows],
                      page_min=self.page_min[present], page_max=self.page_max[present])
        if not self.quantized:
            return LayerKV(keys=self.keys[rows], values=self.values[rows], **picked)
        head_dim = self.page_min.shape[1]
        key_bits, value_bits, value_min, value_max = self._quant_rows()
        return LayerKV(keys=_packed_rows(self.keys, key_bits, head_dim, rows),
                       values=_packed_rows(self.values, value_bits, head_dim, rows),
                       key_bits=key_bits[rows], value_bits=value_bits[rows],
                       value_min=value_min[rows], value_max=value_max[rows], **picked)

    def dequantized(self, page_size: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K and V, [N, D] each, in ``dtype``."""
        if not self.quantized:
            return self.keys.to(dtype), self.values.to(dtype)
        head_dim = self.page_min.shape[1]
        row_page = page_of_rows(self.head_offsets, page_size)
        key_bits, value_bits, value_min, value_max = self._quant_rows()
        k = quant.dequantize_rows(self.keys, key_bits, head_dim, self.page_min[row_page], self.page_max[row_page])
        v = quant.dequantize_rows(self.values, value_bits, head_dim, value_min.unsqueeze(1), value_max.unsqueeze(1))
        return k.to(dtype), v.to(dtype)


def _packed_rows(packed: torch.Tensor, bits: torch.Tensor, head_dim: int, rows: torch.Tensor) -> torch.Tensor:
    """The packed bytes of ``rows`` (ascending), back to back."""
    starts = quant.row_offsets(bits, head_dim)[rows]
    lengths = quant.row_nbytes(bits, head_dim)[rows]
    if not len(rows):
        return packed[:0]
    begin = torch.cumsum(lengths, 0) - lengths
    index = torch.repeat_interleave(starts - begin, lengths) + torch.arange(int(lengths.sum()))
    return packed[index]


def page_counts(head_counts: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages per head, int64 [H]."""
    return (head_counts + page_size - 1) // page_size


def page_of_rows(head_offsets: torch.Tensor, page_size: int) -> torch.Tensor:
    """Global page index of every row, int64 [N]."""
    counts = (head_offsets[1:] - head_offsets[:-1]).long()
    pages = page_counts(counts, page_size)
    page_start = torch.cumsum(pages, 0) - pages  # [H]
    head_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    row_in_head = torch.arange(int(counts.sum())) - head_offsets[:-1].long()[head_of_row]
    return page_start[head_of_row] + row_in_head // page_size


def page_summaries(keys: torch.Tensor, head_offsets: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of ``keys`` [N, D] over each page: two [pages, D] tensors."""
    row_page = page_of_rows(head_offsets, page_size)
    n_pages = int(page_counts((head_offsets[1:] - head_offsets[:-1]).long(), page_size).sum())
    d = keys.shape[1]
    index = row_page.unsqueeze(1).expand(-1, d)
    kf = keys.float()
    pmin = torch.full((n_pages, d), float("inf")).scatter_reduce(0, index, kf, "amin")
    pmax = torch.full((n_pages, d), float("-inf")).scatter_reduce(0, index, kf, "amax")
    return pmin.to(keys.dtype), pmax.to(keys.dtype)


@dataclass
class CompressedKV:
    """One compressed KV cache entry (see module docstring).

    ``seq_len`` is the original context length: decoding continues at that position.
    ``importance`` is the fraction of attention importance the entry kept (1.0 = lossless);
    the store uses it for eviction. ``derived`` lists transformations the store applied
    after the prefill worker wrote it (e.g. ``shrink:0.5``, ``quant:int4``).
    """

    identity: Identity
    layers: list[LayerKV]
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    importance: float = 1.0
    derived: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def key(self) -> EntryKey:
        return self.identity.key

    @property
    def seq_len(self) -> int:
        return self.identity.seq_len

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def kept_tokens(self) -> list[int]:
        """Kept tokens summed over heads, per layer."""
        return [layer.num_tokens for layer in self.layers]

    def validate(self) -> None:
        """Check every shape, dtype and value; raise ``InvalidEntry`` saying what is wrong."""
        validate_entry(self)

    def replace(self, **changes) -> CompressedKV:
        return dataclasses.replace(self, **changes)

    def cast(self, dtype: torch.dtype) -> CompressedKV:
        """The entry with its dense K/V and page summaries in ``dtype`` (how the store keeps it);
        quantized rows are left as they are. Rounding is monotonic, so page bounds still bound."""
        layers = [dataclasses.replace(layer, page_min=layer.page_min.to(dtype), page_max=layer.page_max.to(dtype),
                                      **({} if layer.quantized else
                                         {"keys": layer.keys.to(dtype), "values": layer.values.to(dtype)}))
                  for layer in self.layers]
        return self.replace(layers=layers)


def make_layer(
    positions: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scores: list[torch.Tensor],
    page_size: int,
) -> LayerKV:
    """Build a dense layer from per-head lists: positions [n_h], keys/values [n_h, D], scores [n_h].

    Rows of each head are sorted by position.
    """
    order = [torch.argsort(p) for p in positions]
    pos = torch.cat([p[o] for p, o in zip(positions, order)]).to(torch.int32)
    k = torch.cat([x[o] for x, o in zip(keys, order)])
    v = torch.cat([x[o] for x, o in zip(values, order)])
    s = torch.cat([x[o] for x, o in zip(scores, order)]).float()
    counts = torch.tensor([len(p) for p in positions], dtype=torch.int32)
    offsets = torch.zeros(len(positions) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    pmin, pmax = page_summaries(k, offsets, page_size)
    return LayerKV(positions=pos, head_offsets=offsets, scores=s, page_min=pmin, page_max=pmax, keys=k, values=v)


def quantize_layer(layer: LayerKV, key_bits: torch.Tensor, page_size: int,
                   value_bits: torch.Tensor | None = None) -> LayerKV:
    """The layer with K and V quantized at ``key_bits`` / ``value_bits`` (uint8 [N]) per row.

    Keys use their page's min/max (kept in fp16) as the per-channel range; values their own
    row's min/max. ``value_bits`` defaults to ``key_bits``.
    """
    value_bits = key_bits.clone() if value_bits is None else value_bits
    k, v = layer.dequantized(page_size, torch.float32)
    pmin, pmax = layer.page_min.half(), layer.page_max.half()
    row_page = page_of_rows(layer.head_offsets, page_size)
    vmin = v.amin(1).half() if len(v) else torch.empty(0, dtype=torch.float16)
    vmax = v.amax(1).half() if len(v) else torch.empty(0, dtype=torch.float16)
    return LayerKV(
        positions=layer.positions, head_offsets=layer.head_offsets, scores=layer.scores,
        page_min=pmin, page_max=pmax,
        keys=quant.quantize_rows(k, key_bits, pmin.float()[row_page], pmax.float()[row_page]),
        values=quant.quantize_rows(v, value_bits, vmin.float().unsqueeze(1), vmax.float().unsqueeze(1)),
        key_bits=key_bits, value_bits=value_bits, value_min=vmin, value_max=vmax,
    )


def validate_entry(entry: CompressedKV) -> None:
    h, d, p = entry.num_kv_heads, entry.head_dim, entry.page_size
    if entry.format_version != FORMAT_VERSION:
        raise InvalidEntry(f"format_version {entry.format_version} is not supported; this store reads {FORMAT_VERSION}")
    if not 1 <= h <= 1024 or not 4 <= d <= 1024 or d % 4:
        raise InvalidEntry(f"num_kv_heads={h}, head_dim={d}: need 1..1024 heads and a head_dim in 4..1024 that is "
                           "a multiple of 4 (so 2-bit rows fill whole bytes)")
    if not 1 <= p <= 4096:
        raise InvalidEntry(f"page_size {p} must be in [1, 4096]")
    if not entry.layers:
        raise InvalidEntry("entry has no layers")
    if not 0.0 <= entry.importance <= 1.0 or math.isnan(entry.importance):
        raise InvalidEntry(f"importance {entry.importance} must be in [0, 1]")
    for i, layer in enumerate(entry.layers):
        _validate_layer(layer, i, h, d, p, entry.identity.start, entry.seq_len)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. min/max propagate both, and ``aminmax`` is ~700x faster than
    ``isfinite`` on fp16 CPU tensors."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check(cond: bool, layer: int, message: str) -> None:
    if not cond:
        raise InvalidEntry(f"layer {layer}: {message}")


def _validate_layer(layer: LayerKV, i: int, h: int, d: int, p: int, start: int, seq_len: int) -> None:
    _check(layer.head_offsets.dtype == torch.int32 and layer.head_offsets.shape == (h + 1,), i,
           f"head_offsets must be int32 [{h + 1}], got {layer.head_offsets.dtype} {tuple(layer.head_offsets.shape)}")
    offs = layer.head_offsets.long()
    counts = offs[1:] - offs[:-1]
    _check(int(offs[0]) == 0 and bool((counts >= 0).all()), i, "head_offsets must start at 0 and not decrease")
    n = int(offs[-1])
    _check(layer.positions.dtype == torch.int32 and layer.positions.shape == (n,), i,
           f"positions must be int32 [{n}] (head_offsets[-1]), got {layer.positions.dtype} {tuple(layer.positions.shape)}")
    if n:
        lo, hi = torch.aminmax(layer.positions)
        _check(int(lo) >= start and int(hi) < seq_len, i, f"positions must be in [start={start}, seq_len={seq_len})")
        not_ascending = (layer.positions[1:] <= layer.positions[:-1]).nonzero().squeeze(1) + 1  # rows
        head_starts = offs[1:-1]
        _check(bool(torch.isin(not_ascending, head_starts).all()), i,
               "positions must be strictly ascending within each head")
    _check(layer.scores.dtype == torch.float32 and layer.scores.shape == (n,), i,
           f"scores must be float32 [{n}], got {layer.scores.dtype} {tuple(layer.scores.shape)}")
    _check(all_finite(layer.scores), i, "scores contain NaN or Inf")
    pages = int(page_counts(counts, p).sum())
    for name in ("page_min", "page_max"):
        t = getattr(layer, name)
        _check(t.dtype in DENSE_DTYPES.values() and t.shape == (pages, d), i,
               f"{name} must be float [{pages}, {d}], got {t.dtype} {tuple(t.shape)}")
        _check(all_finite(t), i, f"{name} contains NaN or Inf")
    _check(bool((layer.page_min.float() <= layer.page_max.float()).all()), i, "page_min must be <= page_max")
    if layer.key_bits is None:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            _check(t.dtype in DENSE_DTYPES.values() and t.shape == (n, d), i,
                   f"{name} must be float16/bfloat16/float32 [{n}, {d}], got {t.dtype} {tuple(t.shape)}")
            _check(all_finite(t), i, f"{name} contain NaN or Inf")
        _check(layer.value_bits is None and layer.value_min is None and layer.value_max is None, i,
               "dense keys need dense values: value_bits, value_min and value_max must be absent")
        return
    for name in ("key_bits", "value_bits"):
        bits = getattr(layer, name)
        _check(bits is not None and bits.dtype == torch.uint8 and bits.shape == (n,), i, f"{name} must be uint8 [{n}]")
        _check(bool(torch.isin(bits, torch.tensor(quant.BITS, dtype=torch.uint8)).all()), i,
               f"{name} must each be one of {quant.BITS}")
        data = layer.keys if name == "key_bits" else layer.values
        want = quant.packed_nbytes(bits, d)
        _check(data.dtype == torch.uint8 and data.shape == (want,), i,
               f"quantized {'keys' if name == 'key_bits' else 'values'} must be uint8 [{want}], "
               f"got {data.dtype} {tuple(data.shape)}")
    for name in ("value_min", "value_max"):
        t = getattr(layer, name)
        _check(t is not None and t.dtype == torch.float16 and t.shape == (n,), i, f"{name} must be float16 [{n}]")
        _check(all_finite(t), i, f"{name} contains NaN or Inf")


__all__ = [
    "FORMAT_VERSION", "Recipe", "EntryKey", "Identity", "LayerKV", "CompressedKV", "make_layer", "quantize_layer",
    "page_summaries", "page_of_rows", "page_counts", "validate_entry",
]
