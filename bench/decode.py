"""``dkv bench decode``: sparse vs dense decode attention, and what selection costs in quality.

Attention per decode step, one layer, batch 1, for the SmolLM2 shape (9 query heads, 3 KV heads,
head dim 64) and a Llama-8B shape (32, 8, 128), at contexts of 4K, 16K and 64K tokens:

- ``dense_ms``: torch SDPA over the whole cache (what a model without selection does);
- ``sparse_ms``: a whole sparse step: Quest page bounds for every page, top pages per KV head, then
  attention over the chosen tokens (``kernels``: Triton on CUDA, the torch reference on a CPU);
- ``attention_ms``: the attention part alone.

On a GPU it also reports the bytes the sparse kernel reads over its time, as a fraction of the
copy bandwidth measured in the same run. Then the quality of selection on SmolLM2 (``quality_rows``:
passkeys and needles at 350-1400 tokens, the quality benchmark's fidelity texts): retrieval
accuracy, extra NLL and the needle's selection rate per layer at budgets 1/4, 1/8 and 1/16 of the
context attended per step (everything counted), against dense. Prints one JSON object.
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
            scale = d**-0.5
            dense = _median_ms(
                lambda: F.scaled_dot_product_attention(
                    q.view(1, h_q, 1, d), k.unsqueeze(0), v.unsqueeze(0), scale=scale, enable_gqa=True
                ),
                device,
                repeats,
            )
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
                sparse = _median_ms(lambda: sparse_decode_attention(q, k, v, select(), lengths, scale), device, repeats)
                row = {
                    "device": _device_name(device),
                    "shape": shape,
                    "heads": [h_q, h_kv, d],
                    "context": t,
                    "budget": f"1/{round(1 / fraction)}",
                    "budget_tokens": budget,
                    "dtype": str(dtype).split(".")[1],
                    "dense_ms": round(dense, 4),
                    "sparse_ms": round(sparse, 4),
                    "attention_ms": round(attention, 4),
                    "speedup": round(dense / sparse, 2),
                }
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


class NeedleCounter:
    """``observe`` hook of ``workers.decode.generate``: per layer, the share of the needle's
    (token, KV head) slots that selection attended, over every step."""

    def __init__(self, num_layers: int):
        self.hits = [0] * num_layers
        self.slots = [0] * num_layers
        self.span = (0, 0)

    def __call__(self, layer: int, keep: torch.Tensor, view) -> None:
        needle = (view.positions >= self.span[0]) & (view.positions < self.span[1]) & view.valid
        needle[:, view.entry_slots :] = False  # appended slots reuse positions past the entry only
        self.hits[layer] += int((keep & needle).sum())
        self.slots[layer] += int(needle.sum())

    def rates(self) -> list[float | None]:
        return [round(h / n, 3) if n else None for h, n in zip(self.hits, self.slots)]


# (selection, fraction of the context attended per step, dense layers), each measured against
# dense decoding; with 2 dense layers, 1/16 on the other 28 attends 1/8 in all
QUALITY_CONFIGS = [(s, f, 0) for s in ("topk", "pages") for f in (1 / 4, 1 / 8, 1 / 16)] + [
    ("topk", 1 / 8, 2),
    ("topk", 1 / 16, 2),
]


def quality_rows(quick: bool = False, configs=QUALITY_CONFIGS) -> list[dict]:
    """Retrieval accuracy and extra NLL of each selection at each budget against dense, on SmolLM2.

    The first row is dense decoding, the reference of the others' extra NLL and top-1 agreement.
    Retrieval: passkeys and needles at 350-1400 tokens (``quality_tasks.short_retrieval_tasks``);
    fidelity: the quality benchmark's texts. The context is cached whole (method ``full``); only
    decode-time selection differs. A budget is a fraction of the context's tokens per KV head per
    step with everything counted (sinks, recent, the query's and the generated tokens, every
    layer); ``attended`` is what the decoder reports it attended (``DecodeStats``) over the
    context's length, mean over steps and tasks. ``needle_selected`` is the share of the
    needle's (token, KV head) slots selected per step, mean over layers (``..._by_layer``: per
    layer), on the retrieval tasks.
    """
    from dkv.bench.quality import last_logits, log, teacher_forced
    from dkv.bench.quality_tasks import build_tasks, short_retrieval_tasks
    from dkv.workers.compression import compress
    from dkv.workers.decode import generate
    from dkv.workers.engine import DecodeStats
    from dkv.workers.model import load_model, model_info

    model, tokenizer = load_model()
    layers = model_info(model).num_layers
    tasks = short_retrieval_tasks(tokenizer, quick=quick) + [
        t for t in build_tasks(tokenizer, quick=quick) if t["kind"] == "fidelity"
    ]
    entries = {t["id"]: compress(model, torch.tensor([t["context_ids"]]), "full") for t in tasks}
    firsts = {t["id"]: last_logits(model, t["context_ids"]) for t in tasks if t["kind"] == "fidelity"}
    reference: dict[str, tuple[float, list[int]]] = {}
    rows = []
    for selection, fraction, dense_layers in [("dense", None, 0), *configs]:
        correct, extra, agree, attended = [], [], [], []
        needle = NeedleCounter(layers)
        for task in tasks:
            n = len(task["context_ids"])
            budget = None if fraction is None else max(16, int(n * fraction))
            entry, stats = entries[task["id"]], DecodeStats()
            params = dict(dense_layers=dense_layers, stats=stats)
            if task["kind"] == "retrieval":
                needle.span = tuple(task["needle"])
                out = generate(
                    model,
                    tokenizer,
                    entry,
                    torch.tensor([task["query_ids"]]),
                    int(task.get("max_new_tokens", 16)),
                    selection=selection,
                    budget=budget,
                    observe=needle if selection != "dense" else None,
                    **params,
                )
                correct.append(str(task["answer"]) in tokenizer.decode(out, skip_special_tokens=True))
            else:
                nll, argmax = teacher_forced(
                    model, entry, task["continuation_ids"], firsts[task["id"]], selection, budget, **params
                )
                nll = float(nll.mean())
                ref_nll, ref_argmax = reference.setdefault(task["id"], (nll, argmax))
                extra.append(nll - ref_nll)
                agree.append(sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax))
            if stats.selected_per_step:
                attended.append(statistics.mean(stats.selected_per_step) / n)
        by_layer = needle.rates()
        seen = [r for r in by_layer if r is not None]
        rows.append(
            {
                "selection": selection,
                "budget": "all" if fraction is None else f"1/{round(1 / fraction)}",
                "dense_layers": dense_layers,
                "retrieval_accuracy": round(sum(correct) / len(correct), 3) if correct else None,
                "extra_nll": round(sum(extra) / len(extra), 4) if extra else None,
                "top1_agreement": round(sum(agree) / len(agree), 3) if agree else None,
                "attended": round(statistics.mean(attended), 4) if attended else None,
                "needle_selected": round(statistics.mean(seen), 3) if seen else None,
                "needle_selected_by_layer": by_layer if seen else None,
                "tasks": len(tasks),
                "retrieval_tasks": len(correct),
            }
        )
        log(f"decode quality: {json.dumps({k: v for k, v in rows[-1].items() if not k.endswith('_by_layer')})}")
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
