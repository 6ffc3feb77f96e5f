"""``dkv bench quality``: what each compression method costs in answers, likelihood and bytes.

On SmolLM2-135M (CPU, float32 weights) and the tasks of ``bench.quality_tasks`` (passkey and
needle retrieval at 0.5K-2K tokens, fidelity on real English prose), with the protocol of
``bench/kvpress_runner.py`` (its docstring), so dkv's rows and kvpress's are comparable:

- retrieval: ``compress`` the context, feed the query ids in one forward after the entry and
  decode greedily until a stop token (``workers.decode.generate``, dense selection); correct when
  the answer is a substring of the new tokens decoded with ``skip_special_tokens``;
- fidelity: the first continuation token is scored from the full prefill's last logits (the
  same for every method: compression happens after the context's forward), the rest
  teacher-forced in one forward after ``to_hf_cache(entry)``; ``extra_nll`` = mean NLL minus
  the full cache's (nats/token), ``top1_agreement`` = share of positions whose argmax equals the
  full cache's.

Rows: every registered method except ``full`` at ratios 0.5, 0.75, 0.9; the best method (mean
retrieval over the ratios, then mean extra NLL) quantized int8 / int4 / mixed at 0.5 and 0.75;
D2O merging (``merge=True``) on snapkv and the best method; the chunked recipe
(``compress_chunks``, 256-token chunks, what prefix reuse stores) against whole-context
compression for snapkv and the best method at 0.5 and 0.75. Then, when ``.venv-peers`` exists,
kvpress's presses on the same token ids through ``bench/kvpress_runner.py`` (a subprocess in
its own venv, started after the timing phase and run beside dkv's rows).

Equal attended tokens (issue 16): kvpress at ratio r (0.75, 0.9) attends 1 - r of the context
per step. dkv's rows for it store the full cache, or the best method and lagkv at 0.5 + int4,
and decode with ``topk`` or ``pages`` at a budget of 1 - r of the context's tokens per KV head
and step, everything counted (sinks, recent, query and generated tokens, every layer); their
fidelity is teacher-forced one decode step per token so selection applies at every position.
``attended`` is what the decoder reports it attended over the context's length.

Bytes: ``bytes_vs_fp16_kv`` is an entry's stored bytes over the context's raw fp16 K/V
(2·layers·kv_heads·tokens·head_dim·2 B); ``bytes_vs_full_entry`` over the ``full`` method's
entry stored in fp16 (its K/V plus positions, scores and page summaries). Dense K/V count at
2 bytes per value (an fp16 model stores them so; the CPU model here computes in float32);
quantized entries count what they hold. For kvpress rows ``bytes_vs_fp16_kv`` is its kept
fraction (a plain cache, no metadata).

Prefill overhead: for the methods that capture an observation window, the best (of ``repeats``)
time of ``compress(method, 0.5)`` over the best of a plain
``model(ids, use_cache=True, logits_to_keep=1)`` on the ~2048-token context, minus 1, timed
interleaved on ``threads`` torch threads before kvpress starts. The target uses process CPU
time (other processes do not count in it); the wall-time ratio is reported beside it. The best
of several runs, not the median: interference (caches, memory bandwidth, clock) only ever adds
time, and on this 2-core machine one thread's CPU time for the same forward varied by 8%
between runs, as much as the overhead being measured.

``run(...)`` returns the report (schema in ``main``'s help); ``main(args)`` prints it and
writes ``<out>/img/quality.png`` and the ``quality`` section of ``<out>/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RUNNER = ROOT / "bench" / "kvpress_runner.py"
RATIOS = (0.5, 0.75, 0.9)
QUANTS = ("int8", "int4", "mixed")
VARIANT_RATIOS = (0.5, 0.75)  # quantization, merge and chunked rows
CHUNK_SIZE = 256
TIMING_RATIO = 0.5
KVPRESS_PRESSES = ("snapkv", "pyramidkv", "expected_attention", "tova", "knorm", "lagkv", "streaming_llm")
QUICK_METHODS = ("snapkv", "knorm")
MARK_START, MARK_END = "<!-- quality:start -->", "<!-- quality:end -->"
NLL_TOLERANCE = 1e-3  # nats/token: "matches" on extra NLL allows float noise between two implementations
# int4_bytes: issue 16's bound at SmolLM2's head_dim 64 (1/7 at head_dim 128: tests/unit/test_entry_format.py)
TARGETS = {"prefill_overhead": 0.15, "int4_bytes": 0.150, "int4_retrieval_drop": 0.05}
# The equal-attended-tokens comparison (issue 16): kvpress at these ratios attends 1 - ratio of the
# context per step; dkv's rows keep a store recipe and attend as many tokens by decode selection.
EQUAL_RATIOS = (0.75, 0.9)
EQUAL_SELECTIONS = ("topk", "pages")
EQUAL_STORE_METHODS = ("lagkv",)  # beside the best method, each at EQUAL_STORE_RATIO + int4
EQUAL_STORE_RATIO = 0.5
EQUAL_MARGIN = {0.75: 0.30, 0.9: 0.40}  # retrieval dkv must gain over kvpress's best press


@dataclass(frozen=True)
class Config:
    method: str
    ratio: float
    quant: str = "none"
    merge: bool = False
    chunked: bool = False
    selection: str = "dense"  # decode-time selection (``workers.selection``)
    attend: float = 1.0  # with a selection: the fraction of the context attended per step, everything counted

    @property
    def label(self) -> str:
        extra = "".join(
            [
                f"+{self.quant}" if self.quant != "none" else "",
                "+merge" if self.merge else "",
                "+chunked" if self.chunked else "",
                f"+{self.selection}@{self.attend:g}" if self.selection != "dense" else "",
            ]
        )
        return f"{self.method}@{self.ratio}{extra}" if self.method != "full" else f"full{extra}"

    def fields(self) -> dict:
        """The configuration's part of a result row."""
        return {
            "impl": "dkv",
            "method": self.method,
            "ratio": self.ratio,
            "quant": self.quant,
            "merge": self.merge,
            "chunked": self.chunked,
            "selection": self.selection,
            "attend": self.attend,
        }

    def budget(self, n_tokens: int) -> int | None:
        """Slots per KV head per decode step for a context of ``n_tokens`` (None: all)."""
        return None if self.selection == "dense" else max(16, int(n_tokens * self.attend))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ protocol


