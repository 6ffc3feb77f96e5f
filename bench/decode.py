"""``dkv bench decode``: sparse vs dense decode attention, and what selection costs in quality.

Attention per decode step, one layer, batch 1, for the SmolLM2 shape (9 query heads, 3 KV heads,
head dim 64) and a Llama-8B shape (32, 8, 128), at contexts of 4K, 16K and 64K tokens:

- ``dense_ms``: torch SDPA over the whole cache (what a model without selection does);
- ``sparse_ms``: a whole sparse step: Quest page bounds for every page, top pages per KV head, then
  attention over the chosen tokens (``kernels``: Triton on CUDA, the torch reference on a CPU);
- ``attention_ms``: the attention part alone.

On a GPU it also reports the bytes the sparse kernel reads over its time, as a fraction of the
copy bandwidth measured in the same run. Then the quality of selection on SmolLM2 (the quality
benchmark's tasks): retrieval accuracy and extra NLL at budgets 1/4, 1/8 and 1/16 of the cached
tokens, against dense. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dkv.kernels.page_scores import top_pages
from dkv.kernels.sparse_attention import sparse_decode_attention

SHAPES = {"smollm2": (9, 3, 64), "llama-8b": (32, 8, 128)}
CONTEXTS = (4096, 16384, 65536)
BUDGETS = (1 / 8, 1 / 16)
PAGE = 16


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def attention_rows(device: str, dtype: torch.dtype, repeats: int, contexts=CONTEXTS, shapes=SHAPES) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, (h_q, h_kv, d) in shapes.items():
        for t in contexts:
            k = torch.randn(h_kv, t, d, generator=gen).to(device, dtype)
            v = torch.randn(h_kv, t, d, generator=gen).to(device, dtype)
            q = torch.randn(h_q, d, generator=gen).to(device, dtype)
            pages = t // PAGE
            kp = k.view(h_kv, pages, PAGE, d)
            page_min, page_max = kp.amin(2), kp.amax(2)
            num_pages = torch.full((h_kv,), pages, dtype=torch.int32, device=device)
            scale = d ** -0.5
            dense = _median_ms(lambda: F.scaled_dot_product_attention(
                q.view(1, h_q, 1, d), k.unsqueeze(0), v.unsqueeze(0), scale=scale, enable_gqa=True), device, repeats)
            for fraction in BUDGETS:
                budget = int(t * fraction)
                n_pages = budget // PAGE

                def select():
                    chosen = top_pages(q, page_min, page_max, num_pages, n_pages)  # [H_kv, n_pages]
                    offsets = torch.arange(PAGE, device=device, dtype=torch.int32)
                    return (chosen.to(torch.int32).unsqueeze(-1) * PAGE + offsets).reshape(h_kv, -1)

                indices = select()
                lengths = torch.full((h_kv,), indices.shape[1], dtype=torch.int32, device=device)
                attend = lambda: sparse_decode_attention(q, k, v, indices, lengths, scale)  # noqa: E731
                attention = _median_ms(attend, device, repeats)
                sparse = _median_ms(lambda: sparse_decode_attention(q, k, v, select(), lengths, scale), device,
                                    repeats)
                row = {"device": _device_name(device), "shape": shape, "heads": [h_q, h_kv, d], "context": t,
                       "budget": f"1/{round(1 / fraction)}", "budget_tokens": budget, "dtype": str(dtype).split(".")[1],
                       "dense_ms": round(dense, 4), "sparse_ms": round(sparse, 4), "attention_ms": round(attention, 4),
                       "speedup": round(dense / sparse, 2)}
                if device == "cuda":
                    bytes_read = 2 * h_kv * budget * d * k.element_size() + indices.numel() * 4
                    row["achieved_gbps"] = round(bytes_read / attention / 1e6, 1)
                rows.append(row)
            k = v = None  # free this context's K/V before the next one is allocated
    return rows


def copy_bandwidth_gbps(device: str, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the ceiling for the kernel."""
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats)
    return round(2 * src.numel() / ms / 1e6, 1)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def _teacher_forced(model, entry, continuation: list[int], first_logits: torch.Tensor, selection: str,
                    budget: int | None) -> tuple[float, list[int]]:
    """Mean NLL of ``continuation`` and the argmax at each position, one decode step per token (the
    decode worker's batched decoder, fed the continuation instead of its own picks)."""
    from dkv.workers.decode import generate

    rows = [first_logits]
    forced = iter(continuation[1:])

    def feed(logits: torch.Tensor) -> int:
        rows.append(logits.float())
        return next(forced)

    generate(model, None, entry, torch.tensor([continuation[:1]]), len(continuation) - 1, selection, budget,
             stop_ids=set(), pick=feed)
    logits = torch.stack(rows)
    nll = -torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(continuation).unsqueeze(1)).squeeze(1)
    return float(nll.mean()), logits.argmax(-1).tolist()


