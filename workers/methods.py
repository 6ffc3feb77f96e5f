"""The compression methods: one small scorer dataclass each, registered by name.

Every method scores the new tokens of a layer (``score`` -> ``[H_kv, n]``, higher = keep) and may
split the average budget unevenly over layers (``budgets``); the top-k, gather, merge and
quantization live once in ``workers.compression``. ``Method`` is the one base class: parameter
conversion, range checks, the uniform budget default and the protected-token fit live there. Shapes: ``H_q`` query heads, ``H_kv`` KV
heads, ``n`` new tokens of the pass, ``T`` visible tokens (past + new), ``w`` observation window.

Protected tokens (observation window, sinks, recent tokens, LagKV's raw tail) score ``+inf``. When
a layer's budget is smaller than its protected set, ``budgets`` keeps ``+inf`` only on the most
valuable protected tokens (sinks, then the most recent) and drops the rest to ``-inf``: the
framework's top-k breaks ties arbitrarily, so without this a tight budget would keep a random
slice of the window. ``budgets`` is the one hook that sees ``n_keep`` and runs before the top-k,
so the protected sets that depend on the budget (H2O's recent share) are marked there, in place.

Method parameters arrive as floats (``Recipe.params`` stores floats); ``Method.__post_init__``
gives each field its declared type and checks the range, raising ``ValueError`` with the allowed
values, whether the method came from ``make_method`` or was built directly.

References: ``/work/shared/methods.md`` (§2.1 H2O, §2.2 DynamicKV and PyramidKV's budget rule,
§2.3 CAKE, §2.7 LagKV, the SnapKV score), NVIDIA/kvpress for the shared conventions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dkv.workers.capture import Capture, LayerCapture

INF = float("inf")

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, **params) -> Method:
    """The registered method ``name`` with ``params`` (its dataclass fields)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown compression method {name!r}; use one of {sorted(METHODS)}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter {unknown}; its parameters are {sorted(fields)}")
    return cls(**params)