def _stitch(entries):
    """One entry holding the chunk entries of a chunked recipe back to back; quantized rows come
    dequantized, as the decoder reads them."""
    from dkv.kvstore.entry import Identity, make_layer

    if len(entries) == 1:
        return entries[0]
    first, last = entries[0], entries[-1]
    layers = []
    for per_chunk in zip(*(e.layers for e in entries)):
        dense = [layer.dequantized(first.page_size, torch.float32) for layer in per_chunk]
        pos, keys, values, scores = [], [], [], []
        for h in range(first.num_kv_heads):
            rows = [
                (layer.head_offsets[h].item(), layer.head_offsets[h + 1].item(), layer, kv)
                for layer, kv in zip(per_chunk, dense)
            ]
            pos.append(torch.cat([layer.positions[a:b] for a, b, layer, _ in rows]))
            keys.append(torch.cat([kv[0][a:b] for a, b, _, kv in rows]))
            values.append(torch.cat([kv[1][a:b] for a, b, _, kv in rows]))
            scores.append(torch.cat([layer.scores[a:b] for a, b, layer, _ in rows]))
        layers.append(make_layer(pos, keys, values, scores, first.page_size))
    ident = last.identity
    identity = Identity(ident.model_fingerprint, ident.recipe, ident.chunk_hashes, ident.seq_len, ident.tenant, start=0)
    return first.replace(identity=identity, layers=layers)


def stored_bytes(entry) -> int:
    """Bytes of ``entry`` as the store keeps it (``CompressedKV.stored_layers``), dense float
    tensors (K/V, page summaries) counted at fp16."""
    return sum(_stored_size(t) for layer in entry.stored_layers() for t in layer.values())


def _stored_size(t: torch.Tensor) -> int:
    return t.numel() * (min(t.element_size(), 2) if t.is_floating_point() else t.element_size())


def make_entry(model, ids: torch.Tensor, cfg: Config):
    """(entry for decoding, stored bytes) of one context under ``cfg``."""
    from dkv.workers.compression import compress, compress_chunks

    if cfg.chunked:
        entries = compress_chunks(
            model, ids, cfg.method, cfg.ratio, quant=cfg.quant, merge=cfg.merge, chunk_size=CHUNK_SIZE
        )
        return _stitch(entries), sum(stored_bytes(e) for e in entries)
    entry = compress(model, ids, cfg.method, cfg.ratio, quant=cfg.quant, merge=cfg.merge)
    return entry, stored_bytes(entry)


def bytes_breakdown(model, context_ids: list[int], method: str, ratio: float = 0.5, quant: str = "int4") -> dict:
    """Where an entry's bytes go: bytes per stored row (one token of one KV head of one layer), by field.

    The fp16 K/V of a row is ``2 * head_dim * 2`` bytes; everything else an entry stores per row
    (positions, scores, bit widths, value ranges) or per page (key min/max codes) is metadata.
    """
    entry, _ = make_entry(model, torch.tensor([context_ids]), Config(method, ratio, quant=quant))
    rows = sum(layer.num_tokens for layer in entry.layers)
    fields: dict[str, float] = {}
    for layer in entry.stored_layers():
        for name, t in layer.items():
            fields[name] = fields.get(name, 0.0) + _stored_size(t)
    per_row = {name: round(b / rows, 3) for name, b in fields.items()}
    total = sum(fields.values()) / rows
    fp16_row = 2 * entry.head_dim * 2
    return {
        "method": method,
        "ratio": ratio,
        "quant": quant,
        "context_tokens": len(context_ids),
        "page_size": entry.page_size,
        "head_dim": entry.head_dim,
        "bytes_per_row": per_row,
        "total_per_row": round(total, 3),
        "fp16_kv_per_row": fp16_row,
        "kept_fraction": rows / (entry.num_layers * entry.num_kv_heads * len(context_ids)),
        "bytes_vs_fp16_kv": stored_bytes(entry) / fp16_kv_bytes(model, len(context_ids)),
    }


def fp16_kv_bytes(model, n_tokens: int) -> int:
    from dkv.workers.model import model_info

    info = model_info(model)
    return 2 * info.num_layers * info.num_kv_heads * n_tokens * info.head_dim * 2


def _task_entry(model, task: dict, cfg: Config, memo: dict | None) -> tuple:
    """(entry, stored bytes, compress seconds) of ``task``'s context under ``cfg``'s store recipe;
    ``memo`` keeps them for the rows that differ only in decode-time selection."""
    key = (task["id"], cfg.method, cfg.ratio, cfg.quant, cfg.merge, cfg.chunked)
    if memo is not None and key in memo:
        return memo[key]
    t0 = time.perf_counter()
    entry, nbytes = make_entry(model, torch.tensor([task["context_ids"]]), cfg)
    made = (entry, nbytes, time.perf_counter() - t0)
    if memo is not None:
        memo[key] = made
    return made


def run_retrieval(model, tokenizer, task: dict, cfg: Config, memo: dict | None = None) -> dict:
    from dkv.workers.decode import generate
    from dkv.workers.engine import DecodeStats

    n = len(task["context_ids"])
    entry, nbytes, prefill_s = _task_entry(model, task, cfg, memo)
    stats = DecodeStats()
    new_ids = generate(
        model,
        tokenizer,
        entry,
        torch.tensor([task["query_ids"]]),
        int(task.get("max_new_tokens", 16)),
        selection=cfg.selection,
        budget=cfg.budget(n),
        stats=stats,
    )
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return {
        "kind": "retrieval",
        "correct": str(task["answer"]) in text,
        "text": text,
        "new_ids": new_ids,
        "nbytes": nbytes,
        "kv_kept": _kept(entry, n),
        "attended": _attended(stats, n),
        "prefill_s": prefill_s,
    }


def _attended(stats, n_tokens: int) -> float | None:
    """Slots attended per KV head and step (``DecodeStats``, everything counted) over the context's length."""
    steps = stats.selected_per_step
    return sum(steps) / len(steps) / n_tokens if steps else None


