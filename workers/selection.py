"""Decode-time selection: per step, layer and KV head, which cached slots the query attends to.

Every method answers ``keep(q, view)``: ``[H_kv, T]`` bool, the slots each KV head attends (the
batched decoder masks attention with it), or ``select(q, view)``: the same packed as ``(indices
[H_kv, S] int32, lengths [H_kv] int32)`` for the sparse kernels; always including the sink tokens (the first
``sink`` positions) and the recent slots (everything appended since the entry, plus the last
``recent`` of the entry), as TokenSelect and Quest do. The methods:

- ``dense``: every valid slot (the reference);
- ``topk``: exact ``q·k`` per query head, softmax over slots, summed over the query heads of each
  KV head (TokenSelect's soft vote), top-``budget`` slots;
- ``pages``: Quest: an upper bound of ``q·k`` per page from the page's elementwise min/max of K,
  the top pages by bound, then every slot of those pages;

``SelectionCache`` wraps any of them and reuses the previous step's choice for a layer while the
mean query of consecutive steps stays similar (cosine ≥ ``threshold``), as TokenSelect's
Selection Cache does. Budgets are token counts per KV head (``budget``) or a fraction of the
cached tokens (``budget_fraction``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dkv.kernels.page_scores import page_scores

SELECTIONS: dict[str, type[Selection]] = {}


def register(cls: type[Selection]) -> type[Selection]:
    SELECTIONS[cls.name] = cls
    return cls


@dataclass
class SlotView:
    """What selection reads of one layer: slot layout and page summaries of the cached entry.

    keys ``[H_kv, T, D]``; valid ``[H_kv, T]`` bool; ``entry_slots`` = the first slots, which hold
    the entry's tokens (pages cover them: slot t of a head is in page ``t // page_size``); the
    slots after them were appended during decoding. page_min/page_max ``[H_kv, P, D]``,
    num_pages ``[H_kv]``.
    """

    keys: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    entry_slots: int
    page_size: int
    page_min: torch.Tensor | None = None
    page_max: torch.Tensor | None = None
    num_pages: torch.Tensor | None = None


@dataclass
class Selection(ABC):
    """Base: ``budget`` tokens per KV head (0 = use ``budget_fraction``; both 0 = everything)."""

    name: ClassVar[str] = ""
    budget: int = 0
    budget_fraction: float = 0.0
    sink: int = 4
    recent: int = 32

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"budget {self.budget} must be >= 0 tokens per KV head")
        if not 0.0 <= self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction {self.budget_fraction} must be in [0, 1]")

    def tokens(self, view: SlotView) -> int:
        """The per-head budget for this view."""
        if self.budget:
            return self.budget
        if self.budget_fraction:
            return max(1, round(self.budget_fraction * view.entry_slots))
        return view.keys.shape[1]

    @abstractmethod
    def keep(self, q: torch.Tensor, view: SlotView) -> torch.Tensor:
        """q ``[H_q, D]`` (this step's query) -> ``[H_kv, T]`` bool: the slots each KV head attends."""

    def select(self, q: torch.Tensor, view: SlotView) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[H_q, D]`` -> (indices ``[H_kv, S]`` int32, lengths ``[H_kv]`` int32), for the sparse kernels."""
        return pack(self.keep(q, view))


def always_kept(view: SlotView, sink: int, recent: int) -> torch.Tensor:
    """``[H_kv, T]`` bool: valid sink positions, the last ``recent`` entry slots, every appended slot."""
    t = view.keys.shape[1]
    slot = torch.arange(t)
    keep = (view.positions < sink) | (slot >= view.entry_slots)
    counts = view.valid[:, : view.entry_slots].sum(1, keepdim=True)  # real entry slots per head
    keep |= (slot < view.entry_slots) & (slot >= counts - recent)
    return keep & view.valid


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H_kv, T]`` bool -> (indices ``[H_kv, S]`` int32 ascending, lengths ``[H_kv]`` int32)."""
    lengths = mask.sum(1)
    s = int(lengths.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :s]
    return order.to(torch.int32), lengths.to(torch.int32)


def _top(score: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """``keep`` plus, per head, the best-scoring valid slots until the head has ``budget``: ``[H_kv, T]``."""
    extra = (budget - keep.sum(1)).clamp(min=0)  # [H_kv]
    k = min(int(extra.max()), score.shape[1])
    if k <= 0:
        return keep
    rest = score.masked_fill(keep | ~valid, float("-inf"))
    top = torch.topk(rest, k, dim=1)
    wanted = (torch.arange(k) < extra.unsqueeze(1)) & torch.isfinite(top.values)
    chosen = torch.zeros_like(keep)
    chosen.scatter_(1, top.indices, wanted)
    return keep | chosen


@register
@dataclass
class Dense(Selection):
    name: ClassVar[str] = "dense"

    def keep(self, q, view):
        return view.valid


@register
@dataclass
class TopK(Selection):
    """Exact q·k, soft vote over each group's query heads (TokenSelect)."""

    name: ClassVar[str] = "topk"

    def keep(self, q, view):
        h_kv = view.keys.shape[0]
        groups = q.shape[0] // h_kv
        logits = torch.einsum("gd,gtd->gt", q.float(),
                              view.keys.float().repeat_interleave(groups, dim=0))  # [H_q, T]
        logits = logits.masked_fill(~view.valid.repeat_interleave(groups, dim=0), float("-inf"))
        vote = torch.softmax(logits, dim=1).view(h_kv, groups, -1).sum(1)  # [H_kv, T]
        keep = always_kept(view, self.sink, self.recent)
        return _top(vote, keep, view.valid, self.tokens(view))


@register
@dataclass
class Pages(Selection):
    """Quest: pages ranked by the upper bound of q·k from their min/max keys."""

    name: ClassVar[str] = "pages"

    def keep(self, q, view):
        if view.page_min is None:
            raise ValueError("selection 'pages' needs the entry's page summaries")
        bound = page_scores(q, view.page_min, view.page_max, view.num_pages)  # [H_kv, P]
        n_pages = max(1, -(-self.tokens(view) // view.page_size))
        top = torch.topk(bound, min(n_pages, bound.shape[1]), dim=1)
        t = view.keys.shape[1]
        slot_page = torch.arange(t) // view.page_size
        chosen = torch.zeros(bound.shape, dtype=torch.bool)
        chosen.scatter_(1, top.indices, torch.isfinite(top.values))
        in_page = torch.gather(chosen, 1, slot_page.clamp(max=bound.shape[1] - 1).expand(len(chosen), t))
        in_page &= torch.arange(t) < view.entry_slots
        return always_kept(view, self.sink, self.recent) | (in_page & view.valid)


@dataclass
class SelectionCache:
    """Reuse a layer's previous selection while the mean query stays similar (TokenSelect)."""

    inner: Selection
    threshold: float = 0.9
    _last: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    hits: int = 0
    misses: int = 0

    def keep(self, layer: int, q: torch.Tensor, view: SlotView) -> torch.Tensor:
        """``inner.keep`` for layer ``layer``, or its last answer (plus every slot appended since)."""
        mean_q = q.float().mean(0)
        last = self._last.get(layer)
        if last is not None and torch.cosine_similarity(mean_q, last[0], dim=0) >= self.threshold:
            self.hits += 1
            previous = last[1]
            keep = view.valid.clone()  # slots appended since the choice was made: always attended
            keep[:, : previous.shape[1]] = previous
            return keep
        self.misses += 1
        keep = self.inner.keep(q, view)
        self._last[layer] = (mean_q, keep)
        return keep

    def select(self, layer: int, q: torch.Tensor, view: SlotView) -> tuple[torch.Tensor, torch.Tensor]:
        return pack(self.keep(layer, q, view))


def make_selection(name: str, budget: int = 0, budget_fraction: float = 0.0, **params) -> Selection:
    try:
        cls = SELECTIONS[name]
    except KeyError:
        raise ValueError(f"unknown selection {name!r}; use one of {sorted(SELECTIONS)}") from None
    return cls(budget=budget, budget_fraction=budget_fraction, **params)
