"""A transformers Cache holding a compressed entry, and the attention function that reads it.

A compressed entry keeps a different set of tokens per layer and per KV head, at their original
positions. transformers builds one attention mask for all layers and heads, so it cannot express
that. ``DkvCache`` therefore stores, per layer, K/V padded to the longest head
(``[1, H_kv, T, D]``) with a validity mask ``[H_kv, T]``, tags the key tensor it returns from
``update`` with its layer, and the ``"dkv"`` attention function (registered in transformers'
``AttentionInterface``) masks per head. Positions continue at the entry's original length:
``get_seq_length`` reports the logical length (original context + tokens appended since), which
is what transformers uses for the next ``position_ids``.

Without a ``DkvCache`` the ``"dkv"`` attention is plain SDPA with exactly the masking choices of
transformers' ``sdpa`` implementation, so a model switched to it generates the same tokens.
Batch size 1 (one sequence per cache), as every dkv worker runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from dkv.kvstore.entry import CompressedKV

ATTN_IMPLEMENTATION = "dkv"


class DkvLayer(DynamicLayer):
    """One layer: K/V ``[1, H_kv, T, D]`` padded per head, ``valid`` ``[H_kv, T]`` (None = all valid).

    ``positions`` ``[H_kv, T]`` are the original token positions of each slot (-1 for padding),
    which decode-time selection and chunked compression use.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
        positions: torch.Tensor,
        logical_length: int,
    ):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.valid = valid
        self.positions = positions
        self.logical_length = logical_length
        self.is_initialized = True
        # decode-time sparse attention (workers.decode / workers.paged install it): called with
        # (query [1, H_q, q, D], scale); returns the output [1, q, H_q, D], or None for dense
        self.sparse_attend = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        heads = self.keys.shape[1]
        new_pos = torch.arange(self.logical_length, self.logical_length + q, device=self.positions.device)
        self.positions = torch.cat([self.positions, new_pos.expand(heads, q)], dim=1)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(heads, q)], dim=1)
        self.logical_length += q
        keys = self.keys
        keys.dkv_layer = self  # read by dkv_attention: the layer knows which slots are real
        return keys, self.values

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0


class DkvCache(Cache):
    """A transformers ``Cache`` of ``DkvLayer``s (see module docstring)."""

    def __init__(self, layers: list[DkvLayer]):
        super().__init__(layers=layers)

    @property
    def physical_lengths(self) -> list[int]:
        """Slots per layer (longest head), what attention actually reads."""
        return [layer.keys.shape[-2] for layer in self.layers]


def to_hf_cache(
    entry: CompressedKV, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DkvCache:
    """A ``DkvCache`` of ``entry`` (dequantized to ``dtype``) that decoding continues from at ``entry.seq_len``."""
    layers = []
    for layer in entry.layers:
        k, v = layer.dequantized(entry.page_size, dtype)
        counts = layer.head_counts().tolist()
        t = max(counts) if counts else 0
        keys = torch.zeros(1, entry.num_kv_heads, t, entry.head_dim, dtype=dtype)
        values = torch.zeros_like(keys)
        positions = torch.full((entry.num_kv_heads, t), -1, dtype=torch.long)
        offsets = layer.head_offsets.tolist()
        for h, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            keys[0, h, : end - start] = k[start:end]
            values[0, h, : end - start] = v[start:end]
            positions[h, : end - start] = layer.positions[start:end].long()
        valid = None if len(set(counts)) <= 1 else positions >= 0
        layers.append(
            DkvLayer(
                keys.to(device),
                values.to(device),
                None if valid is None else valid.to(device),
                positions.to(device),
                entry.seq_len,
            )
        )
    return DkvCache(layers)


def dkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for transformers' ``AttentionInterface``: per-head masks from a ``DkvCache``.

    query ``[1, H_q, q, D]``, key/value ``[1, H_kv, T, D]``; returns ``[1, q, H_q, D]`` and None.
    """
    batch = getattr(key, "dkv_batch", None)
    if batch is not None:  # the rows of a continuous batch (workers.batch)
        cache, layer_idx = batch
        return cache.attend(layer_idx, query, key, value, scaling), None
    layer = getattr(key, "dkv_layer", None)
    q_len, t = query.shape[2], key.shape[2]
    if layer is not None and layer.sparse_attend is not None:
        out = layer.sparse_attend(query, scaling)
        if out is not None:
            return out, None
    if layer is None or layer.valid is None:
        # transformers' sdpa choices: is_causal for a plain prompt, no mask for one new token
        if attention_mask is None and q_len > 1 and q_len == t:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = attention_mask if attention_mask is not None else _causal_tail(q_len, t, query.device)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    else:
        mask = layer.valid[:, None, :]  # [H_kv, 1, T]
        tail = _causal_tail(q_len, t, query.device)
        if tail is not None:
            mask = mask & tail
        groups = query.shape[1] // key.shape[1]
        mask = mask.repeat_interleave(groups, dim=0).unsqueeze(0)  # [1, H_q, q | 1, T]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _causal_tail(q_len: int, t: int, device) -> torch.Tensor | None:
    """[q, T] bool: the q new tokens (the last q slots) see every earlier slot and themselves causally."""
    if q_len == 1:
        return None
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(t, device=device).unsqueeze(0)
    return cols <= rows + (t - q_len)


AttentionInterface.register(ATTN_IMPLEMENTATION, dkv_attention)