def teacher_forced(
    model,
    entry,
    continuation: list[int],
    first_logits: torch.Tensor,
    selection: str,
    budget: int | None,
    stats=None,
    **params,
) -> tuple[torch.Tensor, list[int]]:
    """Per-token NLL of ``continuation`` and the argmax at each position, one decode step per
    token through the decode worker's batched decoder (fed the continuation instead of its own
    picks), so decode-time selection applies at every position."""
    from dkv.workers.decode import generate

    rows = [first_logits]
    forced = iter(continuation[1:])

    def feed(logits: torch.Tensor) -> int:
        rows.append(logits.float())
        return next(forced)

    generate(
        model,
        None,
        entry,
        torch.tensor([continuation[:1]]),
        len(continuation) - 1,
        selection,
        budget,
        stop_ids=set(),
        pick=feed,
        stats=stats,
        **params,
    )
    logits = torch.stack(rows)
    nll = -torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(continuation).unsqueeze(1)).squeeze(1)
    return nll, logits.argmax(-1).tolist()


def last_logits(model, context_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context_ids]), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def run_fidelity(
    model, task: dict, cfg: Config, first_logits: torch.Tensor, reference: dict | None, memo: dict | None = None
) -> dict:
    from dkv.workers.cache import to_hf_cache
    from dkv.workers.engine import DecodeStats

    context, cont = task["context_ids"], task["continuation_ids"]
    entry, nbytes, prefill_s = _task_entry(model, task, cfg, memo)
    attended = _kept(entry, len(context))
    if cfg.selection != "dense":  # step by step, so selection applies at every position
        stats = DecodeStats()
        nll, argmax = teacher_forced(model, entry, cont, first_logits, cfg.selection, cfg.budget(len(context)), stats)
        attended = _attended(stats, len(context))
    else:
        rows = [first_logits.unsqueeze(0)]
        if len(cont) > 1:
            cache = to_hf_cache(entry)
            position_ids = torch.arange(len(context), len(context) + len(cont) - 1).unsqueeze(0)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([cont[:-1]]), cache=cache, position_ids=position_ids, use_cache=True)
            rows.append(out.logits[0].float())
        logits = torch.cat(rows, dim=0)  # row i predicts cont[i]
        nll = -torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont).unsqueeze(1)).squeeze(1)
        argmax = logits.argmax(dim=-1).tolist()
    mean_nll = float(nll.mean())
    ref_argmax, ref_mean = (argmax, mean_nll) if reference is None else (reference["argmax"], reference["mean_nll"])
    return {
        "kind": "fidelity",
        "mean_nll": mean_nll,
        "extra_nll": mean_nll - ref_mean,
        "top1_agreement": sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax),
        "argmax": argmax,
        "nbytes": nbytes,
        "kv_kept": _kept(entry, len(context)),
        "attended": attended,
        "prefill_s": prefill_s,
    }


def _kept(entry, n_tokens: int) -> float:
    return sum(entry.kept_tokens()) / (entry.num_layers * entry.num_kv_heads * n_tokens)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def evaluate(
    model,
    tokenizer,
    tasks: list[dict],
    cfg: Config,
    reference: dict | None,
    first_logits: dict,
    full_bytes: dict,
    step=lambda label: None,
    memo: dict | None = None,
) -> dict:
    """One dkv config over ``tasks``: the result row (schema in ``main``) plus per-task results."""
    per_task = {}
    for task in tasks:
        torch.manual_seed(0)
        if task["kind"] == "retrieval":
            res = run_retrieval(model, tokenizer, task, cfg, memo)
        else:
            ref = None if reference is None else reference[task["id"]]
            res = run_fidelity(model, task, cfg, first_logits[task["id"]], ref, memo)
        n = len(task["context_ids"])
        res["bytes_vs_fp16_kv"] = res["nbytes"] / fp16_kv_bytes(model, n)
        res["bytes_vs_full_entry"] = res["nbytes"] / full_bytes[task["id"]] if task["id"] in full_bytes else 1.0
        per_task[task["id"]] = res
        step(cfg.label)
    retrieval = [r for r in per_task.values() if r["kind"] == "retrieval"]
    fidelity = [r for r in per_task.values() if r["kind"] == "fidelity"]
    return {
        **cfg.fields(),
        "retrieval_accuracy": _mean([1.0 if r["correct"] else 0.0 for r in retrieval]),
        "extra_nll": _mean([r["extra_nll"] for r in fidelity]),
        "top1_agreement": _mean([r["top1_agreement"] for r in fidelity]),
        "bytes_vs_fp16_kv": _mean([r["bytes_vs_fp16_kv"] for r in per_task.values()]),
        "bytes_vs_full_entry": _mean([r["bytes_vs_full_entry"] for r in per_task.values()]),
        "prefill_overhead": None,
        "kv_kept": _mean([r["kv_kept"] for r in per_task.values()]),
        "attended": _mean([r["attended"] for r in per_task.values()]),
        "prefill_s": _mean([r["prefill_s"] for r in per_task.values()]),
        "tasks": per_task,
    }


# ------------------------------------------------------------------------------------------- timing


def time_prefill(model, contexts: list[list[int]], methods: list[str], repeats: int) -> dict:
    """Best seconds of a plain forward and of ``compress(method, TIMING_RATIO)`` per context.

    Each repeat runs the plain forward and every method once, in an order rotated per repeat (so
    no method always runs first or right after another). Both the wall time and the process CPU
    time are taken; ``overhead`` uses CPU time, which other processes on a shared machine do not
    inflate (with one torch thread it equals the wall time of a quiet machine), and
    ``overhead_wall`` the wall time.
    """
    from dkv.workers.compression import compress

    names = ["plain", *methods]
    wall: dict[str, list[float]] = {n: [] for n in names}  # per context: median
    cpu: dict[str, list[float]] = {n: [] for n in names}
    split: dict[str, dict[str, list[float]]] = {m: {"capture_s": [], "select_s": []} for m in methods}
    for ctx in contexts:
        ids = torch.tensor([ctx])
        w = {n: [] for n in names}
        c = {n: [] for n in names}
        parts = {m: [] for m in methods}
        with torch.no_grad():
            model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
        for rep in range(repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                timings: dict = {}
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "plain":
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=True, logits_to_keep=1)
                else:
                    compress(model, ids, name, TIMING_RATIO, timings=timings)
                    parts[name].append(timings)
                w[name].append(time.perf_counter() - t0)
                c[name].append(time.process_time() - c0)
        for n in names:
            wall[n].append(min(w[n]))
            cpu[n].append(min(c[n]))
        for m in methods:
            split[m]["capture_s"].append(min(t["prefill_s"] for t in parts[m]))
            split[m]["select_s"].append(min(t["compress_s"] for t in parts[m]))
    result = {
        "plain_s": _mean(wall["plain"]),
        "plain_cpu_s": _mean(cpu["plain"]),
        "contexts": [len(c) for c in contexts],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_avg": _loadavg(),
        "methods": {},
    }
    for m in methods:
        result["methods"][m] = {
            "compress_s": _mean(wall[m]),
            "compress_cpu_s": _mean(cpu[m]),
            "overhead": _mean([a / b - 1.0 for a, b in zip(cpu[m], cpu["plain"])]),
            "overhead_wall": _mean([a / b - 1.0 for a, b in zip(wall[m], wall["plain"])]),
            "capture_s": _mean(split[m]["capture_s"]),  # wall: the model's forward with the capture hooks
            "select_s": _mean(split[m]["select_s"]),  # wall: scoring, top-k, gather, entry building
        }
    return result


