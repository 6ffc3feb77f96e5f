"""Row-wise integer quantization of K and V rows, with a bit width per row.

A row of ``D`` values at ``b`` bits is ``D * b / 8`` bytes, element ``e`` in bits
``(e % (8 / b)) * b`` of byte ``e // (8 / b)`` (low bits first, so int4 keeps the even element in
the low nibble). Rows are packed back to back; row ``r`` starts at the sum of the byte lengths of
the rows before it. Values map linearly onto ``[lo, hi]``:
``x ≈ lo + q * (hi - lo) / (2**b - 1)``, with ``lo``/``hi`` per row and channel (keys: the page's
min/max) or per row (values: the token's min/max).
"""

from __future__ import annotations

import torch

from dkv.kvstore.recipe import SCHEMES  # recipe quant scheme -> (bits of important tokens, bits of the rest)

BITS = (2, 4, 8)
MIXED_HIGH_FRACTION = 0.6  # ZipCache: the top 60% by saliency at 4 bits, the bottom 40% at 2


def row_nbytes(bits: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Bytes of each row, int64 [N]. Rows must fill whole bytes (2-bit rows need head_dim % 4 == 0)."""
    if head_dim % 4:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for rows of 2, 4 or 8 bits to fill whole bytes")
    return bits.long() * head_dim // 8


def packed_nbytes(bits: torch.Tensor, head_dim: int) -> int:
    return int(row_nbytes(bits, head_dim).sum())


def row_offsets(bits: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Byte offset of each row in the packed buffer, int64 [N]."""
    sizes = row_nbytes(bits, head_dim)
    return torch.cumsum(sizes, 0) - sizes


def _byte_index(offsets: torch.Tensor, nbytes: int) -> torch.Tensor:
    return offsets.unsqueeze(1) + torch.arange(nbytes)


def pack_rows(q: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Pack codes ``q`` uint8 [N, D] (each < 2**bits of its row) into uint8 [bytes]."""
    d = q.shape[1]
    out = torch.empty(packed_nbytes(bits, d), dtype=torch.uint8)
    offsets = row_offsets(bits, d)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().squeeze(1)
        per = 8 // b
        codes = q[rows].view(len(rows), d // per, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * b
        packed = (codes << shifts).sum(-1).to(torch.uint8)  # [rows, D * b / 8]
        out[_byte_index(offsets[rows], d * b // 8)] = packed
    return out


def unpack_rows(packed: torch.Tensor, bits: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: uint8 [N, D] codes."""
    out = torch.empty((bits.numel(), head_dim), dtype=torch.uint8)
    offsets = row_offsets(bits, head_dim)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().squeeze(1)
        per = 8 // b
        raw = packed[_byte_index(offsets[rows], head_dim * b // 8)].to(torch.int32)  # [rows, D*b/8]
        shifts = torch.arange(per, dtype=torch.int32) * b
        codes = (raw.unsqueeze(-1) >> shifts) & ((1 << b) - 1)
        out[rows] = codes.reshape(len(rows), head_dim).to(torch.uint8)
    return out


def _levels(bits: torch.Tensor) -> torch.Tensor:
    return ((1 << bits.long()) - 1).float().unsqueeze(1)  # [N, 1]


def quantize_rows(x: torch.Tensor, bits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` [N, D] onto ``[lo, hi]`` ([N, D] or [N, 1]) at each row's bits; packed uint8."""
    lo, hi = lo.float(), hi.float()
    span = (hi - lo).clamp_min(1e-12)
    levels = _levels(bits)
    q = torch.round((x.float() - lo) / span * levels).clamp_(min=0).minimum(levels)
    return pack_rows(q.to(torch.uint8), bits)


def dequantize_rows(
    packed: torch.Tensor, bits: torch.Tensor, head_dim: int, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """Float32 [N, D] rows from packed codes and their ranges ``lo``/``hi`` ([N, D] or [N, 1])."""
    q = unpack_rows(packed, bits, head_dim).float()
    return lo.float() + q * (hi.float() - lo.float()) / _levels(bits)


def bits_for_scheme(scheme: str, scores: torch.Tensor) -> torch.Tensor:
    """Bits per row for a recipe scheme; ``mixed`` gives the more important rows more bits.

    ``scores`` float [N] is the importance of each row (higher = more important).
    """
    split = SCHEMES.get(scheme)
    if split is None:
        raise ValueError(
            f"quant scheme {scheme!r} is not a quantized scheme; use one of "
            f"{', '.join(s for s, bits in SCHEMES.items() if bits)}"
        )
    high, low = split
    n = scores.numel()
    bits = torch.full((n,), low, dtype=torch.uint8)
    if high != low and n:
        keep = int(round(n * MIXED_HIGH_FRACTION))
        bits[torch.topk(scores.float(), keep).indices] = high
    elif n:
        bits.fill_(high)
    return bits