def quality_rows(budgets=(1 / 4, 1 / 8, 1 / 16), quick: bool = False) -> list[dict]:
    """Retrieval accuracy and extra NLL of each selection at each budget against dense, on SmolLM2.

    The tasks and the protocol are the quality benchmark's (``bench.quality_tasks``): the context
    is cached whole (method ``full``); only decode-time selection differs. Budgets are fractions
    of the cached tokens per KV head.
    """
    from dkv.bench.quality import last_logits
    from dkv.bench.quality_tasks import build_tasks
    from dkv.workers.compression import compress
    from dkv.workers.decode import generate
    from dkv.workers.model import load_model

    model, tokenizer = load_model()
    tasks = build_tasks(tokenizer, quick=quick)
    entries = {t["id"]: compress(model, torch.tensor([t["context_ids"]]), "full") for t in tasks}
    firsts = {t["id"]: last_logits(model, t["context_ids"]) for t in tasks if t["kind"] == "fidelity"}
    configs = [("dense", None)] + [(sel, f) for sel in ("topk", "pages") for f in budgets]
    reference: dict[str, tuple[float, list[int]]] = {}
    rows = []
    for selection, fraction in configs:
        correct, extra, agree = [], [], []
        for task in tasks:
            n = len(task["context_ids"])
            budget = None if fraction is None else max(16, int(n * fraction))
            entry = entries[task["id"]]
            if task["kind"] == "retrieval":
                out = generate(model, tokenizer, entry, torch.tensor([task["query_ids"]]),
                               int(task.get("max_new_tokens", 16)), selection=selection, budget=budget)
                correct.append(str(task["answer"]) in tokenizer.decode(out, skip_special_tokens=True))
            else:
                nll, argmax = _teacher_forced(model, entry, task["continuation_ids"], firsts[task["id"]], selection,
                                              budget)
                ref_nll, ref_argmax = reference.setdefault(task["id"], (nll, argmax))
                extra.append(nll - ref_nll)
                agree.append(sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax))
        rows.append({"selection": selection, "budget": "all" if fraction is None else f"1/{round(1 / fraction)}",
                     "retrieval_accuracy": round(sum(correct) / len(correct), 3) if correct else None,
                     "extra_nll": round(sum(extra) / len(extra), 4) if extra else None,
                     "top1_agreement": round(sum(agree) / len(agree), 3) if agree else None,
                     "tasks": len(tasks)})
    return rows


def run(devices: list[str], repeats: int, quick: bool = False, quality: bool = True) -> dict:
    result = {"benchmark": "decode", "results": []}
    for device in devices:
        dtype = torch.float16 if device == "cuda" else torch.float32
        contexts = (4096, 16384) if quick else CONTEXTS
        result["results"] += attention_rows(device, dtype, repeats, contexts)
        if device == "cuda":
            result["copy_gbps"] = copy_bandwidth_gbps(device, repeats)
            for row in result["results"]:
                if "achieved_gbps" in row:
                    row["fraction_of_copy_bandwidth"] = round(row["achieved_gbps"] / result["copy_gbps"], 3)
    if quality:
        result["quality"] = quality_rows(quick=quick)
    return result


def main(args: argparse.Namespace) -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = run(devices, args.repeats, quick=args.quick, quality=not args.no_quality)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    sys.exit(main(parser.parse_args()))
