"""One prefill pass that records what the compression methods need, and nothing more.

Per layer it keeps the post-RoPE K/V of every visible token (past + new), and, only when a method
asks for them:

- ``window_attention`` ``[H_q, w, T]``: softmax attention of the last ``w`` new queries over every
  visible key (causal inside the window), the observation window of SnapKV, PyramidKV,
  DynamicKV and CAKE. It costs a ``w × T`` slice beside the main attention.
- ``attention_colsum`` ``[H_q, T]``: ``Σ_i softmax(q_i Kᵀ)`` over every new query, the accumulated
  attention of H2O and D2O, computed in row blocks so the ``T × T`` matrix never exists.

Queries are recomputed in a forward hook on each attention module from its input and its rotary
embeddings (as kvpress does), so the model's own attention kernel (SDPA) is untouched; logits
are computed for the last position only (``logits_to_keep=1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dkv.workers.cache import DkvCache

COLSUM_BLOCK = 256


@dataclass
class LayerCapture:
    """What one layer saw. ``T`` = past slots + new tokens; ``new`` = the last ``n_new`` slots."""

    keys: torch.Tensor  # [H_kv, T, D] post-RoPE
    values: torch.Tensor  # [H_kv, T, D]
    valid: torch.Tensor | None  # [H_kv, T] bool, None = every slot valid
    positions: torch.Tensor  # [H_kv, T] original token positions (-1 = padding)
    n_new: int
    window_attention: torch.Tensor | None = None  # [H_q, w, T] float32
    attention_colsum: torch.Tensor | None = None  # [H_q, T] float32

    @property
    def new_slice(self) -> slice:
        return slice(self.keys.shape[1] - self.n_new, self.keys.shape[1])


@dataclass
class Capture:
    layers: list[LayerCapture]
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    start: int  # position of the first new token
    seq_len: int  # position after the last new token
    last_logits: torch.Tensor  # [vocab] float32
    cache: object = field(repr=False, default=None)  # the model's cache after the pass


class _Recorder:
    """Forward hooks on every attention module; computes window attention / colsums per layer."""

    def __init__(self, model, window: int, colsum: bool):
        self.window, self.colsum = window, colsum
        self.window_attention: dict[int, torch.Tensor] = {}
        self.attention_colsum: dict[int, torch.Tensor] = {}
        self.handles = [
            layer.self_attn.register_forward_hook(self._hook, with_kwargs=True) for layer in model.model.layers
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        cache_layer = kwargs["cache"].layers[module.layer_idx]
        keys = cache_layer.keys  # [1, H_kv, T, D], including this pass's tokens
        valid = getattr(cache_layer, "valid", None)
        n = hidden.shape[1]
        if self.window:
            w = min(self.window, n)
            q = _queries(module, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
            self.window_attention[module.layer_idx] = _softmax_rows(q, keys, valid, module.scaling)[0]
        if self.colsum:
            total = None
            for start in range(0, n, COLSUM_BLOCK):
                end = min(start + COLSUM_BLOCK, n)
                q = _queries(module, hidden[:, start:end], cos[:, start:end], sin[:, start:end])
                part = _softmax_rows(q, keys, valid, module.scaling, rows_before_end=n - end)[0].sum(1)
                total = part if total is None else total + part
            self.attention_colsum[module.layer_idx] = total


def _queries(module, hidden, cos, sin) -> torch.Tensor:
    """Post-RoPE queries [1, H_q, n, D] of ``hidden`` [1, n, hidden]."""
    q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q


def _softmax_rows(
    q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float, rows_before_end: int = 0
) -> torch.Tensor:
    """softmax(q Kᵀ) [1, H_q, n, T] for queries that are the n new tokens ending ``rows_before_end``
    before the last slot: causal among new tokens, padding slots masked."""
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [1, H_q, n, T]
    n, t = q.shape[2], k.shape[2]
    last = t - 1 - rows_before_end
    rows = torch.arange(last - n + 1, last + 1).unsqueeze(1)
    mask = torch.arange(t).unsqueeze(0) <= rows  # [n, T]
    if valid is not None:
        mask = mask & valid.repeat_interleave(groups, dim=0)[:, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def prefill(
    model, input_ids: torch.Tensor, window: int = 0, colsum: bool = False, past: DkvCache | None = None
) -> Capture:
    """Run ``input_ids`` ``[1, n]`` through ``model`` (after ``past``) and capture per layer.

    ``window``: observation-window size for ``window_attention`` (0 = none). ``colsum``: compute
    ``attention_colsum``. With ``past``, positions continue at its logical length.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, n], got {tuple(input_ids.shape)}")
    recorder = _Recorder(model, window, colsum)
    start = past.get_seq_length() if past is not None else 0
    n = input_ids.shape[1]
    try:
        out = model(
            input_ids=input_ids,
            cache=past,
            use_cache=True,
            logits_to_keep=1,
            position_ids=torch.arange(start, start + n).unsqueeze(0),
        )
    finally:
        recorder.close()
    cfg = model.config
    layers = []
    for i, layer in enumerate(out.cache.layers):
        t = layer.keys.shape[2]
        positions = getattr(layer, "positions", None)
        if positions is None:
            positions = torch.arange(t).expand(layer.keys.shape[1], t)
        layers.append(
            LayerCapture(
                keys=layer.keys[0],
                values=layer.values[0],
                valid=getattr(layer, "valid", None),
                positions=positions,
                n_new=n,
                window_attention=recorder.window_attention.get(i),
                attention_colsum=recorder.attention_colsum.get(i),
            )
        )
    return Capture(
        layers=layers,
        num_q_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=layers[0].keys.shape[-1],
        start=start,
        seq_len=start + n,
        last_logits=out.logits[0, -1].float(),
        cache=out.cache,
    )
