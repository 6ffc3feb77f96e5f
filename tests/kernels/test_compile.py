"""The kernels compile for a Hopper GPU (sm_90) on any machine, GPU or not.

The interpreter runs the kernels as Python, so it cannot catch what only the compiler rejects
(non-constexpr globals, loop-carried type changes, ``tl.dot`` shape rules). Triton compiles ahead
of time for a named target with the ``ptxas`` its wheel ships, no GPU needed; this does that in a
subprocess, where ``TRITON_INTERPRET`` is unset so ``triton.jit`` builds real kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dkv.kernels import _common

SCRIPT = textwrap.dedent("""
    import importlib, inspect, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sa, qa, ps = (importlib.import_module("dkv.kernels." + m) for m in ("sparse_attention", "quant_attention", "page_scores"))

    def build(kernel, types, consts, num_warps):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=2))

    out = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "idx_ptr": "*i32", "len_ptr": "*i32", "qk_scale": "fp32"}
    for dtype, tt in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        cfg = sa.launch_config(128, 4, dtype)
        warps = cfg.pop("num_warps")
        build(sa._sparse_decode_split_kernel, {"q_ptr": "*" + tt, "k_ptr": "*" + tt, "v_ptr": "*" + tt, **out},
              dict(cfg, DOT_PRECISION=sa.dot_precision(dtype)), warps)
        cfg = sa.launch_config(128, 4, dtype, dequant=True)
        warps = cfg.pop("num_warps")
        ranges = {n: "*fp16" for n in ("klo_ptr", "khi_ptr", "vlo_ptr", "vhi_ptr")}
        build(qa._sparse_decode_quant_split_kernel,
              {"q_ptr": "*" + tt, "kc_ptr": "*u8", "vc_ptr": "*u8", **ranges, **out},
              dict(cfg, BITS=4, DOT_PRECISION=sa.dot_precision(dtype)), warps)
        build(sa._combine_splits_kernel, {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*" + tt,
                                          "lse_ptr": "*fp32"}, dict(BLOCK_D=128), 1)
        build(ps._page_scores_kernel, {"q_ptr": "*" + tt, "pmin_ptr": "*fp16", "pmax_ptr": "*fp16",
                                       "npages_ptr": "*i32", "out_ptr": "*fp32"}, dict(BLOCK_P=16, BLOCK_D=128), 4)
    print("compiled")
""")


@pytest.mark.skipif(not _common.HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode and last.startswith(("ImportError", "ModuleNotFoundError")):
        pytest.skip(f"this Triton has no ahead-of-time compile API for sm_90: {last}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