# ------------------------------------------------------------------------------------------ kvpress


class Peers:
    """``bench/kvpress_runner.py`` in ``.venv-peers``, as a background subprocess."""

    def __init__(self, tasks: list[dict], model_dir: Path, presses, ratios, threads: int, workdir: Path):
        self.task_file = workdir / "tasks.json"
        self.out_file = workdir / "kvpress.json"
        self.log_file = workdir / "kvpress.log"
        self.task_file.write_text(json.dumps({"tasks": [_runner_task(t) for t in tasks]}))
        cmd = [
            str(PEERS_PYTHON),
            str(RUNNER),
            "--model-dir",
            str(model_dir),
            "--tasks",
            str(self.task_file),
            "--out",
            str(self.out_file),
            "--presses",
            ",".join(presses),
            "--ratios",
            ",".join(str(r) for r in ratios),
            "--threads",
            str(threads),
        ]
        self._log = open(self.log_file, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log)

    def progress(self) -> str:
        """The runner's last progress fragment (its tqdm line), for our progress bar."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 300))
                tail = f.read().decode(errors="replace")
        except OSError:
            return ""
        counts = re.findall(r"(\d+)/(\d+) \[", tail)  # tqdm's "12/286 [" of the last update
        return f"{counts[-1][0]}/{counts[-1][1]}" if counts else "starting"

    def wait(self) -> dict | None:
        rc = self.proc.wait()
        self._log.close()
        if rc != 0 or not self.out_file.is_file():
            tail = self.log_file.read_text(errors="replace")[-2000:]
            log(f"kvpress runner failed (exit {rc}):\n{tail}")
            return None
        return json.loads(self.out_file.read_text())


def _runner_task(task: dict) -> dict:
    keys = ("id", "kind", "context_ids", "query_ids", "answer", "max_new_tokens", "continuation_ids")
    return {k: task[k] for k in keys if k in task}


def kvpress_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["results"]:
        rows.append(
            {
                "impl": "kvpress",
                "method": r["press"],
                "ratio": r["ratio"],
                "quant": "none",
                "merge": False,
                "chunked": False,
                "selection": "dense",
                "attend": 1.0,
                "attended": r["kv_kept"],
                "retrieval_accuracy": r["retrieval_accuracy"],
                "extra_nll": r["extra_nll"],
                "top1_agreement": r["top1_agreement"],
                "bytes_vs_fp16_kv": r["kv_kept"],
                "bytes_vs_full_entry": None,
                "prefill_overhead": None,
                "kv_kept": r["kv_kept"],
                "prefill_s": r["prefill_s"],
                "error": r["error"],
                "per_task": {
                    tid: (t["correct"] if t["kind"] == "retrieval" else round(t["extra_nll"], 4))
                    for tid, t in r["tasks"].items()
                    if "error" not in t
                },
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- report


def plain_rows(results: list[dict], impl: str) -> list[dict]:
    return [
        r
        for r in results
        if r["impl"] == impl
        and r["method"] != "full"
        and r["quant"] == "none"
        and not r["merge"]
        and not r["chunked"]
        and r.get("selection", "dense") == "dense"
        and not r.get("error")
    ]


def equal_rows(results: list[dict], ratio: float) -> list[dict]:
    """dkv's rows that attend ``1 - ratio`` of the context per step by decode selection."""
    return [
        r
        for r in results
        if r["impl"] == "dkv"
        and r.get("selection", "dense") != "dense"
        and abs(r["attend"] - (1 - ratio)) < 1e-6
        and not r.get("error")
    ]


def equal_tokens(results: list[dict]) -> list[dict]:
    """Per kvpress ratio: kvpress's best press against dkv's best configuration attending as many
    tokens per step (best = highest retrieval, then lowest extra NLL; the lowest NLL beside it)."""
    out = []
    for ratio in EQUAL_RATIOS:
        ours = equal_rows(results, ratio)
        theirs = [r for r in plain_rows(results, "kvpress") if abs(r["ratio"] - ratio) < 1e-9]
        if not ours or not theirs:
            continue

        def rank(r):
            return (-(r["retrieval_accuracy"] or 0.0), r["extra_nll"] if r["extra_nll"] is not None else math.inf)

        best, peer = min(ours, key=rank), min(theirs, key=rank)
        nll = [r for r in ours if r["extra_nll"] is not None]
        peer_nll = [r for r in theirs if r["extra_nll"] is not None]
        out.append(
            {
                "ratio": ratio,
                "attend": round(1 - ratio, 4),
                "dkv": _equal_label(best),
                "dkv_retrieval": best["retrieval_accuracy"],
                "dkv_extra_nll": best["extra_nll"],
                "dkv_bytes_vs_fp16_kv": best["bytes_vs_fp16_kv"],
                "dkv_attended": best.get("attended"),
                "dkv_lowest_nll": min(r["extra_nll"] for r in nll) if nll else None,
                "dkv_lowest_nll_config": _equal_label(min(nll, key=lambda r: r["extra_nll"])) if nll else None,
                "kvpress": peer["method"],
                "kvpress_retrieval": peer["retrieval_accuracy"],
                "kvpress_extra_nll": peer["extra_nll"],
                "kvpress_lowest_nll": min(r["extra_nll"] for r in peer_nll) if peer_nll else None,
                "kvpress_bytes_vs_fp16_kv": peer["bytes_vs_fp16_kv"],
            }
        )
    return out


