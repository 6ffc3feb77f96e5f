"""Graded demotion: shrink an entry on its way to a slower tier instead of moving it whole.

Two steps, each driven by what the entry stores about itself: ``drop_tokens`` keeps, per layer
and KV head, the most important fraction of tokens by their stored scores; ``requantize`` lowers
K/V precision (fp16 -> int8/int4, or int8 -> int4). Quantized pruning (methods.md §2.18) says to
quantize before dropping: 4x the tokens at 4 bits beat 1x at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dkv.kvstore import quant
from dkv.kvstore.entry import CompressedKV, LayerKV, head_of_rows, make_layer, quantize_layer


@dataclass(frozen=True)
class ShrinkRule:
    """What a tier does to entries that enter it from above: keep a fraction, requantize."""

    keep_fraction: float = 1.0
    quant: str = "none"  # none, int8, int4 or mixed

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction {self.keep_fraction} must be in (0, 1]")
        if self.quant not in quant.SCHEMES:
            raise ValueError(f"quant {self.quant!r} must be one of {sorted(quant.SCHEMES)}")

    @property
    def is_noop(self) -> bool:
        return self.keep_fraction >= 1.0 and self.quant == "none"

    def apply(self, entry: CompressedKV) -> CompressedKV:
        if self.quant != "none":
            entry = requantize(entry, self.quant)
        if self.keep_fraction < 1.0:
            entry = drop_tokens(entry, self.keep_fraction)
        return entry


def _max_bits(scheme: str) -> int:
    bits = quant.SCHEMES[scheme]
    return 16 if bits is None else max(bits)


def requantize(entry: CompressedKV, scheme: str) -> CompressedKV:
    """The entry with K/V at ``scheme``; rows already at fewer bits are left as they are."""
    if scheme == "none":
        return entry
    layers, changed = [], False
    for layer in entry.layers:
        if layer.key_bits is not None and int(layer.key_bits.max()) <= _max_bits(scheme):
            layers.append(layer)
            continue
        layers.append(quantize_layer(layer, quant.bits_for_scheme(scheme, layer.scores), entry.page_size))
        changed = True
    if not changed:
        return entry
    return entry.replace(layers=layers, derived=entry.derived + (f"quant:{scheme}",))


def _keep_rows(layer: LayerKV, keep_fraction: float) -> torch.Tensor:
    """Row indices to keep, [M], ascending: per head the top scores, at least one row."""
    rows = []
    offsets = layer.head_offsets.long().tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        n = end - start
        if n == 0:
            continue
        k = max(1, round(n * keep_fraction))
        top = torch.topk(layer.scores[start:end], k).indices + start
        rows.append(torch.sort(top).values)
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)


def drop_tokens(entry: CompressedKV, keep_fraction: float) -> CompressedKV:
    """Keep the top ``keep_fraction`` of tokens per layer and head by stored score.

    The entry's importance scales by the share of score mass kept (scores clamped at 0).
    """
    layers, kept_mass, total_mass = [], 0.0, 0.0
    for layer in entry.layers:
        keep = _keep_rows(layer, keep_fraction)
        mass = layer.scores.clamp_min(0)
        kept_mass += float(mass[keep].sum())
        total_mass += float(mass.sum())
        head_of_row = head_of_rows(layer.head_offsets)
        kept_heads = head_of_row[keep]
        k, v = layer.dequantized(entry.page_size, torch.float32)
        dense_dtype = layer.page_min.dtype if layer.quantized else layer.keys.dtype
        per_head = [(kept_heads == h).nonzero().squeeze(1) for h in range(entry.num_kv_heads)]
        new = make_layer(
            [layer.positions[keep][i].long() for i in per_head],
            [k[keep][i].to(dense_dtype) for i in per_head],
            [v[keep][i].to(dense_dtype) for i in per_head],
            [layer.scores[keep][i] for i in per_head],
            entry.page_size,
        )
        if layer.key_bits is not None and layer.value_bits is not None:
            new = quantize_layer(new, layer.key_bits[keep], entry.page_size, layer.value_bits[keep])
        layers.append(new)
    share = kept_mass / total_mass if total_mass > 0 else keep_fraction
    return entry.replace(
        layers=layers,
        importance=entry.importance * share,
        derived=entry.derived + (f"shrink:{keep_fraction:g}",),
    )
