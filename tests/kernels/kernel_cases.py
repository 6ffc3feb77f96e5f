"""Random inputs shared by the kernel tests: selections with awkward lengths and garbage padding."""

from __future__ import annotations

import torch

# relative / absolute tolerance of a kernel against its torch reference, per input dtype: fp32 is
# exact products and fp32 accumulation on both sides; fp16/bf16 differ by the kernel's rounding of
# the softmax weights to the input dtype (flash-attention does the same) and one output rounding
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
LSE_TOL = dict(rtol=1e-5, atol=1e-4)  # log-sum-exp is fp32 from the same products on both sides


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def selection(h_kv: int, t: int, s: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int32 ``[H_kv, S]``, lengths int32 ``[H_kv]``) with lengths S, 0, then random.

    Valid indices are unsorted slots in ``[0, T)``, distinct except in head 2, which draws with
    replacement (a repeated slot simply counts twice); entries past a head's length are garbage far
    outside ``[0, T)`` (negative too), so reading one would fault or show up.
    """
    fixed = [s, 0]
    lengths = [fixed[h] if h < 2 else int(torch.randint(0, s + 1, (1,), generator=gen)) for h in range(h_kv)]
    if h_kv == 1:
        lengths = [s]
    indices = torch.randint(-(1 << 30), 1 << 30, (h_kv, s), generator=gen)
    for h, n in enumerate(lengths):
        if h == 2:
            indices[h, :n] = torch.randint(0, t, (n,), generator=gen)
        else:
            indices[h, :n] = torch.randperm(t, generator=gen)[:n]
    return indices.to(torch.int32), torch.tensor(lengths, dtype=torch.int32)


def dense_attention(q, k, v, indices, lengths, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 softmax attention, one query head at a time: (out ``[H_q, D]``, lse ``[H_q]``)."""
    h_q, d = q.shape
    group = h_q // k.shape[0]
    out = torch.zeros(h_q, d, dtype=torch.float64)
    lse = torch.full((h_q,), float("-inf"), dtype=torch.float64)
    for i in range(h_q):
        h = i // group
        sel = indices[h, : int(lengths[h])].long()
        if len(sel) == 0:
            continue
        logits = (k[h, sel].double() @ q[i].double()) * scale  # [L]
        out[i] = torch.softmax(logits, 0) @ v[h, sel].double()
        lse[i] = torch.logsumexp(logits, 0)
    return out, lse