def group_heads(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean over the query heads of each KV head: ``[H_q, ...]`` -> ``[H_kv, ...]``."""
    return x.reshape(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:]).mean(1)


# ------------------------------------------------------------------------------------------ helpers


def pool1d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool the last dim of ``x`` ``[..., L]`` with stride 1 and padding ``kernel // 2``.

    Zero padding counts in the average (``count_include_pad``), as in SnapKV and kvpress, so edge
    tokens are slightly damped. Returns ``[..., L]``.
    """
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    out = F.avg_pool1d(x.reshape(1, -1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return out[..., : shape[-1]].reshape(shape)  # an even kernel yields one extra column


def window_attention_before(cap: LayerCapture) -> tuple[torch.Tensor, int]:
    """Window attention over the new tokens before the window: ``[H_q, w, n - w]`` and ``w``.

    Past tokens (chunked recipe) are not candidates, so their columns are left out; the window's
    own columns are protected, so they are not scored either.
    """
    if cap.window_attention is None:
        raise ValueError("this method needs the observation-window attention: give it a window_size >= 1")
    w = cap.window_attention.shape[1]
    attn = cap.window_attention[..., cap.new_slice]  # [H_q, w, n]
    return attn[..., : cap.n_new - w], w


def snapkv_scores(cap: LayerCapture, num_kv_heads: int, kernel: int) -> torch.Tensor:
    """The SnapKV score of the new tokens, ``[H_kv, n]``: window tokens ``+inf``.

    ``s_h(j) = Pool_k(Σ_{i in window} softmax(q_i Kᵀ/√d)_j)`` per query head, then the mean over
    the query heads of each KV head (GQA: one index set per KV head, as kvpress). Pooling first
    and averaging the group second equals the reverse order: both are linear.
    """
    attn, w = window_attention_before(cap)
    score = torch.full((num_kv_heads, cap.n_new), INF)
    score[:, : cap.n_new - w] = group_heads(pool1d(attn.sum(1), kernel), num_kv_heads)
    return score


def unbiased_var(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.var(dim)`` (unbiased), in the two-pass form: same values, ~10x faster on CPU.

    ``torch.var``/``std`` do not vectorize on CPU; they were most of CAKE's and LagKV's scoring time.
    """
    return (x - x.mean(dim, keepdim=True)).square().sum(dim) / (x.shape[dim] - 1)


def allocate(weights: torch.Tensor, total: int, cap: int, even_excess: bool = False) -> list[int]:
    """Integer budgets ``∝ weights`` ``[L]`` that sum to ``total``, each in ``[0, cap]``.

    Layers over ``cap`` are capped and their excess goes to the others, in proportion to their
    weights (``even_excess=False``) or evenly (``True``, CAKE's ``adjust_budgets``); repeated
    until nothing exceeds the cap. Rounding gives the leftover units to the largest fractional
    parts (lowest layer first on ties), so the sum is exact. Needs ``0 <= total <= cap * L``.
    """
    n_layers = len(weights)
    if not 0 <= total <= cap * n_layers:
        raise ValueError(f"cannot allocate {total} over {n_layers} layers of at most {cap}")
    w = weights.double().clamp(min=0)
    if not torch.isfinite(w).all() or float(w.sum()) <= 0:
        w = torch.ones(n_layers, dtype=torch.float64)  # no signal: uniform
    alloc = w / w.sum() * total
    for _ in range(n_layers):
        over = alloc > cap
        if not bool(over.any()):
            break
        excess = float((alloc[over] - cap).sum())
        alloc[over] = float(cap)
        free = alloc < cap
        if not bool(free.any()):
            break
        if even_excess:
            alloc[free] += excess / int(free.sum())
        else:
            share = w * free
            alloc += share / share.sum() * excess if float(share.sum()) > 0 else free * (excess / int(free.sum()))
    alloc = alloc.clamp(0, cap)
    out = alloc.floor()
    rest = total - int(out.sum())
    frac = (alloc - out).masked_fill(out >= cap, -1.0)
    for i in sorted(range(n_layers), key=lambda i: (-float(frac[i]), i))[: max(rest, 0)]:
        out[i] += 1
    return [int(v) for v in out]


def fit_protected(score: torch.Tensor, keep: int, priority: torch.Tensor) -> None:
    """Keep ``+inf`` on at most ``keep`` tokens per head: those with the highest ``priority`` ``[n]``.

    ``score`` ``[H_kv, n]`` is edited in place; the protected tokens that do not fit go to
    ``-inf`` (the budget is spent on the others, so they would be dropped anyway).
    """
    protected = torch.isposinf(score)
    if protected.numel() == 0 or int(protected.sum(1).max()) <= keep:
        return
    ranked = priority.float().expand_as(score).masked_fill(~protected, -INF)
    winners = torch.zeros_like(protected).scatter_(1, ranked.topk(keep, dim=1).indices, True)
    score[protected & ~winners] = -INF


def window_budgets(
    weights: torch.Tensor, n_keep: int, n: int, w: int, cap: int | None = None, even_excess: bool = False
) -> list[int]:
    """Per-layer budgets = the window ``w`` + a share of ``(n_keep - w) * L`` ``∝ weights`` ``[L]``.

    Shares are capped at ``cap`` (default and at most ``n - w``, the candidates outside the
    window), so every budget lies in ``[w, n]`` and the mean is exactly ``n_keep``. A budget at
    or below the window (nothing to allocate) is uniform.
    """
    n_layers = len(weights)
    if n_keep <= w:
        return [n_keep] * n_layers
    cap = n - w if cap is None else min(cap, n - w)
    shares = allocate(weights, (n_keep - w) * n_layers, cap, even_excess)
    return [w + s for s in shares]


@dataclass
class Method:
    """Base class of every method: subclasses set ``name``, the capture they need, and ``score``.

    Fields are converted to their declared type here, once (requests carry every parameter as a
    float), and checked against ``INT_FIELDS`` / ``FLOAT_FIELDS``.
    """

    name: ClassVar[str] = ""
    needs_colsum: ClassVar[bool] = False  # full accumulated attention (H2O-style)
    INT_FIELDS: ClassVar[dict[str, int]] = {}  # field -> smallest allowed value
    FLOAT_FIELDS: ClassVar[dict[str, tuple[float, float]]] = {}  # field -> inclusive range
    # One token set for every KV head of a layer, ranked by the scores averaged over heads (as
    # WindowKV and FastKV share indices): a token any head needs is kept for all of them.
    share_heads: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _as_field_type(f, self.name, getattr(self, f.name)))
        for name, low in self.INT_FIELDS.items():
            if getattr(self, name) < low:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)!r} must be an integer >= {low}")
        for name, (low, high) in self.FLOAT_FIELDS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)!r} must be in [{low}, {high}]")

    @property
    def window(self) -> int:
        """Observation-window queries to capture (0 = none)."""
        return getattr(self, "window_size", 0)

    def score(self, layer: int, cap: LayerCapture, capture: Capture) -> torch.Tensor:
        """Scores of the new tokens of ``layer``, ``[H_kv, n_new]`` float32, higher = keep."""
        raise NotImplementedError(f"method {self.name!r} must define score()")

    def layer_budgets(self, scores: list[torch.Tensor], n_keep: int, capture: Capture) -> list[int]:
        """Tokens per KV head of each layer, mean ``n_keep``; uniform unless a method overrides."""
        return [n_keep] * len(scores)

    def priority(self, n: int, capture: Capture) -> torch.Tensor:
        """Which protected tokens win when they do not all fit, ``[n]``: the most recent."""
        return torch.arange(n, dtype=torch.float32)

    def budgets(self, scores: list[torch.Tensor], n_keep: int, capture: Capture) -> list[int]:
        """Per-layer budgets (``layer_budgets``), with the protected tokens fitted to each."""
        budgets = self.layer_budgets(scores, n_keep, capture)
        for score, keep in zip(scores, budgets):
            fit_protected(score, keep, self.priority(score.shape[1], capture))
        return budgets


def _as_field_type(f: dataclasses.Field, method: str, value):
    """``value`` as the type field ``f`` declares; a float that is not a whole number is no int."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if kind in ("int", "float") and not math.isfinite(float(value)):
        raise ValueError(f"{method}: parameter {f.name} must be a finite number, got {value}")
    if kind == "int":
        if float(value) != int(value):
            raise ValueError(f"{method}: parameter {f.name} must be an integer, got {value}")
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return bool(value)
    return value


# ------------------------------------------------------------------------------------------ methods


@register
@dataclass
class Full(Method):
    """No compression: every token, every layer (the reference)."""

    name: ClassVar[str] = "full"

    def score(self, layer, cap, capture):
        return torch.ones(capture.num_kv_heads, cap.n_new)


@register
@dataclass
class StreamingLLM(Method):
    """Attention sinks + a recent window (Xiao et al.): the first ``sink`` tokens and the most recent."""

    name: ClassVar[str] = "streaming_llm"
    INT_FIELDS: ClassVar[dict[str, int]] = {"sink": 0}
    sink: int = 4

    def score(self, layer, cap, capture):
        positions = cap.positions[:, cap.new_slice].float()
        score = positions / max(capture.seq_len, 1)  # recent first
        score[positions < self.sink] = 2.0  # sinks above everything
        return score


@register
@dataclass
class SnapKV(Method):
    """SnapKV (Li et al. 2024): attention of the observation window, pooled.

    ``score`` ``[H_kv, n]``: the window's summed attention to each earlier new token,
    average-pooled over neighbouring tokens (so a kept token keeps its context), averaged over
    each GQA group; the window itself is protected. Defaults as kvpress: ``window_size=64``,
    ``kernel_size=5``, average pooling.
    """

    name: ClassVar[str] = "snapkv"
    INT_FIELDS: ClassVar[dict[str, int]] = {"window_size": 1, "kernel_size": 1}
    window_size: int = 64
    kernel_size: int = 5

    def score(self, layer, cap, capture):
        return snapkv_scores(cap, capture.num_kv_heads, self.kernel_size)


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scores, linearly decreasing budgets over layers.

    With average budget ``C`` (= ``n_keep``) and window ``w``: ``min = (C - w) / β``,
    ``max = 2(C - w) - min``, ``b_l = max - l·⌊(max - min) / L⌋`` (methods.md §2.2, β = 20), so the
    lowest layers, whose attention is spread out, keep the most. The ``b_l`` are then rescaled to
    a mean of exactly ``C - w`` (capped at the ``n - w`` candidates, excess redistributed in
    proportion), and every layer keeps its window on top: mean budget ``n_keep``, each in ``[w, n]``.
    """

    name: ClassVar[str] = "pyramidkv"
    FLOAT_FIELDS: ClassVar[dict[str, tuple[float, float]]] = {"beta": (1.0, 1e6)}
    beta: float = 20.0

    def layer_budgets(self, scores, n_keep, capture):
        n_layers, n = len(scores), scores[0].shape[1]
        w = min(self.window_size, n)
        c = n_keep - w
        low = c / self.beta
        high = 2 * c - low
        step = math.floor((high - low) / n_layers) if c > 0 else 0
        weights = torch.tensor([high - layer * step for layer in range(n_layers)], dtype=torch.float64)
        return window_budgets(weights, n_keep, n, w)


@register
@dataclass
class H2O(Method):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention, plus the recent tokens.

    ``score`` ``[H_kv, n]``: ``Σ_i softmax(q_i Kᵀ)_j`` over every new query ``i`` (the capture's
    column sums), averaged over each GQA group. ``recent_fraction`` of each layer's budget goes to
    the most recent tokens (protected in ``budgets``, where the budget is known), the rest to the
    heaviest hitters: 0.5 matches H2O's default split (heavy 0.1 + recent 0.1 of the sequence).
    This is H2O's one-shot prefill form; its greedy one-token-per-step eviction during decoding
    is out of scope here.
    """

    name: ClassVar[str] = "h2o"
    needs_colsum: ClassVar[bool] = True
    FLOAT_FIELDS: ClassVar[dict[str, tuple[float, float]]] = {"recent_fraction": (0.0, 1.0)}
    recent_fraction: float = 0.5

    def score(self, layer, cap, capture):
        return group_heads(cap.attention_colsum[:, cap.new_slice], capture.num_kv_heads).clone()

    def layer_budgets(self, scores, n_keep, capture):
        recent = min(n_keep, round(self.recent_fraction * n_keep))
        if recent:
            for score in scores:
                score[:, -recent:] = INF
        return [n_keep] * len(scores)


@register
@dataclass
class DynamicKV(SnapKV):
    """DynamicKV (Zhou et al. 2024): SnapKV scores with task-adaptive per-layer budgets.

    Scores: SnapKV with ``window_size=8``, ``kernel_size=7``, average pooling. Budgets
    (methods.md §2.2): with ``b = n_keep - w``, stack the pooled scores of every layer
    ``[L, H_kv, n - w]``, take the global top ``k = b·H_kv·L``, give each layer a share ``∝`` its
    winners, capped at ``r_max·b`` (``r_max = 10``) and at the ``n - w`` candidates, rescaled to a
    mean of exactly ``b``; every layer keeps its window on top.

    Scores are comparable across layers because each window row is a softmax (sums to 1), so a
    token's score is the attention mass it received, in the same units in every layer.

    Why once, after prefill: the paper runs this every ``m = 4`` layers during prefill only to
    bound peak memory, truncating each earlier layer's score-sorted list to its running budget.
    Its final pass, at the last layer, is this very computation: all layers' scores, ``k = b·H·L``,
    shares ``∝`` winners, capped at ``r_max·b``. A layer's kept set is always a top-by-score prefix of
    its list, so the cascade ends with the same tokens whenever no earlier pass cut a layer below
    its final budget. Earlier passes spread the whole model's total ``b·L`` over only the layers
    seen so far, so their budgets are larger than the final ones unless a layer's scores fall
    just under an early threshold and above the final one; here the whole prefill's K/V is held
    by the capture anyway, so the untruncated final pass costs nothing extra.
    """

    name: ClassVar[str] = "dynamickv"
    FLOAT_FIELDS: ClassVar[dict[str, tuple[float, float]]] = {"r_max": (1.0, 1e6)}
    window_size: int = 8
    kernel_size: int = 7
    r_max: float = 10.0

    def layer_budgets(self, scores, n_keep, capture):
        n_layers, n = len(scores), scores[0].shape[1]
        w = min(self.window_size, n)
        b = n_keep - w
        if b <= 0:
            return [n_keep] * n_layers
        stacked = torch.stack([s[:, : n - w] for s in scores])  # [L, H_kv, n - w], finite
        heads = stacked.shape[1]
        winners = torch.zeros(stacked.numel(), dtype=torch.float64)
        winners[stacked.flatten().topk(b * heads * n_layers).indices] = 1.0
        per_layer = winners.view(n_layers, -1).sum(1)  # [L]
        return window_budgets(per_layer, n_keep, n, w, cap=max(1, math.floor(self.r_max * b)))


@register
@dataclass
class CAKE(Method):
    """CAKE (Qin et al. 2025): layer preference from attention dispersion and shift; mean + variance eviction.

    With ``A'`` ``[H_q, w, n - w]`` the window attention (``window_size=32``) to the new tokens
    before the window:

    - preference ``P_l = H_l^(1/τ1) · V_l^(1/τ2)``: ``H_l = -Σ A' log A'`` (spatial dispersion,
      summed over heads, rows, tokens) and ``V_l = Σ_{heads, tokens} Var_rows(A')`` (temporal
      shift); ``τ1 = τ2 = 1`` (CAKE's default for unlisted models);
    - budgets ``∝ P_l`` of ``(n_keep - w)·L``, each capped at the ``n - w`` candidates, the excess
      spread evenly over the uncapped layers (``adjust_budgets``), plus the window: mean ``n_keep``;
    - eviction indicator ``I(j) = mean_rows A[:, j] + γ·var_rows A[:, j]`` (``γ = 200``, unbiased
      variance as ``torch.var``), average-pooled (``kernel_size=5``), averaged over each GQA
      group; the window is protected.

    CAKE's cascading (re-evicting earlier layers as later ones arrive) only bounds peak memory
    during prefill; its final allocation is the one computed here over all layers at once.
    """

    name: ClassVar[str] = "cake"
    INT_FIELDS: ClassVar[dict[str, int]] = {"window_size": 1, "kernel_size": 1}
    FLOAT_FIELDS: ClassVar[dict[str, tuple[float, float]]] = {
        "tau1": (1e-3, 1e3),
        "tau2": (1e-3, 1e3),
        "gamma": (0.0, 1e9),
    }
    window_size: int = 32
    kernel_size: int = 5
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0

    def score(self, layer, cap, capture):
        attn, w = window_attention_before(cap)
        indicator = attn.mean(1)
        if w > 1:
            indicator = indicator + self.gamma * unbiased_var(attn, 1)
        score = torch.full((capture.num_kv_heads, cap.n_new), INF)
        score[:, : cap.n_new - w] = group_heads(pool1d(indicator, self.kernel_size), capture.num_kv_heads)
        return score

    def preference(self, cap: LayerCapture) -> float:
        """``P_l`` of one layer (see the class docstring); 0 when there is nothing before the window."""
        attn, w = window_attention_before(cap)
        if attn.shape[-1] == 0:
            return 0.0
        entropy = float(-(attn * torch.log(attn + 1e-10)).sum())  # CAKE's calculate_entropy
        variance = float(unbiased_var(attn, 1).sum()) if w > 1 else 0.0
        return max(entropy, 0.0) ** (1.0 / self.tau1) * max(variance, 0.0) ** (1.0 / self.tau2)

    def layer_budgets(self, scores, n_keep, capture):
        n = scores[0].shape[1]
        w = min(self.window_size, n)
        prefs = torch.tensor([self.preference(cap) for cap in capture.layers], dtype=torch.float64)
        return window_budgets(prefs, n_keep, n, w, even_excess=True)


@register
@dataclass
class LagKV(Method):
    """LagKV (Liang et al. 2025): attention-free scores from K/V statistics of the next ("lag") chunk.

    After ``sink`` tokens (16), the new tokens are cut into chunks of ``lag_size``. Chunk ``c``
    is scored against chunk ``c + 1``: per channel, ``x̃ = (x - min_r) / (max_r - min_r)`` with the
    reference chunk's min and max, the token's score is the std of ``x̃`` over channels, softmaxed
    within the chunk; ``s = s_K + s_V``, per KV head. Tokens unlike what follows them carry
    information the next chunk does not. The last full chunk (no reference) and the partial
    chunk after it stay raw (protected), as do the sinks.

    LagKV keeps the same fraction of every chunk, so the score ranks tokens within their chunk
    (``2·(lag_size - rank) + s``; ``s < 2`` only orders equal ranks across chunks): the global
    top-k then takes the same top share of each chunk, and the stored importance is that rank.

    ``lag_size`` defaults to 32, not the code's 1024 (nor 128): the raw tail (the last full chunk
    and the partial one, up to ``2·lag_size - 1`` tokens, plus the sinks) is never compressed in a
    one-shot entry, so it must fit the budget. With 1024 nothing shorter than ~2k tokens could be
    compressed at all; the chunked recipe compresses 256-token chunks, and ratio 0.75 leaves 64
    tokens per chunk, which the raw tail fits only for ``lag_size <= 32``. On SmolLM2-135M's
    passkey test (~600 tokens, ratio 0.75) 128 loses the key because the tail alone overflows the
    budget. 32 tokens still give a per-channel min/max over a sentence or two. When the budget is
    smaller than the raw tail, it keeps the sinks and the most recent raw tokens (StreamingLLM).
    Uses keys and values only: no attention capture, so the store could run it without the model.
    """

    name: ClassVar[str] = "lagkv"
    INT_FIELDS: ClassVar[dict[str, int]] = {"sink": 0, "lag_size": 2}
    sink: int = 16
    lag_size: int = 32

    def _sinks(self, capture: Capture, n: int) -> int:
        # sinks are the first positions of the sequence; later chunks of a chunked recipe have none
        return max(0, min(n, self.sink - capture.start))

    def score(self, layer, cap, capture):
        n, lag = cap.n_new, self.lag_size
        sinks = self._sinks(capture, n)
        full = (n - sinks) // lag
        score = torch.full((capture.num_kv_heads, n), INF)
        if full < 2:  # no chunk has a reference: everything stays raw
            return score
        end = sinks + (full - 1) * lag  # scored chunks end here; the raw tail follows
        s = 0
        for x in (cap.keys[:, cap.new_slice], cap.values[:, cap.new_slice]):
            chunks = x[:, sinks : sinks + full * lag].float().unflatten(1, (full, lag))  # [H_kv, full, lag, D]
            ref = chunks[:, 1:]
            lo, hi = ref.amin(2, keepdim=True), ref.amax(2, keepdim=True)
            normed = (chunks[:, :-1] - lo) / (hi - lo).clamp_min(1e-6)
            s = s + unbiased_var(normed, -1).sqrt().softmax(-1)  # std over channels: [H_kv, full - 1, lag]
        rank = s.argsort(-1, descending=True).argsort(-1)  # 0 = best of its chunk
        score[:, sinks:end] = (2.0 * (lag - rank) + s).flatten(1)
        return score

    def priority(self, n, capture):
        priority = torch.arange(n, dtype=torch.float32)
        priority[: self._sinks(capture, n)] += n  # sinks first, then the most recent
        return priority


@register
@dataclass
class TOVA(Method):
    """TOVA (Oren et al. 2024): attention of the last token, averaged over every head of the layer.

    ``score`` ``[H_kv, n]``: the last query's softmax attention to each new token, averaged over all
    query heads (TOVA ranks tokens per layer, so every KV head gets the same order, as kvpress);
    the last token is protected. One-shot form of TOVA's per-step eviction.
    """

    name: ClassVar[str] = "tova"
    INT_FIELDS: ClassVar[dict[str, int]] = {"window_size": 1}
    window_size: int = 1

    def score(self, layer, cap, capture):
        attn, w = window_attention_before(cap)
        score = torch.full((capture.num_kv_heads, cap.n_new), INF)
        score[:, : cap.n_new - w] = attn[:, -1].mean(0)  # [n - w], broadcast over KV heads
        return score


@register
@dataclass
class KNorm(Method):
    """Key norm (Devoto et al. 2024): keep the keys with the smallest L2 norm; attention-free.

    ``score`` ``[H_kv, n]`` = ``-‖k_j‖₂``: low-norm keys correlate with high attention.
    """

    name: ClassVar[str] = "knorm"

    def score(self, layer, cap, capture):
        return -cap.keys[:, cap.new_slice].float().norm(dim=-1)


__all__ = [
    "CAKE",
    "METHODS",
    "DynamicKV",
    "Full",
    "H2O",
    "KNorm",
    "LagKV",
    "Method",
    "PyramidKV",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "allocate",
    "fit_protected",
    "group_heads",
    "make_method",
    "pool1d",
    "register",
    "snapkv_scores",
    "unbiased_var",
    "window_budgets",
]
