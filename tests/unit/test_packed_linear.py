"""PackedLinear: oneDNN on pre-packed weights computes what nn.Linear computes, to rounding."""

from __future__ import annotations

import pytest
import torch

from dkv.workers.model import PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (3, 17, 576), (1031, 576)])
def test_packed_linear_equals_nn_linear(dtype, tol, bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 193, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    out = packed(x)
    assert out.shape == (*shape[:-1], 193) and out.dtype == dtype
    assert torch.allclose(out.float(), linear(x).float(), atol=tol, rtol=tol)


def test_a_row_gets_the_same_result_alone_and_among_others():
    """What batched decoding relies on: row i of a batch is what the row alone gives (bit for bit
    without a bias; the bias is added in another order for a single row: one float32 ulp)."""
    torch.manual_seed(1)
    x = torch.randn(16, 576)
    for bias, tol in ((False, 0.0), (True, 2e-6)):
        packed = PackedLinear(torch.nn.Linear(576, 1536, bias=bias))
        alone = torch.cat([packed(x[i : i + 1]) for i in range(16)])
        assert (packed(x) - alone).abs().max() <= tol
        assert torch.equal(packed(x[:8]), packed(x)[:8])


def test_pack_linear_layers_replaces_every_linear_and_keeps_tied_weights():
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8),
        torch.nn.Linear(8, 8),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(8, 10, bias=False)),
    )
    model[3][0].weight = model[0].weight  # tied like an LM head
    x = torch.randint(0, 10, (2, 5))
    before = model(x)
    pack_linear_layers(model)
    assert isinstance(model[1], PackedLinear) and isinstance(model[3][0], PackedLinear)
    assert model[3][0].weight is model[0].weight
    assert torch.allclose(model(x), before, atol=1e-5)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
