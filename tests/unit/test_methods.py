"""Every registered compression method on a tiny random Llama (``workers.methods``, ``workers.merge``).

One matrix runs every method in ``METHODS`` × ratio × quantization through ``compress`` and checks
the entry: shapes and dtypes, tokens kept per layer and head, sorted unique positions, finite
scores, determinism, protected tokens kept, and that decoding continues from it. Beside it: GQA
isolation, the chunked recipe, budget helpers, D2O merging and the error messages.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dkv.workers import methods as M
from dkv.workers.cache import to_hf_cache
from dkv.workers.capture import prefill
from dkv.workers.compression import compress, compress_chunks
from dkv.workers.merge import d2o_merge
from dkv.workers.methods import METHODS, group_heads, make_method

N = 300  # context tokens: 0.75 keeps 75, above SnapKV's 64-token window
VOCAB = 256
RATIOS = (0.0, 0.5, 0.75)
QUANTS = ("none", "int4")
ADAPTIVE = {"pyramidkv", "dynamickv", "cake"}  # uneven layer budgets whose mean is n_keep
WINDOWED = {"snapkv", "pyramidkv", "dynamickv", "cake", "tova"}  # the observation window is protected


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU spinning OpenMP threads make
    this module ~20x slower (200 s instead of 10 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("dkv")
    model.dkv_fingerprint = "tiny-test-model"
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(1))


def n_keep(n: int, ratio: float) -> int:
    return max(1, min(n, round(n * (1 - ratio))))


def head_positions(layer) -> list[torch.Tensor]:
    offsets = layer.head_offsets.tolist()
    return [layer.positions[a:b].long() for a, b in zip(offsets[:-1], offsets[1:])]


def expected_protected(method, n: int, keep: int, start: int = 0) -> set[int] | None:
    """Positions a method must keep with this budget (sinks first, then the most recent), or None."""
    sinks: list[int] = []
    if method.name in WINDOWED:
        protected = list(range(n - min(method.window_size, n), n))
    elif method.name == "h2o":
        recent = round(method.recent_fraction * keep)
        protected = list(range(n - recent, n))
    elif method.name == "lagkv":
        sinks = list(range(min(n, max(0, method.sink - start))))
        full = (n - len(sinks)) // method.lag_size
        tail = len(sinks) + (full - 1) * method.lag_size if full >= 2 else len(sinks)
        protected = list(range(tail, n))
    elif method.name == "streaming_llm":
        return set(range(min(method.sink, keep)))
    else:
        return None
    room = max(0, keep - len(sinks))
    return {start + p for p in sinks[:keep] + (protected[-room:] if room else [])}


def assert_same_entry(a, b) -> None:
    assert a.key == b.key
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        ta, tb = la.tensors(), lb.tensors()
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), name


# ------------------------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_matrix(model, ids, name, ratio, quant):
    if name == "full" and ratio:
        with pytest.raises(ValueError, match="method 'full' keeps every token"):
            compress(model, ids, name, ratio, quant=quant)
        return
    entry = compress(model, ids, name, ratio, quant=quant)
    entry.validate()
    method = make_method(name)
    keep = n_keep(N, ratio)
    assert entry.num_layers == model.config.num_hidden_layers
    assert entry.num_kv_heads == 2 and entry.head_dim == 16 and entry.seq_len == N

    budgets = []
    for layer in entry.layers:
        counts = layer.head_counts().tolist()
        assert len(set(counts)) == 1, f"heads of a layer keep the same count, got {counts}"
        budgets.append(counts[0])
        assert layer.quantized == (quant != "none")
        assert layer.keys.dtype == (torch.uint8 if quant != "none" else torch.float32)
        assert bool(torch.isfinite(layer.scores).all())
        for pos in head_positions(layer):
            assert bool((pos[1:] > pos[:-1]).all()), "positions sorted and unique per head"
            assert 0 <= int(pos.min()) and int(pos.max()) < N
    if name in ADAPTIVE:
        assert sum(budgets) == keep * len(budgets), budgets
        assert all(1 <= b <= N for b in budgets), budgets
    else:
        assert budgets == [keep] * len(budgets)
    if ratio == 0.0:
        for layer in entry.layers:
            for pos in head_positions(layer):
                assert pos.tolist() == list(range(N))

    for layer, budget in zip(entry.layers, budgets):
        must = expected_protected(method, N, budget)
        if must is not None:
            for pos in head_positions(layer):
                assert must <= set(pos.tolist()), f"protected tokens dropped: {sorted(must - set(pos.tolist()))}"

    again = compress(model, ids, name, ratio, quant=quant)
    assert_same_entry(entry, again)

    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 17, 42]]), cache=to_hf_cache(entry))
    assert out.logits.shape == (1, 3, VOCAB)
    assert bool(torch.isfinite(out.logits).all())


# ------------------------------------------------------------------------------------ properties


def test_group_heads_is_the_mean_of_each_group():
    x = torch.arange(24, dtype=torch.float32).view(4, 6)
    g = group_heads(x, 2)
    assert torch.equal(g, torch.stack([x[:2].mean(0), x[2:].mean(0)]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kv_head_scores_depend_only_on_its_group(model, ids, name):
    method = make_method(name)
    if name == "tova":
        pytest.skip("TOVA averages the last query's attention over every head: one order per layer by design")
    capture = prefill(model, ids, window=method.window, colsum=method.needs_colsum)
    cap = capture.layers[1]
    before = method.score(1, cap, capture)
    g = torch.Generator().manual_seed(3)
    changes = {}  # perturb everything that belongs to KV head 1 (query heads 2 and 3)
    if cap.window_attention is not None:
        wa = cap.window_attention.clone()
        wa[2:] = torch.rand(wa[2:].shape, generator=g).softmax(-1)
        changes["window_attention"] = wa
    if cap.attention_colsum is not None:
        cs = cap.attention_colsum.clone()
        cs[2:] = torch.rand(cs[2:].shape, generator=g) * N
        changes["attention_colsum"] = cs
    keys, values = cap.keys.clone(), cap.values.clone()
    keys[1] += torch.randn(keys[1].shape, generator=g)
    values[1] += torch.randn(values[1].shape, generator=g)
    after = method.score(1, dataclasses.replace(cap, keys=keys, values=values, **changes), capture)
    assert torch.equal(before[0], after[0]), "KV head 0's scores moved when only head 1's group changed"
    if name not in {"full", "streaming_llm"}:
        assert not torch.equal(before[1], after[1]), "KV head 1's scores ignore its own group"


def test_budget_below_the_window_keeps_the_most_recent(model, ids):
    entry = compress(model, ids, "snapkv", budget=10)
    for layer in entry.layers:
        for pos in head_positions(layer):
            assert pos.tolist() == list(range(N - 10, N))


def test_lagkv_keeps_sinks_first_when_the_raw_tail_does_not_fit(model, ids):
    entry = compress(model, ids, "lagkv", budget=40)  # raw tail of 172 tokens at N = 300
    for layer in entry.layers:
        for pos in head_positions(layer):
            assert pos.tolist() == list(range(16)) + list(range(N - 24, N))


def test_lagkv_keeps_the_same_share_of_every_chunk(model):
    ids = torch.randint(0, VOCAB, (1, 16 + 4 * 32 + 8), generator=torch.Generator().manual_seed(5))
    entry = compress(model, ids, "lagkv", budget=16 + 32 + 8 + 3 * 8, lag_size=32)
    for layer in entry.layers:
        for pos in head_positions(layer):
            chunks = [int(((pos >= 16 + 32 * c) & (pos < 48 + 32 * c)).sum()) for c in range(3)]
            assert chunks == [8, 8, 8]  # scored chunks 0..2; chunk 3 and the partial one stay raw


def test_h2o_recent_share(model, ids):
    entry = compress(model, ids, "h2o", 0.5, recent_fraction=0.2)
    for layer in entry.layers:
        for pos in head_positions(layer):
            assert set(range(N - 30, N)) <= set(pos.tolist())


def test_pyramid_budgets_decrease_with_depth(model, ids):
    budgets = [layer.head_counts()[0].item() for layer in compress(model, ids, "pyramidkv", 0.5).layers]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert sum(budgets) == 4 * 150


def test_dynamickv_r_max_caps_the_budgets(model, ids):
    budgets = [layer.head_counts()[0].item() for layer in compress(model, ids, "dynamickv", 0.75, r_max=1).layers]
    assert budgets == [75] * 4  # every layer capped at b = 75 - 8, total b·L: uniform


def test_allocate_is_exact_and_capped():
    assert M.allocate(torch.tensor([1.0, 1.0, 1.0]), 10, 10) == [4, 3, 3]
    assert M.allocate(torch.tensor([8.0, 1.0, 1.0]), 30, 12) == [12, 9, 9]
    assert M.allocate(torch.tensor([8.0, 2.0, 0.0]), 30, 12, even_excess=True) == [12, 12, 6]
    assert M.allocate(torch.tensor([0.0, 0.0]), 7, 5) == [4, 3]  # no signal: uniform
    out = M.allocate(torch.tensor([5.0, 3.0, 2.0, 0.5]), 37, 15)
    assert sum(out) == 37 and max(out) <= 15
    with pytest.raises(ValueError):
        M.allocate(torch.tensor([1.0]), 5, 4)


def test_fit_protected_keeps_the_highest_priority():
    inf = float("inf")
    score = torch.tensor([[inf, 1.0, inf, inf, inf]])
    M.fit_protected(score, 2, torch.arange(5.0))
    assert torch.isposinf(score[0]).tolist() == [False, False, False, True, True]


# ------------------------------------------------------------------------------- chunked recipe


@pytest.mark.parametrize("name", sorted(METHODS))
def test_chunked_prefix_entries_are_reused(model, ids, name):
    chunk = 128
    ratio = 0.0 if name == "full" else 0.5
    long = compress_chunks(model, ids, name, ratio, chunk_size=chunk)
    assert [e.identity.start for e in long] == [0, 128, 256]
    short = compress_chunks(model, ids[:, : 2 * chunk], name, ratio, chunk_size=chunk)
    for a, b in zip(long[:2], short):
        assert_same_entry(a, b)
    resumed = compress_chunks(model, ids, name, ratio, chunk_size=chunk, cached=short)
    for a, b in zip(long, resumed):
        assert_same_entry(a, b)
    for e in long:
        e.validate()


# --------------------------------------------------------------------------------------- D2O merge


def test_d2o_merge_hand_example():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, -1.0]]])  # [1, 4, 2]
    values = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    out_k, out_v, tau = d2o_merge(keys, values, torch.tensor([[0, 1]]), None)
    sim = float(torch.nn.functional.cosine_similarity(keys[0, 2], keys[0, 0], dim=0))
    assert tau == pytest.approx((sim + (-(2**-0.5))) / 2)
    # token 2 merges into token 0 (sim ≈ 0.995 >= tau); token 3 (sim -0.707) is dropped
    assert torch.allclose(out_k[0, 0], (keys[0, 0] + sim * keys[0, 2]) / 2)
    assert torch.allclose(out_v[0, 0], (values[0, 0] + sim * values[0, 2]) / 2)
    assert torch.equal(out_k[0, 1:], keys[0, 1:]) and torch.equal(out_v[0, 1:], values[0, 1:])


def test_d2o_merge_changes_kept_rows_only():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    keep = torch.stack([torch.randperm(20, generator=g)[:8].sort().values for _ in range(2)])
    out_k, out_v, tau = d2o_merge(keys, values, keep, None)
    assert out_k.shape == keys.shape and out_v.shape == values.shape
    evicted = torch.ones(2, 20, dtype=torch.bool).scatter_(1, keep, False)
    assert torch.equal(out_k[evicted], keys[evicted]) and torch.equal(out_v[evicted], values[evicted])
    assert not torch.equal(out_k, keys), "the first layer's threshold is the mean: some token merges"
    # an EMA threshold above every cosine similarity merges nothing
    out_k2, out_v2, tau2 = d2o_merge(keys, values, keep, 3.0)
    assert torch.equal(out_k2, keys) and torch.equal(out_v2, values)
    assert tau2 == pytest.approx(0.5 * 3.0 + 0.5 * tau)  # EMA of the previous tau and this layer's mean


def test_merge_in_compress_keeps_positions(model, ids):
    plain = compress(model, ids, "h2o", 0.75)
    merged = compress(model, ids, "h2o", 0.75, merge=True)
    merged.validate()
    assert merged.identity.recipe != plain.identity.recipe
    changed = 0
    for a, b in zip(plain.layers, merged.layers):
        assert torch.equal(a.positions, b.positions)
        changed += int((a.keys != b.keys).any(1).sum())
    assert changed > 0


# ------------------------------------------------------------------------------------------ errors


def test_unknown_method_lists_the_registered_ones(model, ids):
    with pytest.raises(ValueError, match="snapkv"):
        compress(model, ids, "nope", 0.5)


def test_unknown_parameter_lists_the_method_parameters(model, ids):
    with pytest.raises(ValueError, match="window_size"):
        compress(model, ids, "snapkv", 0.5, window=8)


@pytest.mark.parametrize("params", [{"window_size": 0}, {"kernel_size": 2.5}])
def test_bad_parameter_value(params):
    with pytest.raises(ValueError, match="integer"):
        make_method("snapkv", **params)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(model, ids, ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        compress(model, ids, "snapkv", ratio)