def _equal_label(r: dict) -> str:
    store = (
        "full cache"
        if r["method"] == "full"
        else f"{r['method']} {r['ratio']}" + (f" + {r['quant']}" if r["quant"] != "none" else "")
    )
    return f"{store}, {r['selection']}"


def best_method(rows: list[dict]) -> str:
    """Highest mean retrieval accuracy over the ratios, then lowest mean extra NLL."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)

    def key(m):
        rs = by_method[m]
        acc = _mean([r["retrieval_accuracy"] for r in rs])
        nll = _mean([r["extra_nll"] for r in rs])
        return (-(acc if acc is not None else 0.0), nll if nll is not None else math.inf, m)

    return min(by_method, key=key) if by_method else "snapkv"


def _best(rows, ratio, field, lowest=False):
    cands = [r for r in rows if abs(r["ratio"] - ratio) < 1e-9 and r[field] is not None]
    if not cands:
        return None, None
    r = (min if lowest else max)(cands, key=lambda r: r[field])
    return r[field], r["method"]


def targets(results: list[dict], timing: dict | None, best: str, full_accuracy: float | None, ratios) -> dict:
    out = {}
    dkv, peers = plain_rows(results, "dkv"), plain_rows(results, "kvpress")
    for ratio in ratios:
        for field, lowest, tol in (("retrieval_accuracy", False, 0.0), ("extra_nll", True, NLL_TOLERANCE)):
            ours, our_m = _best(dkv, ratio, field, lowest)
            theirs, their_m = _best(peers, ratio, field, lowest)
            met = None
            if ours is not None and theirs is not None:
                met = ours <= theirs + tol if lowest else ours >= theirs - tol
            out[f"{field}_vs_kvpress@{ratio}"] = {
                "value": ours,
                "threshold": theirs,
                "met": met,
                "dkv_method": our_m,
                "kvpress_press": their_m,
                "rule": f"dkv's best {'<=' if lowest else '>='} kvpress's best" + (f" + {tol}" if tol else ""),
            }
    for m, t in ((timing or {}).get("methods") or {}).items():
        out[f"prefill_overhead:{m}"] = {
            "value": t["overhead"],
            "threshold": TARGETS["prefill_overhead"],
            "met": t["overhead"] <= TARGETS["prefill_overhead"],
            "rule": "<=",
        }
    q = next(
        (
            r
            for r in results
            if r["impl"] == "dkv"
            and r["method"] == best
            and r["quant"] == "int4"
            and abs(r["ratio"] - 0.5) < 1e-9
            and not r["merge"]
            and not r["chunked"]
            and r.get("selection", "dense") == "dense"
        ),
        None,
    )
    if q is not None:
        out["int4@0.5_bytes_vs_fp16_kv"] = {
            "value": q["bytes_vs_fp16_kv"],
            "threshold": TARGETS["int4_bytes"],
            "met": q["bytes_vs_fp16_kv"] <= TARGETS["int4_bytes"],
            "rule": "<=",
            "method": best,
            "bytes_vs_full_entry": q["bytes_vs_full_entry"],
        }
        acc = q["retrieval_accuracy"]
        drop = None if full_accuracy is None or acc is None else full_accuracy - acc
        out["int4@0.5_retrieval_drop"] = {
            "value": drop,
            "threshold": TARGETS["int4_retrieval_drop"],
            "met": None if drop is None else drop <= TARGETS["int4_retrieval_drop"] + 1e-9,
            "rule": "<=",
            "method": best,
        }
    for e in equal_tokens(results):
        r = e["ratio"]
        margin = EQUAL_MARGIN[r]
        threshold = e["kvpress_retrieval"] + margin if e["kvpress_retrieval"] is not None else None
        out[f"equal_tokens_retrieval@{r}"] = {
            "value": e["dkv_retrieval"],
            "threshold": threshold,
            "met": None if threshold is None or e["dkv_retrieval"] is None else e["dkv_retrieval"] >= threshold - 1e-9,
            "rule": f"dkv's best at equal attended tokens >= kvpress's best press + {margin}",
            "dkv_config": e["dkv"],
            "kvpress_press": e["kvpress"],
        }
        ours, theirs = e["dkv_lowest_nll"], e["kvpress_lowest_nll"]
        out[f"equal_tokens_extra_nll@{r}"] = {
            "value": ours,
            "threshold": theirs,
            "met": None if ours is None or theirs is None else ours < theirs,
            "rule": "dkv's lowest extra NLL at equal attended tokens < kvpress's lowest",
            "dkv_config": e["dkv_lowest_nll_config"],
        }
    return out


def prefix_reuse(results: list[dict]) -> list[dict]:
    """Chunked recipe minus whole-context compression, per (method, ratio) where both ran."""
    out = []
    for c in results:
        if c["impl"] != "dkv" or not c["chunked"]:
            continue
        w = next(
            (
                r
                for r in results
                if r["impl"] == "dkv"
                and r["method"] == c["method"]
                and r["ratio"] == c["ratio"]
                and r["quant"] == c["quant"]
                and r["merge"] == c["merge"]
                and not r["chunked"]
                and r.get("selection", "dense") == "dense"
            ),
            None,
        )
        if w is None:
            continue
        out.append(
            {
                "method": c["method"],
                "ratio": c["ratio"],
                "retrieval_delta": _diff(c["retrieval_accuracy"], w["retrieval_accuracy"]),
                "extra_nll_delta": _diff(c["extra_nll"], w["extra_nll"]),
                "top1_delta": _diff(c["top1_agreement"], w["top1_agreement"]),
                "bytes_delta": _diff(c["bytes_vs_fp16_kv"], w["bytes_vs_fp16_kv"]),
            }
        )
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------------------------- run


def run(
    quick: bool = False,
    peers: bool = True,
    progress: bool = True,
    threads: int = 1,
    repeats: int = 5,
    model_name: str | None = None,
) -> dict:
    """Run the benchmark and return the report (see ``main``); torch's thread count is restored after."""
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run(quick, peers, progress, threads, repeats, model_name)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick, peers, progress, threads, repeats, model_name) -> dict:
    from dkv.bench.quality_tasks import build_tasks
    from dkv.workers.methods import METHODS, make_method
    from dkv.workers.model import DEFAULT_MODEL, cache_root, load_model

    started = time.perf_counter()
    model_name = model_name or DEFAULT_MODEL
    model, tokenizer = load_model(model_name)
    tasks = build_tasks(tokenizer, quick=quick)
    methods = list(QUICK_METHODS) if quick else sorted(m for m in METHODS if m != "full")
    ratios = (0.5,) if quick else RATIOS
    window_methods = [m for m in methods if make_method(m).window > 0]

    bar = _Bar(progress)
    # 1. the full cache: reference for fidelity, and drop the retrieval tasks it fails
    first_logits = {t["id"]: last_logits(model, t["context_ids"]) for t in tasks if t["kind"] == "fidelity"}
    bar.reset(len(tasks), "full cache")
    full = evaluate(model, tokenizer, tasks, Config("full", 0.0), None, first_logits, {}, bar.step)
    failed = [tid for tid, r in full["tasks"].items() if r["kind"] == "retrieval" and not r["correct"]]
    if failed:
        log(f"dropping {len(failed)} task(s) the full cache fails: {', '.join(failed)}")
    tasks = [t for t in tasks if t["id"] not in failed]
    full["tasks"] = {k: v for k, v in full["tasks"].items() if k not in failed}
    full["retrieval_accuracy"] = _mean(
        [1.0 if r["correct"] else 0.0 for r in full["tasks"].values() if r["kind"] == "retrieval"]
    )
    full_bytes = {tid: r["nbytes"] for tid, r in full["tasks"].items()}
    reference = {tid: r for tid, r in full["tasks"].items() if r["kind"] == "fidelity"}

    # 2. prefill overhead, before anything else runs beside it
    long_ctx = sorted((t["context_ids"] for t in tasks), key=len)[-1:]
    timing = None
    if window_methods:
        bar.reset(0, f"timing {len(window_methods)} methods on {len(long_ctx[0])} tokens x{1 if quick else repeats}")
        timing = time_prefill(model, long_ctx, window_methods, 1 if quick else repeats)

    # 3. kvpress beside dkv's rows
    runner = None
    workdir = Path(tempfile.mkdtemp(prefix="dkv-quality-"))
    if peers and PEERS_PYTHON.exists():
        presses = QUICK_METHODS if quick else KVPRESS_PRESSES
        runner = Peers(
            tasks, cache_root() / model_name, presses, sorted({*ratios, *EQUAL_RATIOS}), max(threads, 1), workdir
        )
        log(f"kvpress runner started (log: {runner.log_file})")
        bar.peers = runner
    elif peers:
        log(f"{PEERS_PYTHON} not found: no kvpress rows (make bench-peers builds it)")

    # 4. dkv's rows
    full["error"] = None
    results = [full]
    bar.reset(len(tasks) * len(methods) * len(ratios), "methods")
    for m in methods:
        for r in ratios:
            results.append(
                _evaluate_safe(model, tokenizer, tasks, Config(m, r), reference, first_logits, full_bytes, bar.step)
            )
    best = best_method(plain_rows(results, "dkv"))
    quants, variant_ratios = (("int4",), (0.5,)) if quick else (QUANTS, VARIANT_RATIOS)
    variants = [Config(best, r, quant=q) for q in quants for r in variant_ratios]
    if not quick:
        for m in dict.fromkeys(["snapkv", best]):
            variants += [Config(m, r, merge=True) for r in VARIANT_RATIOS]
        for m in dict.fromkeys(["snapkv", best]):
            variants += [Config(m, r, chunked=True) for r in VARIANT_RATIOS]
    stores = [Config(m, EQUAL_STORE_RATIO, quant="int4") for m in dict.fromkeys([best, *EQUAL_STORE_METHODS])]
    stores = stores[:1] if quick else [Config("full", 0.0), *stores]
    variants += [
        Config(c.method, c.ratio, quant=c.quant, selection=sel, attend=round(1 - r, 4))
        for r in EQUAL_RATIOS
        for c in stores
        for sel in EQUAL_SELECTIONS
    ]
    bar.reset(len(tasks) * len(variants), f"variants (best: {best})")
    memo: dict = {}  # the equal-token rows share their stores
    for cfg in variants:
        results.append(
            _evaluate_safe(
                model,
                tokenizer,
                tasks,
                cfg,
                reference,
                first_logits,
                full_bytes,
                bar.step,
                memo if cfg.selection != "dense" else None,
            )
        )
    if timing:
        for m, t in timing["methods"].items():
            for row in results:
                if (
                    row["impl"] == "dkv"
                    and row["method"] == m
                    and row["ratio"] == TIMING_RATIO
                    and row["quant"] == "none"
                    and not row["merge"]
                    and not row["chunked"]
                ):
                    row["prefill_overhead"] = t["overhead"]

    breakdown = None
    if any(r["quant"] == "int4" for r in results):
        breakdown = bytes_breakdown(model, long_ctx[0], best)

    peer_report = None
    if runner is not None:
        bar.reset(0, "waiting for kvpress")
        peer_report = runner.wait()
        if peer_report is not None:
            results += kvpress_rows(peer_report)
    bar.close()

    rows = [_public(r) for r in results]  # kvpress rows have no per-task detail here
    report = {
        "device": "cpu",
        "model": model_name,
        "n_tasks": len(tasks),
        "tasks_dropped": len(failed),
        "tasks_dropped_ids": failed,
        "tasks": [{"id": t["id"], "kind": t["kind"], "context_tokens": len(t["context_ids"])} for t in tasks],
        "best_method": best,
        "results": rows,
        "targets": targets(rows, timing, best, full["retrieval_accuracy"], ratios),
        "prefix_reuse": prefix_reuse(rows),
        "equal_tokens": equal_tokens(rows),
        "timing": timing,
        "int4_bytes_breakdown": breakdown,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_avg": _loadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "kvpress": None
        if peer_report is None
        else {
            k: peer_report.get(k)
            for k in ("kvpress_version", "transformers_version", "threads", "wall_s", "attn_implementation")
        },
        "quick": quick,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return report


def _public(row: dict) -> dict:
    """The row without per-task detail, plus ``per_task``: correct (retrieval) or extra NLL (fidelity)."""
    out = {k: v for k, v in row.items() if k != "tasks"}
    if "tasks" in row:
        out["per_task"] = {
            tid: (r["correct"] if r["kind"] == "retrieval" else round(r["extra_nll"], 4))
            for tid, r in row["tasks"].items()
            if "error" not in r
        }
    return out


def _evaluate_safe(model, tokenizer, tasks, cfg, reference, first_logits, full_bytes, step, memo=None) -> dict:
    """``evaluate``, or a row with ``error`` (the run goes on) when the config fails."""
    try:
        row = evaluate(model, tokenizer, tasks, cfg, reference, first_logits, full_bytes, step, memo)
        row["error"] = None
        return row
    except Exception as exc:
        log(f"{cfg.label} failed: {type(exc).__name__}: {exc}")
        return {
            **cfg.fields(),
            "retrieval_accuracy": None,
            "extra_nll": None,
            "top1_agreement": None,
            "bytes_vs_fp16_kv": None,
            "bytes_vs_full_entry": None,
            "prefill_overhead": None,
            "error": f"{type(exc).__name__}: {exc}",
        }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class _Bar:
    """tqdm on stderr (one bar per phase); shows the kvpress runner's progress beside it."""

    def __init__(self, enabled: bool):
        self.enabled, self._bar, self.peers = enabled, None, None

    def reset(self, total: int, desc: str) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total or None, desc=desc, file=sys.stderr, unit="task", dynamic_ncols=True)

    def step(self, label: str) -> None:
        if self._bar is None:
            return
        post = label if self.peers is None else f"{label} | kvpress {self.peers.progress()}"
        self._bar.set_postfix_str(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ------------------------------------------------------------------------------------- docs output


def _fmt(v, digits=3, pct=False):
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.{digits}f}"


