"""Continuous batching: the compressed caches of every active stream in shared rows, one forward a step.

A decode worker serves many streams with one model. Each stream continues its own compressed
entry (or the entries of its context's chunks), which keep a different number of tokens per layer
and per KV head, at their original positions. ``BatchCache`` holds them all, per layer:

    keys, values  [R, H_kv, C, D]  one row per stream; C grows with the longest row
    valid         [R, H_kv, C]     which slots of a row are real (padding is False)
    positions     [R, H_kv, C]     the original position of each slot (selection's sinks)

A row's first ``entry_slots[layer, row]`` slots hold its entry's kept tokens, each head's
left-aligned (padded to the layer's longest head); the tokens appended since (query, generated)
follow, all heads alike. Active streams occupy rows ``0..rows-1``: a stream that leaves is
replaced by the last row (one copy), so a step's K/V are a view of the pool, never a gather.

A forward covers a contiguous range of rows (``cover``): one step over every active row with one
token each, or a stream's query (several tokens) on its own row when it joins. ``update`` writes
each covered row's new K/V at that row's next slot, in place; attention reads the pool up to the
longest covered row and masks per row and head (``attend``). For a one-token step the query heads
of a group become the query-length axis of ``scaled_dot_product_attention`` (``[R, H_kv, G, D]``
against ``[R, H_kv, T, D]``), so a ``[R, H_kv, 1, T]`` mask serves every head of the group and
nothing is repeated. Streams with a sparse selection (``workers.selection``) narrow their row's
mask on the layers after the first ``dense_layers``; on CPU a masked SDPA is the sparse path
(``bench decode`` measured it faster than gathering the chosen slots at the sizes dkv runs).

The model runs its own forward (transformers, any Llama-family model) with this object as its
``cache`` and the ``"dkv"`` attention (``workers.cache.dkv_attention`` hands batch keys here), and
explicit ``position_ids``: each row continues at its own ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from dkv.kvstore.entry import CompressedKV
from dkv.workers.selection import Selection, SelectionCache, SlotView

_SLOT_ALIGN = 64  # capacity grows in whole multiples (fewer reallocations, aligned rows)


@dataclass
class RowSelection:
    """A row's decode-time selection: the selector, the page size of the page summaries it reads
    (0: none) and those summaries per layer. ``observe(layer, keep, view)``, when given, sees
    every choice (the benchmarks count which tokens were attended)."""

    selector: Selection | SelectionCache
    page_size: int = 0
    observe: Callable[[int, torch.Tensor, SlotView], None] | None = None
    pages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    selected: list[float] = field(default_factory=list)  # mean slots per head, per sparse layer, this step


class BatchCache(Cache):
    """The rows of every active stream (see the module docstring). Not thread-safe: one model loop owns it."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        dense_layers: int = 0,
    ):
        super().__init__(layers=[])
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.dense_layers = dtype, torch.device(device), dense_layers
        self.rows = 0  # active rows: 0..rows-1
        self.release()

    # ------------------------------------------------------------------ storage

    def release(self) -> None:
        """Drop the pools (only while no row is active): memory comes back; the next stream reallocates."""
        n, h, d = self.num_layers, self.num_kv_heads, self.head_dim
        self.keys = [torch.empty(0, h, 0, d, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.values = [k.clone() for k in self.keys]
        self.valid = [torch.zeros(0, h, 0, dtype=torch.bool, device=self.device) for _ in range(n)]
        self.positions = [torch.zeros(0, h, 0, dtype=torch.int32, device=self.device) for _ in range(n)]
        self.entry_slots = torch.zeros(n, 0, dtype=torch.long)  # [L, R]
        self.padded = torch.zeros(n, 0, dtype=torch.bool)  # [L, R] the row's heads keep different counts
        self.appended = torch.zeros(0, dtype=torch.long)  # [R] tokens written after the entry
        self.seq_len = torch.zeros(0, dtype=torch.long)  # [R] position of the next token
        self.selections: list[RowSelection | None] = []
        self.first, self.count, self.q_len = 0, 0, 0

    @property
    def capacity_rows(self) -> int:
        return len(self.appended)

    def used(self, layer: int, row: int) -> int:
        """Slots of ``row`` in ``layer`` holding something: its entry, then what was appended."""
        return int(self.entry_slots[layer, row] + self.appended[row])

    def _reserve(self, rows: int, slots: list[int]) -> None:
        """Room for ``rows`` rows and, per layer, ``slots[layer]`` slots: grow the pools (copying
        the active rows) when they are smaller."""
        cap_rows = self.capacity_rows
        new_rows = cap_rows if rows <= cap_rows else max(rows, 2 * cap_rows, 2)
        for layer, need in enumerate(slots):
            cap = self.keys[layer].shape[2]
            new_cap = cap if need <= cap else _align(max(need, cap + cap // 4))
            if new_rows == cap_rows and new_cap == cap:
                continue
            self.keys[layer] = self._grown(self.keys[layer], new_rows, new_cap, layer)
            self.values[layer] = self._grown(self.values[layer], new_rows, new_cap, layer)
            self.valid[layer] = self._grown(self.valid[layer], new_rows, new_cap, layer)
            self.positions[layer] = self._grown(self.positions[layer], new_rows, new_cap, layer)
        if new_rows != cap_rows:
            grow = new_rows - cap_rows
            self.entry_slots = torch.cat([self.entry_slots, torch.zeros(self.num_layers, grow, dtype=torch.long)], 1)
            self.padded = torch.cat([self.padded, torch.zeros(self.num_layers, grow, dtype=torch.bool)], 1)
            self.appended = torch.cat([self.appended, torch.zeros(grow, dtype=torch.long)])
            self.seq_len = torch.cat([self.seq_len, torch.zeros(grow, dtype=torch.long)])
            self.selections.extend([None] * grow)

    def _grown(self, pool: torch.Tensor, rows: int, cap: int, layer: int) -> torch.Tensor:
        # zeros, not empty: attention multiplies masked slots' values by a zero weight, and 0 * NaN is NaN
        new = torch.zeros((rows, self.num_kv_heads, cap, *pool.shape[3:]), dtype=pool.dtype, device=self.device)
        for row in range(self.rows):
            used = self.used(layer, row)
            new[row, :, :used] = pool[row, :, :used]
        return new

    # ------------------------------------------------------------------ rows

    def place(self, entries: list[CompressedKV], room: int, selection: RowSelection | None = None) -> int:
        """Write a stream's entries (one, or its chunks in order) into a new row, one copy per
        head and chunk (dequantized on the way when stored quantized); ``room`` slots are kept
        free after the entry for its query and generated tokens. Returns the row."""
        row = self.rows
        first = entries[0]
        counts = [
            sum((e.layers[layer].head_counts() for e in entries), torch.zeros(first.num_kv_heads, dtype=torch.long))
            for layer in range(self.num_layers)
        ]
        slots = [int(c.max()) if len(c) else 0 for c in counts]
        sizes = (first.page_size, selection.page_size if selection is not None and selection.page_size else 1)
        self._reserve(row + 1, [max(-(-s // p) * p for p in sizes) + room for s in slots])  # whole pages fit
        for layer in range(self.num_layers):
            keys, values, valid, positions = (
                self.keys[layer][row],
                self.values[layer][row],
                self.valid[layer][row],
                self.positions[layer][row],
            )
            valid.fill_(False)
            positions.fill_(-1)
            start = torch.zeros(first.num_kv_heads, dtype=torch.long)
            for entry in entries:
                part = entry.layers[layer]
                if part.quantized:
                    k, v = part.dequantized(entry.page_size, self.dtype)
                else:
                    k, v = part.keys, part.values  # copy_ converts: one copy, straight into the row
                offsets = part.head_offsets.tolist()
                for h in range(first.num_kv_heads):
                    a, b = offsets[h], offsets[h + 1]
                    s = int(start[h])
                    keys[h, s : s + b - a].copy_(k[a:b])
                    values[h, s : s + b - a].copy_(v[a:b])
                    positions[h, s : s + b - a].copy_(part.positions[a:b])
                    valid[h, s : s + b - a] = True
                start += part.head_counts()
        self.entry_slots[:, row] = torch.tensor(slots)
        self.padded[:, row] = torch.tensor([bool(len(c)) and int(c.min()) < int(c.max()) for c in counts])
        self.appended[row] = 0
        self.seq_len[row] = entries[-1].seq_len
        if selection is not None:
            selection.pages = [
                self._page_summaries(layer, row, selection.page_size)
                if layer >= self.dense_layers and selection.page_size
                else None
                for layer in range(self.num_layers)
            ]
        self.selections[row] = selection
        self.rows += 1
        return row

    def _page_summaries(self, layer: int, row: int, page_size: int):
        """Per head min/max of K over each page of the row's entry slots (Quest), and the pages per head."""
        slots = int(self.entry_slots[layer, row])
        pages = -(-slots // page_size)
        keys = self.keys[layer][row, :, : pages * page_size].float()  # padding slots are masked below
        valid = self.valid[layer][row, :, : pages * page_size]
        k = keys.view(self.num_kv_heads, pages, page_size, self.head_dim)
        ok = valid.view(self.num_kv_heads, pages, page_size, 1)
        page_min = k.masked_fill(~ok, float("inf")).amin(2)
        page_max = k.masked_fill(~ok, float("-inf")).amax(2)
        num_pages = (valid.sum(1) + page_size - 1) // page_size
        empty = ~ok.any(2)
        return page_min.masked_fill(empty, 0), page_max.masked_fill(empty, 0), num_pages.to(torch.int32)

    def entry_tokens(self, row: int) -> list[float]:
        """Kept entry tokens per KV head of ``row`` (mean over the heads), per layer."""
        return [
            float(self.valid[layer][row, :, : int(self.entry_slots[layer, row])].sum()) / self.num_kv_heads
            for layer in range(self.num_layers)
        ]

    def remove(self, row: int) -> None:
        """Free ``row``: the last active row moves into it (one copy of that row)."""
        last = self.rows - 1
        if row != last:
            for layer in range(self.num_layers):
                used = self.used(layer, last)
                for pool in (self.keys, self.values, self.valid, self.positions):
                    pool[layer][row, :, :used] = pool[layer][last, :, :used]
                self.valid[layer][row, :, used:] = False  # what the row's old stream wrote further on
            self.entry_slots[:, row] = self.entry_slots[:, last]
            self.padded[:, row] = self.padded[:, last]
            self.appended[row], self.seq_len[row] = self.appended[last], self.seq_len[last]
            self.selections[row] = self.selections[last]
        self.selections[last] = None
        self.rows = last

    def cover(self, first: int, count: int, q_len: int) -> torch.Tensor:
        """The next forward runs ``q_len`` new tokens on each of rows ``first..first+count-1``;
        returns their ``position_ids`` ``[count, q_len]``. What every layer's ``update`` and
        ``attend`` share is worked out here, once a step."""
        self.first, self.count, self.q_len = first, count, q_len
        rows = slice(first, first + count)
        for sel in self.selections[rows]:
            if sel is not None:
                sel.selected.clear()
        self._row_index = torch.arange(first, first + count).unsqueeze(1).expand(count, q_len)
        self._offsets = self.appended[rows, None] + torch.arange(q_len)  # [count, q] after each row's entry
        starts = self.entry_slots[:, rows] + self.appended[rows]  # [L, count]
        self._ends = (starts.amax(1) + q_len).tolist()
        # no mask is needed where no covered row pads its heads and all of them end together
        self._masked = (self.padded[:, rows].any(1) | (starts.amin(1) != starts.amax(1))).tolist()
        return self.seq_len[rows, None] + torch.arange(q_len)

    def advance(self) -> None:
        """After the forward: the covered rows hold their new tokens."""
        rows = slice(self.first, self.first + self.count)
        self.appended[rows] += self.q_len
        self.seq_len[rows] += self.q_len

    # ------------------------------------------------------------------ transformers' Cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the covered rows' new K/V ``[count, H_kv, q_len, D]``; return the pool up to the
        longest covered row, tagged so ``attend`` masks it."""
        first, count = self.first, self.count
        r = self._row_index
        cols = self.entry_slots[layer_idx, first : first + count, None] + self._offsets  # [count, q]
        # pool[r, :, c] for index tensors r, c [count, q] is [count, q, H_kv, D]. Positions of
        # appended slots are never read: selection keeps every appended slot whatever its position.
        self.keys[layer_idx][r, :, cols] = key_states.transpose(1, 2).to(self.dtype)
        self.values[layer_idx][r, :, cols] = value_states.transpose(1, 2).to(self.dtype)
        self.valid[layer_idx][r, :, cols] = True
        end = self._ends[layer_idx]
        keys = self.keys[layer_idx][first : first + count, :, :end]
        keys.dkv_batch = (self, layer_idx)  # read by workers.cache.dkv_attention
        return keys, self.values[layer_idx][first : first + count, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seq_len[self.first]) if self.count else 0

    # ------------------------------------------------------------------ attention

    def attend(
        self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """query ``[count, H_q, q, D]`` over the covered rows -> ``[count, q, H_q, D]``."""
        count, h_q, q, d = query.shape
        end = keys.shape[2]
        valid = self.valid[layer][self.first : self.first + count, :, :end]  # [count, H_kv, T]
        if q == 1:
            mask = self._select(layer, query, valid) if layer >= self.dense_layers else None
            if mask is None and self._masked[layer]:
                mask = valid
            grouped = query.reshape(count, self.num_kv_heads, h_q // self.num_kv_heads, d)
            out = F.scaled_dot_product_attention(
                grouped, keys, values, scale=scaling, attn_mask=None if mask is None else mask.unsqueeze(2)
            )
            return out.reshape(count, 1, h_q, d)
        # row i's new tokens are at its own next slots: token j sees every slot up to its own
        rows = slice(self.first, self.first + count)
        last = (self.entry_slots[layer, rows] + self.appended[rows]).unsqueeze(1) + torch.arange(q)  # [count, q]
        causal = torch.arange(end) <= last.unsqueeze(-1)  # [count, q, T]
        full = (valid.unsqueeze(2) & causal.unsqueeze(1)).repeat_interleave(h_q // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=full, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def _select(self, layer: int, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """``valid`` narrowed, for the covered rows with a selection, to the slots it keeps; None
        when no covered row has one."""
        narrowed = None
        for i, sel in enumerate(self.selections[self.first : self.first + self.count]):
            if sel is None:
                continue
            row = self.first + i
            used = self.used(layer, row) + self.q_len
            summaries = sel.pages[layer]
            view = SlotView(
                self.keys[layer][row, :, :used],
                self.valid[layer][row, :, :used],
                self.positions[layer][row, :, :used],
                int(self.entry_slots[layer, row]),
                sel.page_size,
                *(summaries if summaries is not None else (None, None, None)),
            )
            q = query[i, :, 0]
            keep = (
                sel.selector.keep(layer, q, view)
                if isinstance(sel.selector, SelectionCache)
                else sel.selector.keep(q, view)
            )
            if narrowed is None:
                narrowed = valid.clone()
            narrowed[i, :, :used] = keep
            sel.selected.append(float(keep.sum(1).float().mean()))
            if sel.observe is not None:
                sel.observe(layer, keep, view)
        return narrowed


def _align(n: int) -> int:
    return -(-n // _SLOT_ALIGN) * _SLOT_ALIGN
