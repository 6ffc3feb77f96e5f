"""The cache entry: one compressed KV cache of one context, for one model and one recipe.

Layout of one layer (``LayerKV``), for ``H`` KV heads of head dim ``D`` and page size ``P``::

    positions     int32 [N]          kept token positions, head-major, ascending within a head
    head_offsets  int32 [H + 1]      rows of head h are positions[head_offsets[h]:head_offsets[h+1]]
    scores        float16 [N]        importance of each kept token (higher = keep); float32 in format 1
    page_min/max  [pages, D]         elementwise min / max of K over each page of P rows of a head
    keys, values  [N, D] float       dense (fp16, bf16, fp32), or quantized rows (see ``kvstore.quant``)
    key_lo/hi     float16 [H, D]     quantized layers: each head's key range, the grid of its page bounds
    value_lo/hi   float16 [H]        quantized layers: each head's value range, the grid of its rows' ranges

Rows are grouped per head and pages never straddle heads, so head ``h`` owns
``ceil(n_h / P)`` pages. Quantized keys use the page min/max as their per-channel range
(KIVI-style key quantization with the page as the token group); quantized values carry a
per-token range. Every row may have its own bit width, which is how ZipCache-style mixed
precision is stored.

Stored form (``pack_layer`` / ``unpack_layer``, what ``kvstore.codec`` writes): format 3 keeps
the fields above except that, where it is smaller,

- positions become a bitmap per head over the entry's span ``[start, seq_len)``
  (``position_bitmap`` uint8 ``[H, ceil(span / 8)]``, bit ``j % 8`` of byte ``j // 8`` = position
  ``start + j``; smaller once a head keeps more than 1/16 of the span), else offsets from
  ``start`` (``position_offsets`` int16 ``[N]``, spans up to 32768), else ``positions``;
- a quantized layer's page bounds are 8-bit codes on its heads' key ranges
  (``page_min_codes`` / ``page_max_codes`` uint8 ``[pages, D]``: ``min = lo + code * (hi - lo) /
  255``): ``quantize_layer`` puts them on that grid, rounding outwards, and quantizes the keys on
  the bounds the codes give back, so nothing changes on the way through the store;
- a quantized layer's per-row value ranges are 8-bit codes on its heads' value ranges
  (``value_min_codes`` / ``value_max_codes`` uint8 ``[N]`` on ``[value_lo, value_hi]``, the same
  grid as the page bounds, rounded to the nearest code: a row's extremes stay within half a
  grid step);
- K and V of a row share one bit width (``bits`` uint8 ``[N]``) where they agree, and one byte
  (``bits`` uint8 ``[1]``) holds it for every row when all rows have the same width.

Formats 1 (positions int32, scores float32, page bounds in fp16, two bit-width bytes) and 2
(value ranges in fp16, a bit width per row) still read.

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

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # formats 1 and 2: see the module docstring
PAGE_CODE_LEVELS = 255  # 8-bit page bound and value range codes
FP16_MAX = 65504.0
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
            raise InvalidEntry(
                f"start {self.start} > 0 needs a chunked recipe and a multiple of chunk_size {self.recipe.chunk_size}"
            )
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
    key_lo: torch.Tensor | None = None  # float16 [H, D]: page bounds are 8-bit codes on [key_lo, key_hi]
    key_hi: torch.Tensor | None = None  # float16 [H, D]
    value_lo: torch.Tensor | None = None  # float16 [H]: value ranges are 8-bit codes on [value_lo, value_hi]
    value_hi: torch.Tensor | None = None  # float16 [H]

    TENSOR_FIELDS = (
        "positions",
        "head_offsets",
        "scores",
        "page_min",
        "page_max",
        "keys",
        "values",
        "key_bits",
        "value_bits",
        "value_min",
        "value_max",
        "key_lo",
        "key_hi",
        "value_lo",
        "value_hi",
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
        counts = torch.bincount(head_of_rows(self.head_offsets)[rows], minlength=len(self.head_offsets) - 1)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(counts, 0)
        present = torch.unique(row_page[rows])
        picked = dict(
            positions=self.positions[rows],
            head_offsets=offsets,
            scores=self.scores[rows],
            page_min=self.page_min[present],
            page_max=self.page_max[present],
        )
        if not self.quantized:
            return LayerKV(keys=self.keys[rows], values=self.values[rows], **picked)
        head_dim = self.page_min.shape[1]
        key_bits, value_bits, value_min, value_max = self._quant_rows()
        return LayerKV(
            keys=_packed_rows(self.keys, key_bits, head_dim, rows),
            values=_packed_rows(self.values, value_bits, head_dim, rows),
            key_bits=key_bits[rows],
            value_bits=value_bits[rows],
            value_min=value_min[rows],
            value_max=value_max[rows],
            key_lo=self.key_lo,
            key_hi=self.key_hi,
            value_lo=self.value_lo,
            value_hi=self.value_hi,
            **picked,
        )

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
    head_of_row = head_of_rows(head_offsets)
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

    def stored_layers(self) -> list[dict[str, torch.Tensor]]:
        """Each layer's tensors as the current format stores them (``pack_layer``): what ``kvstore.codec`` writes."""
        return [
            pack_layer(layer, self.identity.start, self.seq_len, self.page_size, f"layer {i}")
            for i, layer in enumerate(self.layers)
        ]

    @property
    def stored_nbytes(self) -> int:
        """Data bytes of the stored form (the codec's ``data_bytes``)."""
        return sum(t.numel() * t.element_size() for layer in self.stored_layers() for t in layer.values())

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
        quantized rows and their page bounds (on the grid of the key ranges) are left as they are.
        Rounding is monotonic, so page bounds still bound."""
        layers = [
            layer
            if layer.quantized
            else dataclasses.replace(
                layer,
                page_min=layer.page_min.to(dtype),
                page_max=layer.page_max.to(dtype),
                keys=layer.keys.to(dtype),
                values=layer.values.to(dtype),
            )
            for layer in self.layers
        ]
        return self.replace(layers=layers)


def make_layer(
    positions: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scores: list[torch.Tensor],
    page_size: int,
) -> LayerKV:
    """Build a dense layer from per-head lists: positions [n_h], keys/values [n_h, D], scores [n_h].

    Rows of each head are sorted by position; scores are kept in fp16 (clamped into its range).
    """
    order = [torch.argsort(p) for p in positions]
    pos = torch.cat([p[o] for p, o in zip(positions, order)]).to(torch.int32)
    k = torch.cat([x[o] for x, o in zip(keys, order)])
    v = torch.cat([x[o] for x, o in zip(values, order)])
    s = torch.cat([x[o] for x, o in zip(scores, order)]).float().clamp(-FP16_MAX, FP16_MAX).half()
    counts = torch.tensor([len(p) for p in positions], dtype=torch.int32)
    offsets = torch.zeros(len(positions) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    pmin, pmax = page_summaries(k, offsets, page_size)
    return LayerKV(positions=pos, head_offsets=offsets, scores=s, page_min=pmin, page_max=pmax, keys=k, values=v)


def quantize_layer(
    layer: LayerKV, key_bits: torch.Tensor, page_size: int, value_bits: torch.Tensor | None = None
) -> LayerKV:
    """The layer with K and V quantized at ``key_bits`` / ``value_bits`` (uint8 [N]) per row.

    Each head's key range (``key_lo``/``key_hi``, fp16 per channel) is the grid of its page
    bounds (8-bit codes, the min rounded down and the max up) and each head's value range
    (``value_lo``/``value_hi``, fp16) the grid of its rows' value ranges (8-bit codes, the nearest).
    Keys are quantized on the bounds the codes give back (their page's per-channel range), values
    on their row's coded range.
    ``value_bits`` defaults to ``key_bits``.
    """
    value_bits = key_bits.clone() if value_bits is None else value_bits
    k, v = layer.dequantized(page_size, torch.float32)
    heads, d = len(layer.head_offsets) - 1, k.shape[1]
    true_min, true_max = page_summaries(k, layer.head_offsets, page_size)
    page_head = head_of_pages(layer.head_offsets, page_size)
    key_lo, key_hi = _head_ranges(true_min, true_max, page_head, (heads, d))
    pmin, pmax = grid_values(
        *_grid_codes(true_min, true_max, key_lo, key_hi, page_head, outward=True), key_lo, key_hi, page_head
    )
    row_head = head_of_rows(layer.head_offsets)
    row_min = v.amin(1) if len(v) else torch.empty(0)
    row_max = v.amax(1) if len(v) else torch.empty(0)
    value_lo, value_hi = _head_ranges(row_min, row_max, row_head, (heads,))
    vmin, vmax = (
        x.half()
        for x in grid_values(
            *_grid_codes(row_min, row_max, value_lo, value_hi, row_head, outward=False), value_lo, value_hi, row_head
        )
    )
    row_page = page_of_rows(layer.head_offsets, page_size)
    return LayerKV(
        positions=layer.positions,
        head_offsets=layer.head_offsets,
        scores=layer.scores,
        page_min=pmin,
        page_max=pmax,
        keys=quant.quantize_rows(k, key_bits, pmin[row_page], pmax[row_page]),
        values=quant.quantize_rows(v, value_bits, vmin.float().unsqueeze(1), vmax.float().unsqueeze(1)),
        key_bits=key_bits,
        value_bits=value_bits,
        value_min=vmin,
        value_max=vmax,
        key_lo=key_lo,
        key_hi=key_hi,
        value_lo=value_lo,
        value_hi=value_hi,
    )


def head_of_pages(head_offsets: torch.Tensor, page_size: int) -> torch.Tensor:
    """The head of every page, int64 [pages]."""
    pages = page_counts((head_offsets[1:] - head_offsets[:-1]).long(), page_size)
    return torch.repeat_interleave(torch.arange(len(pages)), pages)


def head_of_rows(head_offsets: torch.Tensor) -> torch.Tensor:
    """The head of every row, int64 [N]."""
    return torch.repeat_interleave(torch.arange(len(head_offsets) - 1), (head_offsets[1:] - head_offsets[:-1]).long())


def _head_ranges(
    lows: torch.Tensor, highs: torch.Tensor, head: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's range (fp16, ``shape``) of ``lows``/``highs`` [M, ...] whose heads are ``head`` [M]."""
    index = head.view(-1, *([1] * (lows.dim() - 1))).expand_as(lows)
    lo = torch.zeros(shape).scatter_reduce(0, index, lows, "amin", include_self=False)
    hi = torch.zeros(shape).scatter_reduce(0, index, highs, "amax", include_self=False)
    return lo.clamp(-FP16_MAX, FP16_MAX).half(), hi.clamp(-FP16_MAX, FP16_MAX).half()


def _code_grid(lo: torch.Tensor, hi: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit grid of each element's head: its origin and step, float32, indexed like ``head``."""
    origin = lo.float()[head]
    return origin, (hi.float()[head] - origin) / PAGE_CODE_LEVELS


def _grid_codes(
    lows: torch.Tensor, highs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, head: torch.Tensor, outward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ranges ``[lows, highs]`` on their heads' grids, uint8: rounded outwards (the
    coded range holds the true one: page bounds, which bound attention scores) or to the nearest
    code (a row's extreme values stay within half a grid step: value ranges)."""
    origin, step = _code_grid(lo, hi, head)
    down, up = (torch.floor, torch.ceil) if outward else (torch.round, torch.round)
    code_min = down((lows - origin) / step).clamp(0, PAGE_CODE_LEVELS).nan_to_num(0.0).to(torch.uint8)
    code_max = up((highs - origin) / step).clamp(0, PAGE_CODE_LEVELS).nan_to_num(0.0).to(torch.uint8)
    return code_min, code_max


def grid_values(
    code_min: torch.Tensor, code_max: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range bounds, float32, from their 8-bit codes on the heads' ranges ``[lo, hi]`` (page bounds:
    ``head`` is each page's head; value ranges: each row's)."""
    origin, step = _code_grid(lo, hi, head)
    return origin + code_min.float() * step, origin + code_max.float() * step


def _stored_codes(
    bounds: tuple[torch.Tensor, torch.Tensor], lo: torch.Tensor, hi: torch.Tensor, head: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``bounds`` (in their own dtype, on the grid of ``[lo, hi]``); ``InvalidEntry``
    unless the codes give them back exactly."""
    origin, step = _code_grid(lo, hi, head)
    codes = []
    for bound in bounds:
        code = ((bound.float() - origin) / step).round().nan_to_num(0.0).clamp(0, PAGE_CODE_LEVELS)
        if not torch.equal((origin + code * step).to(bound.dtype), bound):
            raise InvalidEntry(
                f"{what} are not on the 8-bit grid of their heads' ranges (build quantized layers with quantize_layer)"
            )
        codes.append(code.to(torch.uint8))
    return codes[0], codes[1]


def pack_layer(
    layer: LayerKV, start: int, seq_len: int, page_size: int, where: str = "layer"
) -> dict[str, torch.Tensor]:
    """The tensors format 3 stores for ``layer`` of an entry spanning ``[start, seq_len)`` (module docstring)."""
    out = {"head_offsets": layer.head_offsets}
    heads, n, span = len(layer.head_offsets) - 1, layer.num_tokens, seq_len - start
    if heads * -(-span // 8) < 2 * n:
        out["position_bitmap"] = _bitmap(layer, start, span)
    elif span <= 1 << 15:
        out["position_offsets"] = (layer.positions - start).to(torch.int16)
    else:
        out["positions"] = layer.positions
    out["scores"] = layer.scores
    if layer.key_lo is not None and layer.key_hi is not None:
        out["page_min_codes"], out["page_max_codes"] = _stored_codes(
            (layer.page_min, layer.page_max),
            layer.key_lo,
            layer.key_hi,
            head_of_pages(layer.head_offsets, page_size),
            f"{where}: page bounds",
        )
        out["key_lo"], out["key_hi"] = layer.key_lo, layer.key_hi
    else:
        out["page_min"], out["page_max"] = layer.page_min, layer.page_max
    out["keys"], out["values"] = layer.keys, layer.values
    if layer.quantized:
        key_bits, value_bits, value_min, value_max = layer._quant_rows()
        if not torch.equal(key_bits, value_bits):
            out["key_bits"], out["value_bits"] = key_bits, value_bits
        elif n and bool((key_bits == key_bits[0]).all()):
            out["bits"] = key_bits[:1]
        else:
            out["bits"] = key_bits
        if layer.value_lo is not None and layer.value_hi is not None:
            out["value_min_codes"], out["value_max_codes"] = _stored_codes(
                (value_min, value_max),
                layer.value_lo,
                layer.value_hi,
                head_of_rows(layer.head_offsets),
                f"{where}: value ranges",
            )
            out["value_lo"], out["value_hi"] = layer.value_lo, layer.value_hi
        else:
            out["value_min"], out["value_max"] = value_min, value_max
    return out


STORED_FIELDS = LayerKV.TENSOR_FIELDS + (
    "position_bitmap",
    "position_offsets",
    "page_min_codes",
    "page_max_codes",
    "value_min_codes",
    "value_max_codes",
    "bits",
)


def _bitmap(layer: LayerKV, start: int, span: int) -> torch.Tensor:
    heads = len(layer.head_offsets) - 1
    width = -(-span // 8)
    bits = torch.zeros(heads, width * 8, dtype=torch.uint8)
    bits[head_of_rows(layer.head_offsets), layer.positions.long() - start] = 1
    return (bits.view(heads, width, 8) << torch.arange(8, dtype=torch.uint8)).sum(2, dtype=torch.uint8)


def unpack_layer(t: dict[str, torch.Tensor], start: int, seq_len: int, page_size: int, where: str = "layer") -> LayerKV:
    """Inverse of ``pack_layer`` (format 1's tensors read as they are); ``InvalidEntry`` when the
    stored tensors do not fit together. The result still needs ``validate_entry``."""
    t = dict(t)
    offsets = t.get("head_offsets")
    if offsets is None or offsets.dtype != torch.int32 or offsets.dim() != 1 or len(offsets) < 2:
        raise InvalidEntry(f"{where}: head_offsets must be int32 [H + 1]")
    heads, span = len(offsets) - 1, seq_len - start
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise InvalidEntry(f"{where}: head_offsets must start at 0 and not decrease")
    forms = [name for name in ("positions", "position_offsets", "position_bitmap") if name in t]
    if len(forms) != 1:
        raise InvalidEntry(
            f"{where}: exactly one of positions, position_offsets, position_bitmap is needed, got {forms}"
        )
    if "position_bitmap" in t:
        bitmap = t.pop("position_bitmap")
        if bitmap.dtype != torch.uint8 or bitmap.shape != (heads, -(-span // 8)):
            raise InvalidEntry(f"{where}: position_bitmap must be uint8 [{heads}, {-(-span // 8)}]")
        bits = (bitmap.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8)) & 1  # [H, width, 8]
        kept = bits.view(heads, -1).bool()
        if bool(kept[:, span:].any()):
            raise InvalidEntry(f"{where}: position_bitmap marks positions at or after seq_len {seq_len}")
        if not torch.equal(kept.sum(1), (offsets[1:] - offsets[:-1]).long()):
            raise InvalidEntry(f"{where}: position_bitmap disagrees with head_offsets")
        t["positions"] = (kept.nonzero()[:, 1] + start).to(torch.int32)  # head-major, ascending: the row order
    elif "position_offsets" in t:
        off = t.pop("position_offsets")
        if off.dtype != torch.int16:
            raise InvalidEntry(f"{where}: position_offsets must be int16")
        t["positions"] = off.to(torch.int32) + start
    if "bits" in t:
        if "key_bits" in t or "value_bits" in t:
            raise InvalidEntry(f"{where}: bits is shared by K and V: key_bits and value_bits must be absent")
        bits, rows = t.pop("bits"), int(offsets[-1])
        if bits.dim() == 1 and len(bits) == 1 and rows != 1:  # one width for every row
            bits = bits.expand(rows).clone()
        t["key_bits"] = t["value_bits"] = bits
    rows = int(offsets[-1])
    pages = int(page_counts((offsets[1:] - offsets[:-1]).long().clamp_min(0), page_size).sum())
    for bound, ranges, count, dims, what in (
        ("value", "value", rows, 1, "value ranges"),  # codes [N] on value_lo/hi [H]
        ("page", "key", pages, 2, "page bounds"),  # codes [pages, D] on key_lo/hi [H, D]
    ):
        if f"{bound}_min_codes" not in t and f"{bound}_max_codes" not in t:
            continue
        if f"{bound}_min" in t or f"{bound}_max" in t:
            raise InvalidEntry(f"{where}: {what} are stored as codes or as values, not both")
        code_min, code_max = t.pop(f"{bound}_min_codes", None), t.pop(f"{bound}_max_codes", None)
        lo, hi = t.get(f"{ranges}_lo"), t.get(f"{ranges}_hi")
        if code_min is None or code_max is None or lo is None or hi is None:
            raise InvalidEntry(
                f"{where}: {what} as codes need {bound}_min_codes, {bound}_max_codes, {ranges}_lo and {ranges}_hi"
            )
        width = tuple(lo.shape[1:])
        for name, x, dtype, first in (
            (f"{ranges}_lo", lo, torch.float16, heads),
            (f"{ranges}_hi", hi, torch.float16, heads),
            (f"{bound}_min_codes", code_min, torch.uint8, count),
            (f"{bound}_max_codes", code_max, torch.uint8, count),
        ):
            if x.dtype != dtype or x.dim() != dims or tuple(x.shape) != (first, *width):
                raise InvalidEntry(f"{where}: {name} must be {dtype} [{first}{', D' if dims == 2 else ''}]")
        if bool((code_min > code_max).any()):
            raise InvalidEntry(f"{where}: {bound}_min_codes must be <= {bound}_max_codes")
        head = head_of_rows(offsets) if bound == "value" else head_of_pages(offsets, page_size)
        low, high = grid_values(code_min, code_max, lo, hi, head)
        if bound == "value":  # held in fp16, like format 2's
            low, high = low.half(), high.half()
        t[f"{bound}_min"], t[f"{bound}_max"] = low, high
    try:
        return LayerKV(**t)
    except TypeError as e:
        raise InvalidEntry(f"{where}: a layer is missing required tensors: {e}") from e


def validate_entry(entry: CompressedKV) -> None:
    h, d, p = entry.num_kv_heads, entry.head_dim, entry.page_size
    if entry.format_version not in READABLE_VERSIONS:
        raise InvalidEntry(
            f"format_version {entry.format_version} is not supported; this store reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if not 1 <= h <= 1024 or not 4 <= d <= 1024 or d % 4:
        raise InvalidEntry(
            f"num_kv_heads={h}, head_dim={d}: need 1..1024 heads and a head_dim in 4..1024 that is "
            "a multiple of 4 (so 2-bit rows fill whole bytes)"
        )
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
    _check(
        layer.head_offsets.dtype == torch.int32 and layer.head_offsets.shape == (h + 1,),
        i,
        f"head_offsets must be int32 [{h + 1}], got {layer.head_offsets.dtype} {tuple(layer.head_offsets.shape)}",
    )
    offs = layer.head_offsets.long()
    counts = offs[1:] - offs[:-1]
    _check(int(offs[0]) == 0 and bool((counts >= 0).all()), i, "head_offsets must start at 0 and not decrease")
    n = int(offs[-1])
    _check(
        layer.positions.dtype == torch.int32 and layer.positions.shape == (n,),
        i,
        f"positions must be int32 [{n}] (head_offsets[-1]), got {layer.positions.dtype} {tuple(layer.positions.shape)}",
    )
    if n:
        lo, hi = torch.aminmax(layer.positions)
        _check(int(lo) >= start and int(hi) < seq_len, i, f"positions must be in [start={start}, seq_len={seq_len})")
        not_ascending = (layer.positions[1:] <= layer.positions[:-1]).nonzero().squeeze(1) + 1  # rows
        head_starts = offs[1:-1]
        _check(
            bool(torch.isin(not_ascending, head_starts).all()),
            i,
            "positions must be strictly ascending within each head",
        )
    _check(
        layer.scores.dtype in (torch.float16, torch.float32) and layer.scores.shape == (n,),
        i,
        f"scores must be float16 (float32 in format 1) [{n}], got {layer.scores.dtype} {tuple(layer.scores.shape)}",
    )
    _check(all_finite(layer.scores), i, "scores contain NaN or Inf")
    pages = int(page_counts(counts, p).sum())
    for name in ("page_min", "page_max"):
        t = getattr(layer, name)
        _check(
            t.dtype in DENSE_DTYPES.values() and t.shape == (pages, d),
            i,
            f"{name} must be float [{pages}, {d}], got {t.dtype} {tuple(t.shape)}",
        )
        _check(all_finite(t), i, f"{name} contains NaN or Inf")
    _check(bool((layer.page_min.float() <= layer.page_max.float()).all()), i, "page_min must be <= page_max")
    if layer.key_bits is None:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            _check(
                t.dtype in DENSE_DTYPES.values() and t.shape == (n, d),
                i,
                f"{name} must be float16/bfloat16/float32 [{n}, {d}], got {t.dtype} {tuple(t.shape)}",
            )
            _check(all_finite(t), i, f"{name} contain NaN or Inf")
        _check(
            layer.value_bits is None
            and layer.value_min is None
            and layer.value_max is None
            and layer.key_lo is None
            and layer.key_hi is None
            and layer.value_lo is None
            and layer.value_hi is None,
            i,
            "dense keys need dense values: value_bits, value_min, value_max and the key and value ranges must be absent",
        )
        return
    for name in ("key_bits", "value_bits"):
        bits = getattr(layer, name)
        _check(bits is not None and bits.dtype == torch.uint8 and bits.shape == (n,), i, f"{name} must be uint8 [{n}]")
        _check(
            bool(torch.isin(bits, torch.tensor(quant.BITS, dtype=torch.uint8)).all()),
            i,
            f"{name} must each be one of {quant.BITS}",
        )
        data = layer.keys if name == "key_bits" else layer.values
        want = quant.packed_nbytes(bits, d)
        _check(
            data.dtype == torch.uint8 and data.shape == (want,),
            i,
            f"quantized {'keys' if name == 'key_bits' else 'values'} must be uint8 [{want}], "
            f"got {data.dtype} {tuple(data.shape)}",
        )
    for name in ("value_min", "value_max"):
        t = getattr(layer, name)
        _check(t is not None and t.dtype == torch.float16 and t.shape == (n,), i, f"{name} must be float16 [{n}]")
        _check(all_finite(t), i, f"{name} contains NaN or Inf")
    _check((layer.key_lo is None) == (layer.key_hi is None), i, "key_lo and key_hi come together")
    if layer.key_lo is not None and layer.key_hi is not None:
        for name in ("key_lo", "key_hi"):
            t = getattr(layer, name)
            _check(t.dtype == torch.float16 and t.shape == (h, d), i, f"{name} must be float16 [{h}, {d}]")
            _check(all_finite(t), i, f"{name} contains NaN or Inf")
        _check(bool((layer.key_lo <= layer.key_hi).all()), i, "key_lo must be <= key_hi")
    _check((layer.value_lo is None) == (layer.value_hi is None), i, "value_lo and value_hi come together")
    if layer.value_lo is not None and layer.value_hi is not None:
        for name in ("value_lo", "value_hi"):
            t = getattr(layer, name)
            _check(t.dtype == torch.float16 and t.shape == (h,), i, f"{name} must be float16 [{h}]")
            _check(all_finite(t), i, f"{name} contains NaN or Inf")
        _check(bool((layer.value_lo <= layer.value_hi).all()), i, "value_lo must be <= value_hi")


__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "STORED_FIELDS",
    "Recipe",
    "EntryKey",
    "Identity",
    "LayerKV",
    "CompressedKV",
    "make_layer",
    "quantize_layer",
    "pack_layer",
    "unpack_layer",
    "grid_values",
    "head_of_pages",
    "head_of_rows",
    "page_summaries",
    "page_of_rows",
    "page_counts",
    "validate_entry",
]