def _variant(r):
    parts = [r["quant"]] if r["quant"] != "none" else []
    if r["merge"]:
        parts.append("merge")
    if r["chunked"]:
        parts.append(f"chunked {CHUNK_SIZE}")
    return ", ".join(parts) or "–"


def markdown(report: dict, image: str | None) -> str:
    lines = [MARK_START, "## Quality: compression methods on SmolLM2-135M", ""]
    m = report["machine"]
    kv = report.get("kvpress") or {}
    lines += [
        f"`dkv bench quality` on {report['date']}: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), "
        f"load average {m['load_avg']}, torch {m['torch']}, float32 weights on CPU; "
        f"{report['n_tasks']} tasks ({report['tasks_dropped']} dropped because the full cache failed them), "
        f"wall time {report['wall_s'] / 60:.1f} min."
        + (
            f" kvpress {kv.get('kvpress_version')} (transformers {kv.get('transformers_version')}) ran in "
            f"`.venv-peers` on the same token ids."
            if kv
            else " kvpress did not run (no `.venv-peers`)."
        ),
        "",
        "Tasks: " + ", ".join(f"{t['id']} ({t['context_tokens']} tok)" for t in report["tasks"]) + ".",
        "Retrieval = share of passkey/needle answers found; extra NLL = nats/token over the full cache on the "
        "teacher-forced continuation; top-1 = agreement with the full cache's argmax; bytes = stored bytes over "
        "the raw fp16 K/V (and over the fp16 `full` entry, which adds positions, scores and page summaries); "
        "overhead = compress time over a plain prefill, minus 1 (window methods, ratio "
        f"{TIMING_RATIO}).",
        "",
        "| impl | method | ratio | variant | retrieval | extra NLL | top-1 | bytes/fp16 KV | bytes/full entry "
        "| prefill overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        (r for r in report["results"] if r.get("selection", "dense") == "dense"),
        key=lambda r: (
            r["impl"] != "dkv",
            r["method"] != "full",
            r["method"],
            _variant(r) != "–",
            _variant(r),
            r["ratio"],
        ),
    )
    for r in rows:
        err = f" (error: {r['error'][:60]})" if r.get("error") else ""
        lines.append(
            f"| {r['impl']} | {r['method']}{err} | {r['ratio']} | {_variant(r)} "
            f"| {_fmt(r['retrieval_accuracy'], pct=True)} "
            f"| {_fmt(r['extra_nll'])} | {_fmt(r['top1_agreement'], pct=True)} | {_fmt(r['bytes_vs_fp16_kv'])} "
            f"| {_fmt(r['bytes_vs_full_entry'])} | {_fmt(r['prefill_overhead'], pct=True)} |"
        )
    if image:
        lines += ["", f"![retrieval accuracy and extra NLL against ratio]({image})"]
    lines += _equal_tokens_markdown(report)
    lines += ["", "Targets (issue 3):", ""]
    for name, t in report["targets"].items():
        status = "met" if t["met"] else ("not met" if t["met"] is False else "not evaluated")
        extra = ", ".join(f"{k} {v}" for k, v in t.items() if k in ("dkv_method", "kvpress_press", "method"))
        lines.append(
            f"- `{name}`: {_fmt(t['value'], 4)} vs {_fmt(t['threshold'], 4)} ({t['rule']}): **{status}**"
            + (f" ({extra})" if extra else "")
        )
    if report["prefix_reuse"]:
        lines += [
            "",
            "Prefix reuse: the chunked recipe (each 256-token chunk compressed on top of the compressed "
            "chunks before it) minus whole-context compression:",
            "",
        ]
        for p in report["prefix_reuse"]:
            lines.append(
                f"- {p['method']} @ {p['ratio']}: retrieval {_fmt(p['retrieval_delta'], 3)}, extra NLL "
                f"{_fmt(p['extra_nll_delta'], 3)}, top-1 {_fmt(p['top1_delta'], 3)}"
            )
    b = report.get("int4_bytes_breakdown")
    if b:
        fields = ", ".join(f"{k} {v:.1f}" for k, v in b["bytes_per_row"].items())
        payload = b["bytes_per_row"].get("keys", 0) + b["bytes_per_row"].get("values", 0)
        lines += [
            "",
            f"Where int4 bytes go ({b['method']} @ {b['ratio']}, {b['context_tokens']} tokens, page size "
            f"{b['page_size']}): bytes per stored row (one token of one KV head in one layer): {fields}; "
            f"total {b['total_per_row']:.1f} B against {b['fp16_kv_per_row']} B of fp16 K/V, so "
            f"{b['kept_fraction']:.3f} kept x {b['total_per_row']:.1f} / {b['fp16_kv_per_row']} = "
            f"{b['bytes_vs_fp16_kv']:.3f} of the fp16 cache. The 4-bit K/V alone is {payload:.0f} B a row "
            f"({b['kept_fraction'] * payload / b['fp16_kv_per_row']:.3f} of the fp16 cache at this ratio); "
            f"the rest is metadata.",
        ]
    if report.get("timing"):
        t = report["timing"]
        lines += [
            "",
            f"Prefill timing on {t['contexts']} tokens, best of {t['repeats']}, "
            f"{t['threads']} thread(s), "
            f"load average {t.get('load_avg')}: plain forward {t['plain_cpu_s']:.2f} s CPU ({t['plain_s']:.2f} s "
            "wall); "
            + "; ".join(
                f"{m} {v['compress_cpu_s']:.2f} s CPU, {100 * v['overhead']:+.1f}% "
                f"({v['compress_s']:.2f} s wall, "
                f"{100 * v['overhead_wall']:+.1f}%; wall split: capture {v['capture_s']:.2f} s + select "
                f"{v['select_s']:.2f} s)"
                for m, v in t["methods"].items()
            )
            + ". The target uses the CPU-time "
            "ratio: on this shared machine the wall time of one run varies by more than the overhead.",
        ]
    lines += [MARK_END]
    return "\n".join(lines)


