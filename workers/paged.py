"""Decoding from an entry that stays in the store: page summaries first, then only the pages needed.

The decode worker fetches the entry's page summaries once (``StoreClient.summaries``: per page
and KV head, the elementwise min/max of K). At every step and layer it ranks the pages by the
Quest upper bound of ``q·k`` (``kernels.page_scores``; for a multi-token step the mean query, as
TokenSelect does), always adds each head's first page (attention sinks) and last page (the most
recent entry tokens), fetches the pages it lacks with ``StoreClient.select`` into a bounded LRU
page cache (``page_cache``), and attends over those rows plus every token appended since (the query and the
generated tokens, kept locally). Bytes moved per step grow with the budget, not the context.

If the store no longer has the entry mid-way (evicted, lost), ``EntryLost`` is raised; the caller
recomputes the entry through the prefill service and decodes again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dkv.kernels.page_scores import page_scores
from dkv.kernels.sparse_attention import sparse_decode_attention
from dkv.workers.cache import DkvCache, DkvLayer, _causal_tail
from dkv.workers.lru import BytesLRU


class EntryLost(RuntimeError):
    """The store missed a page of an entry being decoded: recompute it."""


@dataclass
class FetchStats:
    context_tokens: int = 0
    bytes_per_step: list[int] = field(default_factory=list)
    pages_per_step: list[int] = field(default_factory=list)
    tiers: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0


def page_cache(capacity_bytes: int) -> BytesLRU:
    """The worker's local copy of fetched pages: ``(layer, page) -> (head, K [n, D], V [n, D])``
    dequantized to the model's dtype on the model's device (device memory on a GPU)."""
    return BytesLRU(capacity_bytes, lambda item: item[1].numel() * item[1].element_size() * 2)


class RemoteEntry:
    """An entry read page by page through a ``StoreClient``."""

    def __init__(self, client, key: str, dtype: torch.dtype, device, cache: BytesLRU, stats: FetchStats):
        summaries = client.summaries(key)
        if summaries is None:
            raise EntryLost(f"the store has no entry {key}")
        self.client, self.key, self.dtype, self.device = client, key, dtype, device
        self.cache, self.stats = cache, stats
        first = summaries[0]
        self.seq_len, self.page_size = first.seq_len, first.page_size
        stats.context_tokens = self.seq_len
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.layers = [_LayerPages(s, dtype, device) for s in summaries]
        self.step_bytes = 0
        self.step_pages = 0

    def fetch(self, layer: int, pages: list[int]) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
        """``page -> (head, K, V)`` for ``pages`` of ``layer``: local ones from the cache, the rest from the store."""
        found, missing = {}, []
        for page in pages:
            item = self.cache.get((layer, page))
            if item is None:
                missing.append(page)
            else:
                found[page] = item
        self.stats.cache_hits += len(found)
        self.stats.cache_misses += len(missing)
        if missing:
            reply = self.client.select(self.key, layer, missing)
            if reply is None:
                raise EntryLost(f"the store lost entry {self.key} while it was being decoded")
            parts, nbytes, tier = reply
            self.step_bytes += nbytes
            self.step_pages += len(missing)
            self.stats.tiers[tier] = self.stats.tiers.get(tier, 0) + nbytes
            pages_iter = iter(missing)
            for part in parts:
                self._split(layer, part, pages_iter, found)
        return found

    def _split(self, layer: int, part, pages_iter, found: dict) -> None:
        k, v = part.dequantized(self.page_size, self.dtype)
        info = self.layers[layer]
        counts = part.head_counts().tolist()
        row = 0
        for head, n in enumerate(counts):
            end = row + n
            while row < end:
                page = next(pages_iter)
                rows = min(self.page_size, end - row)
                assert info.page_head[page] == head, "pages came back out of order"
                item = (head, k[row : row + rows].to(self.device), v[row : row + rows].to(self.device))
                self.cache.put((layer, page), item)
                found[page] = item
                row += rows


class _LayerPages:
    """One layer's summaries, padded per head: page_min/max ``[H_kv, P, D]``, num_pages ``[H_kv]``."""

    def __init__(self, summary, dtype, device):
        counts = summary.head_counts.long()
        size = summary.page_size
        pages = (counts + size - 1) // size
        self.num_pages = pages.to(torch.int32)
        self.first_page = torch.cumsum(pages, 0) - pages  # global index of each head's page 0
        self.page_head = torch.repeat_interleave(torch.arange(len(pages)), pages).tolist()
        p_max = int(pages.max()) if len(pages) else 0
        d = summary.page_min.shape[1]
        self.page_min = torch.zeros(len(pages), p_max, d, dtype=dtype, device=device)
        self.page_max = torch.zeros_like(self.page_min)
        for h, (start, n) in enumerate(zip(self.first_page.tolist(), pages.tolist())):
            self.page_min[h, :n] = summary.page_min[start : start + n].to(dtype)
            self.page_max[h, :n] = summary.page_max[start : start + n].to(dtype)


