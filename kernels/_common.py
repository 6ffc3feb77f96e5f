"""What every kernel module shares: the optional Triton import, backend dispatch, argument checks.

The kernels (each module: the ``@triton.jit`` kernel, its launcher and a torch reference):

- ``sparse_attention.sparse_decode_attention``: one decode step attending only to each KV head's
  selected slots (flash-decoding splits, grouped-query attention); ``combine_partials`` merges
  results over disjoint slot sets by their log-sum-exps.
- ``quant_attention.sparse_decode_attention_quant``: the same over packed int4/int8 K/V,
  dequantized in the kernel.
- ``page_scores.page_scores`` / ``top_pages``: Quest's per-page upper bound of ``q·k`` from page
  min/max keys.

Every public function takes ``backend="auto" | "triton" | "torch"``: ``auto`` launches Triton for
CUDA tensors and runs the torch reference otherwise; ``triton`` also runs on CPU tensors under
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernel module was imported.

Triton is optional: CPU-only torch wheels do not pull it in, and every public function still
works there through its torch reference. Without Triton, ``jit`` leaves the kernel a plain
Python function that is never called (modules use ``from __future__ import annotations``, so the
``tl.constexpr`` annotations are never evaluated and need no ``tl``).

Whether a kernel runs under Triton's interpreter is fixed when its module is imported:
``triton.jit`` returns an interpreted function only if ``TRITON_INTERPRET=1`` was already set.
``INTERPRET`` records that, so a late ``TRITON_INTERPRET`` gives a clear error, not a failed
compile for a CPU tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = HAS_TRITON and bool(triton.knobs.runtime.interpret)
BACKENDS = ("auto", "triton", "torch")
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def jit(fn):
    """``triton.jit`` when Triton is installed, else the function unchanged (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether to launch the Triton kernel for these tensors (see each public function).

    ``auto``: Triton when the tensors are on CUDA and Triton is installed, else the torch
    reference. ``triton``: the kernel, natively on CUDA or under the interpreter on CPU, and a
    ``ValueError`` saying what is missing when neither is possible. ``torch``: the reference.
    """
    check_backend(backend)
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise ValueError(
            "backend='triton' needs the triton package (pip install triton); or use backend='torch' for the reference"
        )
    if on_cuda or INTERPRET:
        return True
    raise ValueError(
        "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
        "kernels is first imported (it is read when the kernels are defined); or move the tensors to "
        "CUDA, or use backend='torch'"
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H100) off CUDA, where it only shapes splits."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype],
    shape: tuple[int | None, ...],
    dims: str,
) -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor of one of ``dtypes`` and ``shape``.

    ``shape`` entries of ``None`` match any size; ``dims`` spells the expected shape for the
    message (e.g. ``"[H_kv, T, D]"``).
    """
    dtypes = tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {dims} = {want}, got {list(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor whose device differs from the first one's."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move every argument to one device"
            )


def check_inner_contiguous(**tensors: torch.Tensor) -> None:
    """The kernels read rows with unit stride (coalesced, vectorized loads); other strides are free."""
    for name, t in tensors.items():
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dimension (stride 1), got strides "
                f"{tuple(t.stride())}; pass {name}.contiguous()"
            )


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")


def check_num_splits(num_splits: int | None, max_splits: int) -> None:
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= max_splits
    ):
        raise ValueError(f"num_splits={num_splits!r} must be an int in [1, {max_splits}] or None (automatic)")


__all__ = [
    "triton",
    "tl",
    "HAS_TRITON",
    "INTERPRET",
    "BACKENDS",
    "DENSE_DTYPES",
    "jit",
    "next_pow2",
    "cdiv",
    "use_triton",
    "num_sms",
    "check_tensor",
    "check_same_device",
    "check_inner_contiguous",
    "check_backend",
    "check_num_splits",
]
