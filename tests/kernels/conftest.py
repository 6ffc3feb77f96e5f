"""Kernel tests run the Triton kernels natively on CUDA, or under Triton's interpreter on CPU.

``TRITON_INTERPRET`` is read when a kernel is defined (``triton.jit`` at import of its module),
so it is set here, before any test module imports ``kernels``, and only when there is no CUDA
GPU: with one, the kernels compile natively. The ``device`` fixture runs each parity test on CPU
(interpreter) and on CUDA (marked ``gpu``); the variant the machine cannot run is skipped with
the reason printed.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from dkv.kernels import _common

HAS_CUDA = torch.cuda.is_available()

if not _common.HAS_TRITON:
    _CPU_SKIP = "triton is not installed (pip install triton); the torch references are still tested"
elif HAS_CUDA:
    _CPU_SKIP = "a CUDA GPU is present, so the kernels were compiled for it; the cuda variant runs instead"
elif not _common.INTERPRET:
    _CPU_SKIP = (
        "kernels was imported before TRITON_INTERPRET=1 was set (an earlier test module imported "
        "it); run tests/kernels alone or set TRITON_INTERPRET=1 in the environment"
    )
else:
    _CPU_SKIP = ""

TRITON_DEVICES = [
    pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(bool(_CPU_SKIP), reason=_CPU_SKIP or "-")),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not (HAS_CUDA and _common.HAS_TRITON), reason="no CUDA GPU"),
        ],
    ),
]


@pytest.fixture(params=TRITON_DEVICES)
def device(request) -> str:
    """Where the Triton kernel under test runs: ``cpu`` (interpreter) or ``cuda``."""
    return request.param


@pytest.fixture
def triton_cpu() -> None:
    """For tests that launch Triton on CPU tensors (launcher checks): skip unless interpreting."""
    if _CPU_SKIP:
        pytest.skip(_CPU_SKIP)
