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
    recent: int = 8

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
    """``[H_kv, T]`` bool: the entry's valid sink positions and the ``recent`` newest valid slots
    (appended slots are the newest: the query's and the generated tokens, then the entry's last)."""
    slot = torch.arange(view.keys.shape[1])
    newer = view.valid.flip(1).cumsum(1).flip(1)  # valid slots at or after each slot
    keep = ((view.positions < sink) & (slot < view.entry_slots)) | (newer <= recent)
    return keep & view.valid


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H_kv, T]`` bool -> (indices ``[H_kv, S]`` int32 ascending, lengths ``[H_kv]`` int32)."""
    lengths = mask.sum(1)
    s = int(lengths.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :s]
    return order.to(torch.int32), lengths.to(torch.int32)


def _top(score: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """``keep`` plus the best-scoring valid slots of any head until the layer holds ``budget``
    slots per head on average: ``[H_kv, T]``. Heads share the layer's budget, so ``score`` must be
    comparable across heads (attention weights are): a head whose attention is spread out takes
    slots that a head attending to a few tokens does not need."""
    extra = budget * keep.shape[0] - int(keep.sum())
    rest = score.masked_fill(keep | ~valid, float("-inf")).flatten()
    k = min(extra, rest.numel())
    if k <= 0:
        return keep
    top = torch.topk(rest, k)
    chosen = torch.zeros_like(rest, dtype=torch.bool)
    chosen[top.indices] = torch.isfinite(top.values)
    return keep | chosen.view_as(keep)


@register
@dataclass
class Dense(Selection):
    name: ClassVar[str] = "dense"

    def keep(self, q, view):
        return view.valid


@register
@dataclass
class TopK(Selection):
    """Exact attention weights, soft vote over each group's query heads (TokenSelect)."""

    name: ClassVar[str] = "topk"

    def keep(self, q, view):
        h_kv, _, d = view.keys.shape
        groups = q.shape[0] // h_kv
        # the model's own softmax scale (1/sqrt(D) in the Llama family): without it the vote is
        # sharper than the attention, over-weights the head with the largest logits, and the
        # weights of different heads are not comparable when they share the layer's budget
        logits = (
            torch.einsum("gd,gtd->gt", q.float(), view.keys.float().repeat_interleave(groups, dim=0)) * d**-0.5
        )  # [H_q, T]
        logits = logits.masked_fill(~view.valid.repeat_interleave(groups, dim=0), float("-inf"))
        vote = torch.softmax(logits, dim=1).view(h_kv, groups, -1).sum(1)  # [H_kv, T]
        keep = always_kept(view, self.sink, self.recent)
        return _top(vote, keep, view.valid, self.tokens(view))


@register
@dataclass
class Pages(Selection):
    """Quest: pages ranked by the upper bound of q·k from their min/max keys.

    The entry's slots are paged as the view's summaries say; the appended slots (the query's and
    the generated tokens) get pages of their own, summarized here from their keys. Each head's
    bounds become weights (a softmax over its pages at the model's scale), so the heads of a layer
    share its budget as ``topk``'s do; pages are taken best first while their slots fit the budget.
    """

    name: ClassVar[str] = "pages"
    page_size: int = 4  # of the summaries a decode worker computes from the row's keys

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.page_size < 1:
            raise ValueError(f"page_size {self.page_size} must be >= 1 slot")

    def keep(self, q, view):
        if view.page_min is None:
            raise ValueError("selection 'pages' needs the entry's page summaries")
        h_kv, t, d = view.keys.shape
        size, entry = view.page_size, view.entry_slots
        entry_pages = view.page_min.shape[1]
        tail_min, tail_max, tail_pages = _tail_summaries(view)
        bound = (
            torch.cat(
                [
                    page_scores(q, view.page_min, view.page_max, view.num_pages),
                    page_scores(q, tail_min, tail_max, tail_pages),
                ],
                dim=1,
            )
            * d**-0.5
        )  # [H_kv, P]
        weight = torch.softmax(bound, dim=1).nan_to_num(0.0)  # a head without pages: all -inf
        keep = always_kept(view, self.sink, self.recent)
        slot = torch.arange(t)
        page_of = torch.where(slot < entry, slot // size, entry_pages + (slot - entry) // size).expand(h_kv, t)
        cost = torch.zeros_like(bound, dtype=torch.long).scatter_add_(1, page_of, (view.valid & ~keep).long())
        order = torch.argsort(weight.flatten(), descending=True)
        spent = torch.cumsum(cost.flatten()[order], 0)
        chosen = torch.zeros(bound.numel(), dtype=torch.bool)
        chosen[order] = spent <= self.tokens(view) * h_kv - int(keep.sum())
        return keep | (torch.gather(chosen.view_as(bound), 1, page_of) & view.valid)


def _tail_summaries(view: SlotView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max keys ``[H_kv, P_tail, D]`` of the appended slots' pages, and their count per head."""
    h_kv, t, d = view.keys.shape
    size = view.page_size
    n = t - view.entry_slots
    pages = -(-n // size)
    keys = torch.zeros(h_kv, pages * size, d, dtype=torch.float32)
    valid = torch.zeros(h_kv, pages * size, dtype=torch.bool)
    keys[:, :n] = view.keys[:, view.entry_slots :].float()
    valid[:, :n] = view.valid[:, view.entry_slots :]
    k = keys.view(h_kv, pages, size, d)
    ok = valid.view(h_kv, pages, size, 1)
    page_min = k.masked_fill(~ok, float("inf")).amin(2).nan_to_num(posinf=0.0)
    page_max = k.masked_fill(~ok, float("-inf")).amax(2).nan_to_num(neginf=0.0)
    return page_min, page_max, torch.full((h_kv,), pages, dtype=torch.int32)


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