class PagedLayer(DkvLayer):
    """A cache layer whose entry tokens stay in the store; only appended tokens live here."""

    def __init__(self, index: int, entry: RemoteEntry, budget_pages: int, recorder: list):
        h, d = entry.num_kv_heads, entry.head_dim
        empty = torch.zeros(1, h, 0, d, dtype=entry.dtype, device=entry.device)
        super().__init__(empty, empty.clone(), None, torch.zeros(h, 0, dtype=torch.long), entry.seq_len)
        self.index, self.entry, self.budget_pages, self.recorder = index, entry, budget_pages, recorder
        self.sparse_attend = self._attend

    def _choose(self, q: torch.Tensor) -> list[int]:
        """Global page indices for this step: the best bounds per head, plus each head's first and last page."""
        info = self.entry.layers[self.index]
        bound = page_scores(q, info.page_min, info.page_max, info.num_pages)  # [H_kv, P]
        chosen = set()
        for h in range(bound.shape[0]):
            n = int(info.num_pages[h])
            if n == 0:
                continue
            first = int(info.first_page[h])
            chosen.update({first, first + n - 1})
            k = min(self.budget_pages, n)
            chosen.update((first + torch.topk(bound[h, :n], k).indices).tolist())
        return sorted(chosen)

    def _attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """query ``[1, H_q, q, D]`` (q >= 1) -> ``[1, q, H_q, D]`` over chosen pages + appended tokens."""
        q_len = query.shape[2]
        q_mean = query[0].float().mean(1)  # [H_q, D]
        pages = self.entry.fetch(self.index, self._choose(q_mean.to(self.entry.dtype)))
        h_kv, d = self.keys.shape[1], self.keys.shape[3]
        per_head_k = [[] for _ in range(h_kv)]
        per_head_v = [[] for _ in range(h_kv)]
        for page in sorted(pages):
            head, k, v = pages[page]
            per_head_k[head].append(k)
            per_head_v[head].append(v)
        counts = [sum(len(x) for x in ks) for ks in per_head_k]
        width = max(counts) if counts else 0
        n_app = self.keys.shape[2]
        keys = torch.zeros(h_kv, width + n_app, d, dtype=self.keys.dtype, device=self.keys.device)
        values = torch.zeros_like(keys)
        valid = torch.zeros(h_kv, width + n_app, dtype=torch.bool, device=self.keys.device)
        for h in range(h_kv):
            if counts[h]:
                keys[h, : counts[h]] = torch.cat(per_head_k[h])
                values[h, : counts[h]] = torch.cat(per_head_v[h])
                valid[h, : counts[h]] = True
        keys[:, width:] = self.keys[0]
        values[:, width:] = self.values[0]
        valid[:, width:] = True
        self.recorder.append(float(valid.sum(1).float().mean()))
        if q_len == 1:
            lengths = valid.sum(1).to(torch.int32)
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices.to(torch.int32)
            out = sparse_decode_attention(query[0, :, 0], keys, values, order, lengths, scale)
            return out.view(1, 1, *out.shape)
        groups = query.shape[1] // h_kv
        mask = valid[:, None, :] & _causal_tail(q_len, keys.shape[1], keys.device)
        out = F.scaled_dot_product_attention(
            query,
            keys.unsqueeze(0),
            values.unsqueeze(0),
            scale=scale,
            attn_mask=mask.repeat_interleave(groups, dim=0).unsqueeze(0),
            enable_gqa=True,
        )
        return out.transpose(1, 2)


def paged_cache(entry: RemoteEntry, budget: int, recorder: list) -> DkvCache:
    """A ``DkvCache`` of ``PagedLayer``s attending to about ``budget`` entry tokens per KV head."""
    budget_pages = max(1, -(-budget // entry.page_size))
    return DkvCache([PagedLayer(i, entry, budget_pages, recorder) for i in range(len(entry.layers))])
