"""Triton kernels for sparse decode over the dkv cache, each with its launcher and torch reference.

- ``sparse_decode_attention``: one decode step attending only to each KV head's selected slots
  (flash-decoding splits, grouped-query attention); ``combine_partials`` merges results over
  disjoint slot sets by their log-sum-exps.
- ``sparse_decode_attention_quant``: the same over packed int4/int8 K/V, dequantized in the kernel.
- ``page_scores`` / ``top_pages``: Quest's per-page upper bound of ``q·k`` from page min/max keys.

Every public function takes ``backend="auto" | "triton" | "torch"``: ``auto`` launches Triton for
CUDA tensors and runs the torch reference otherwise; ``triton`` also runs on CPU tensors under
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this package was imported.
Triton is optional: without it every function still works through its reference.
"""

from kernels.page_scores import page_scores, top_pages
from kernels.quant_attention import sparse_decode_attention_quant
from kernels.sparse_attention import combine_partials, sparse_decode_attention

__all__ = [
    "sparse_decode_attention", "sparse_decode_attention_quant", "combine_partials", "page_scores", "top_pages",
]
