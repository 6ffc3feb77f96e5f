"""Parity of the sparse decode attention kernel with its torch reference, and of the reference
with an independent dense softmax attention."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import LSE_TOL, TOL, dense_attention, generator, selection

from dkv.kernels import _common
from dkv.kernels.sparse_attention import MAX_SPLITS, auto_num_splits, combine_partials, sparse_decode_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (T, S, D, H_q, H_kv, dtype, num_splits): every T, S, D, head layout, dtype and split mode appears,
# without the full product (the interpreter runs each program in Python)
CASES = [
    (217, 37, 64, 9, 3, F32, 1),
    (217, 37, 128, 9, 3, F32, 5),
    (1823, 217, 128, 32, 8, F16, None),
    (1823, 217, 64, 32, 8, BF16, 3),
    (217, 1, 64, 4, 4, F16, 4),  # more splits than tokens: empty splits must weigh nothing
    (1823, 217, 64, 4, 4, F32, 16),
    (217, 217, 128, 9, 3, BF16, 1),
    (1823, 37, 128, 32, 8, F16, 2),
]


def _inputs(t, s, d, h_q, h_kv, dtype, seed):
    gen = generator(seed)
    # q * 2 sharpens the softmax so the running max moves between blocks
    q = (2 * torch.randn(h_q, d, generator=gen)).to(dtype)
    k = torch.randn(h_kv, t, d, generator=gen).to(dtype)
    v = torch.randn(h_kv, t, d, generator=gen).to(dtype)
    indices, lengths = selection(h_kv, t, s, gen)
    return q, k, v, indices, lengths


def _ids(case):
    t, s, d, h_q, h_kv, dtype, splits = case
    return f"T{t}-S{s}-D{d}-{h_q}x{h_kv}-{str(dtype)[6:]}-splits{splits}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kernel_matches_reference(case, device):
    t, s, d, h_q, h_kv, dtype, splits = case
    q, k, v, indices, lengths = _inputs(t, s, d, h_q, h_kv, dtype, seed=CASES.index(case))
    scale = 1 / math.sqrt(d)
    ref, ref_lse = sparse_decode_attention(q, k, v, indices, lengths, scale, backend="torch", return_lse=True)
    args = [x.to(device) for x in (q, k, v, indices, lengths)]
    out, lse = sparse_decode_attention(*args, scale, num_splits=splits, backend="triton", return_lse=True)
    assert out.dtype == dtype and out.shape == (h_q, d) and lse.shape == (h_q,)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse, **LSE_TOL)
    empty = lengths.repeat_interleave(h_q // h_kv) == 0
    assert empty.any(), "every case has a head of length 0"
    assert (out.cpu()[empty] == 0).all() and torch.isneginf(lse.cpu()[empty]).all()


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("t,s,d", [(217, 37, 64), (1823, 217, 128), (217, 1, 128)])
@pytest.mark.parametrize("h_q,h_kv", [(9, 3), (32, 8), (4, 4)])
def test_reference_matches_dense_attention(t, s, d, h_q, h_kv, dtype):
    q, k, v, indices, lengths = _inputs(t, s, d, h_q, h_kv, dtype, seed=t + s + d + h_q)
    scale = 1 / math.sqrt(d)
    out, lse = sparse_decode_attention(q, k, v, indices, lengths, scale, backend="torch", return_lse=True)
    want, want_lse = dense_attention(q, k, v, indices, lengths, scale)
    # the reference rounds its fp32 result to the input dtype once
    tol = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_combine_partials_of_disjoint_halves_equals_union(backend, device):
    if backend == "torch" and device == "cuda":
        pytest.skip("the torch backend is covered on CPU")
    dev = "cpu" if backend == "torch" else device
    t, s, d, h_q, h_kv = 217, 37, 64, 9, 3
    q, k, v, indices, lengths = _inputs(t, s, d, h_q, h_kv, F32, seed=7)
    scale = 1 / math.sqrt(d)
    # split every head's valid slots in two at a per-head cut; head 1 is empty in both halves
    cut = (lengths // 3).to(torch.int32)
    first = indices.clone()
    second = torch.full_like(indices, -1)
    for h in range(h_kv):
        n, c = int(lengths[h]), int(cut[h])
        second[h, : n - c] = indices[h, c:n]
    q, k, v, first, second, cut, rest, indices, lengths = (
        x.to(dev) for x in (q, k, v, first, second, cut, (lengths - cut).to(torch.int32), indices, lengths)
    )
    kw = dict(num_splits=2, backend=backend, return_lse=True)
    out_a, lse_a = sparse_decode_attention(q, k, v, first, cut, scale, **kw)
    out_b, lse_b = sparse_decode_attention(q, k, v, second, rest, scale, **kw)
    out, lse = combine_partials([out_a, out_b], [lse_a, lse_b])
    want, want_lse = sparse_decode_attention(q, k, v, indices, lengths, scale, **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)


def test_combine_partials_single_part_and_all_empty():
    out = torch.randn(4, 8)
    lse = torch.tensor([0.5, float("-inf"), 2.0, -1.0])
    merged, merged_lse = combine_partials([out], [lse])
    torch.testing.assert_close(merged[[0, 2, 3]], out[[0, 2, 3]])
    assert (merged[1] == 0).all() and torch.equal(merged_lse, lse)
    with pytest.raises(ValueError, match="lses"):
        combine_partials([out, out], [lse])
    with pytest.raises(ValueError, match=r"lses\[0\]"):
        combine_partials([out], [lse.double()])


def test_auto_num_splits_fills_the_gpu_but_not_with_tiny_splits():
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert auto_num_splits(1, 8, cpu) == 1
    assert auto_num_splits(100_000, 8, cpu) == 33  # 264 programs: two waves of 132 SMs
    assert auto_num_splits(1024, 8, cpu) == 8  # one split per 128 tokens
    assert auto_num_splits(10**7, 1, cpu) == MAX_SPLITS


# --- argument checks: each names the argument at fault


def _good(dtype=F32):
    q, k, v, indices, lengths = _inputs(31, 5, 16, 4, 2, dtype, seed=1)
    return dict(q=q, k=k, v=v, indices=indices, lengths=lengths, scale=0.25)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("k", lambda a: a["k"].half(), "k must be float32"),
        ("v", lambda a: a["v"][:, :-1], r"v must have shape"),
        ("q", lambda a: a["q"].int(), "q must be"),
        ("indices", lambda a: a["indices"].long(), "indices must be int32"),
        ("lengths", lambda a: a["lengths"][:1], "lengths must have shape"),
        ("q", lambda a: a["q"][:3], "grouped-query"),
        ("lengths", lambda a: a["lengths"].to("meta"), "lengths is on meta"),
        ("scale", lambda a: float("nan"), "scale"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(name, bad, match):
    args = _good()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention(**args, backend="torch")


def test_bad_backend_and_num_splits():
    with pytest.raises(ValueError, match="backend"):
        sparse_decode_attention(**_good(), backend="cuda")
    for splits in (0, MAX_SPLITS + 1, 2.0):
        with pytest.raises(ValueError, match="num_splits"):
            sparse_decode_attention(**_good(), num_splits=splits)


def test_non_contiguous_inner_dim_is_rejected_by_the_launcher(triton_cpu):
    args = _good()
    args["k"] = torch.randn(2, 31, 32)[:, :, ::2]  # [2, 31, 16] with stride 2 in D
    with pytest.raises(ValueError, match=r"k must be contiguous in its last dimension"):
        sparse_decode_attention(**args, backend="triton")
    # the reference reads any strides
    out = sparse_decode_attention(**args, backend="torch")
    want = sparse_decode_attention(**{**args, "k": args["k"].contiguous()}, backend="torch")
    torch.testing.assert_close(out, want)


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    if not _common.HAS_TRITON:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_decode_attention(**_good(), backend="triton")
    # auto never launches Triton for CPU tensors
    out = sparse_decode_attention(**_good(), backend="auto")
    torch.testing.assert_close(out, sparse_decode_attention(**_good(), backend="torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_long_context_on_cuda_with_automatic_splits():
    t, s, d, h_q, h_kv = 65_537, 4099, 128, 32, 8
    q, k, v, indices, lengths = _inputs(t, s, d, h_q, h_kv, F16, seed=3)
    scale = 1 / math.sqrt(d)
    ref = sparse_decode_attention(q, k, v, indices, lengths, scale, backend="torch")
    out = sparse_decode_attention(*(x.cuda() for x in (q, k, v, indices, lengths)), scale)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[F16])
