"""D2O-style merging: evicted tokens are folded into their most similar kept token, not dropped.

D2O (Wan et al. 2024, methods.md §2.5): for every evicted token ``e`` of a KV head, the nearest
kept key ``r`` by cosine similarity; an EMA threshold over layers decides which evicted tokens
are close enough to merge. Merging keeps some of the evicted tokens' contribution to attention
at no extra slots: ``k_r ← mean(k_r, sim·k_e, ...)`` over ``r`` and everything merged into it, and
the same for ``V`` with the same assignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMA = 0.5  # D2O: τ_l = 0.5·τ_{l-1} + 0.5·mean(max-sim)


def d2o_merge(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, tau: float | None
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Merge the evicted tokens of one layer into their nearest kept token.

    Parameters
    ----------
    keys, values
        ``[H_kv, n, D]``: the layer's new tokens, post-RoPE keys.
    keep_idx
        ``[H_kv, k]`` int64, sorted: the tokens each head keeps.
    tau
        The threshold carried from the previous layer; ``None`` for the first layer.

    Returns
    -------
    (keys, values, tau)
        Full-size ``[H_kv, n, D]`` copies in which only the kept rows changed (the caller gathers
        ``keep_idx``), and this layer's threshold: the mean over heads and evicted tokens of each
        evicted token's max cosine similarity to the kept keys of its head for the first layer,
        ``0.5·tau + 0.5·mean`` after. Evicted tokens with max-sim ``>= tau`` are merged, the others
        dropped. With nothing evicted the inputs come back unchanged and ``tau`` carries over.
    """
    heads, n, dim = keys.shape
    k = keep_idx.shape[1]
    if k >= n or k == 0:
        return keys, values, tau
    evicted_mask = torch.ones(heads, n, dtype=torch.bool, device=keys.device)
    evicted_mask.scatter_(1, keep_idx, False)
    evict_idx = evicted_mask.nonzero()[:, 1].view(heads, n - k)  # [H_kv, n - k], row-major: sorted per head

    kept_k = keys.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim)).float()  # [H_kv, k, D]
    kept_v = values.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim)).float()
    ev_k = keys.gather(1, evict_idx.unsqueeze(-1).expand(-1, -1, dim)).float()  # [H_kv, n - k, D]
    ev_v = values.gather(1, evict_idx.unsqueeze(-1).expand(-1, -1, dim)).float()

    sim = F.normalize(ev_k, dim=-1) @ F.normalize(kept_k, dim=-1).transpose(1, 2)  # [H_kv, n - k, k]
    max_sim, nearest = sim.max(-1)  # [H_kv, n - k]
    mean = float(max_sim.mean())
    tau = mean if tau is None else EMA * tau + (1.0 - EMA) * mean

    merged = max_sim >= tau  # [H_kv, n - k]
    if not bool(merged.any()):
        return keys, values, tau
    # Merged tokens go to their nearest kept slot; the rest go to a dummy slot k that is cut off.
    target = torch.where(merged, nearest, torch.full_like(nearest, k)).unsqueeze(-1).expand(-1, -1, dim)
    weight = max_sim.unsqueeze(-1)

    def fold(kept: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([kept, kept.new_zeros(heads, 1, dim)], dim=1)  # [H_kv, k + 1, D]
        out = padded.scatter_reduce(1, target, weight * evicted, reduce="mean", include_self=True)
        return out[:, :k]

    new_keys, new_values = keys.clone(), values.clone()
    index = keep_idx.unsqueeze(-1).expand(-1, -1, dim)
    new_keys.scatter_(1, index, fold(kept_k, ev_k).to(keys.dtype))
    new_values.scatter_(1, index, fold(kept_v, ev_v).to(values.dtype))
    return new_keys, new_values, tau


__all__ = ["d2o_merge"]