def _equal_tokens_markdown(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r.get("selection", "dense") != "dense"]
    if not rows:
        return []
    lines = [
        "",
        "### Equal attended tokens",
        "",
        "kvpress at ratio r keeps (and attends) 1 - r of the context; dkv stores a recipe and its decoder "
        "selects as many tokens per step, everything counted (sinks, recent, the query's and generated "
        "tokens, every layer). Attended = what the decoder reports it attended per KV head and step over "
        "the context's length (kvpress: its kept fraction).",
        "",
        "| attended per step | impl | configuration | retrieval | extra NLL | top-1 | attended | bytes/fp16 KV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio in EQUAL_RATIOS:
        peers = sorted(
            (r for r in plain_rows(report["results"], "kvpress") if abs(r["ratio"] - ratio) < 1e-9),
            key=lambda r: (-(r["retrieval_accuracy"] or 0), r["extra_nll"] or 0),
        )
        ours = sorted(
            (r for r in rows if abs(r["attend"] - (1 - ratio)) < 1e-6),
            key=lambda r: (-(r["retrieval_accuracy"] or 0), r["extra_nll"] or 0),
        )
        for r in ours + peers:
            label = _equal_label(r) if r["impl"] == "dkv" else f"{r['method']} @ {ratio}"
            err = f" (error: {r['error'][:60]})" if r.get("error") else ""
            lines.append(
                f"| {1 - ratio:.2f} | {r['impl']} | {label}{err} | {_fmt(r['retrieval_accuracy'], pct=True)} "
                f"| {_fmt(r['extra_nll'])} | {_fmt(r['top1_agreement'], pct=True)} | {_fmt(r.get('attended'))} "
                f"| {_fmt(r['bytes_vs_fp16_kv'])} |"
            )
    return lines


def write_docs(report: dict, out: Path) -> None:
    image = None
    try:
        plot(report, out / "img" / "quality.png")
        image = "img/quality.png"
    except ImportError as exc:  # matplotlib missing: the table still goes in
        log(f"no plot ({exc})")
    section = markdown(report, image)
    doc = out / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in report["results"]:
        if (
            r["method"] == "full"
            or r["quant"] != "none"
            or r["merge"]
            or r["chunked"]
            or r.get("error")
            or r.get("selection", "dense") != "dense"
        ):
            continue
        series.setdefault((r["impl"], r["method"]), []).append(r)
    names = sorted({m for _, m in series})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    for ax, field, ylabel in (
        (axes[0], "retrieval_accuracy", "retrieval accuracy"),
        (axes[1], "extra_nll", "extra NLL (nats/token)"),
    ):
        for (impl, m), rows in sorted(series.items()):
            rows = sorted((r for r in rows if r[field] is not None), key=lambda r: r["ratio"])
            if not rows:
                continue
            shift = 0.0 if impl == "dkv" else 0.004  # so a kvpress line that equals dkv's stays visible
            ax.plot(
                [r["ratio"] + shift for r in rows],
                [r[field] for r in rows],
                "-o" if impl == "dkv" else "--s",
                color=colors[m],
                label=f"{m} ({impl})",
                markersize=4,
                alpha=0.9,
            )
        ax.set_xlabel("compression ratio (fraction of tokens removed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(
        f"{report['model']}: dkv (solid) vs kvpress (dashed, shifted right by 0.004), {report['n_tasks']} tasks"
    )
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """``dkv bench quality``: prints the report as JSON.

    Report: ``{"device", "model", "n_tasks", "tasks_dropped", "results": [{"impl", "method",
    "ratio", "quant", "merge", "chunked", "retrieval_accuracy", "extra_nll", "top1_agreement",
    "bytes_vs_fp16_kv", "bytes_vs_full_entry", "prefill_overhead", ...}], "targets": {name:
    {"value", "threshold", "met", "rule"}}, "prefix_reuse", "timing", "machine", ...}``.
    """
    report = run(quick=args.quick, peers=not args.no_peers, progress=True, threads=getattr(args, "threads", 1))
    if args.out:
        write_docs(report, Path(args.out))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(json.dumps(report, indent=1))
        for name, t in report["targets"].items():
            status = "met" if t["met"] else "NOT met" if t["met"] is False else "-"
            log(f"{name}: {t['value']} vs {t['threshold']}: {status}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 methods, 1 ratio, 3 tasks")
    parser.add_argument("--no-peers", action="store_true", help="skip kvpress even when .venv-peers exists")
    parser.add_argument(
        "--out",
        default="docs",
        help="write OUT/benchmarks.md's quality section and OUT/img/quality.png ('' to skip; default docs)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (dkv and the kvpress runner each)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="dkv quality benchmark")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
