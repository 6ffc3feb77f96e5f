"""Score NVIDIA kvpress presses on dkv's quality-benchmark tasks, in kvpress's own venv.

Usage (``make bench-peers`` builds ``.venv-peers`` first)::

    .venv-peers/bin/python bench/kvpress_runner.py \\
        --model-dir ~/.cache/dkv/models/smollm2-135m --tasks tasks.json --out results.json \\
        [--presses snapkv,pyramidkv,expected_attention,tova,knorm,lagkv,streaming_llm] \\
        [--ratios 0.5,0.75,0.9] [--threads 1] [--device cpu]

kvpress pins ``transformers<5.3`` while dkv's own venv runs a newer transformers, so this file
runs in a separate venv and imports only torch, transformers, kvpress and the standard library
(never dkv's packages). The dkv side writes the task file and reads the result file; nothing
else passes between them. Progress goes to stderr, stdout stays empty, the exit status is 0
unless the inputs are unusable (a press that fails is reported with an ``"error"``, not raised).

Task file (token ids are final: this runner never tokenizes)::

    {"tasks": [
      {"id": "passkey-0.2-1k", "kind": "retrieval", "context_ids": [...], "query_ids": [...],
       "answer": "71432", "max_new_tokens": 12},
      {"id": "fidelity-3", "kind": "fidelity", "context_ids": [...], "continuation_ids": [...]}
    ]}

Protocol (the dkv side must do the same):

1. Prefill ``context_ids`` into an empty ``DynamicCache`` in one forward, under the press
   (``with press(model): model(input_ids=context, past_key_values=cache, logits_to_keep=1)``,
   kvpress's documented way to compress a context without its pipeline). The press's hooks
   compress each layer's cache after that layer's attention ran, so the context's last-position
   logits come from the full context, identical with and without compression; they are kept.
2. Every later token is fed after the (possibly compressed) cache with explicit
   ``position_ids`` continuing at ``len(context_ids)``, as kvpress's pipeline does.
3. retrieval: one forward over ``query_ids``, then greedy decoding of up to
   ``max_new_tokens`` new tokens (the first from the query's last logits), stopping after an
   end token (tokenizer eos, ``<|im_end|>``, generation_config eos). The new tokens are decoded
   with ``skip_special_tokens=True``; ``correct`` = ``answer`` is a substring of that text.
4. fidelity: token ``continuation_ids[0]`` is predicted by the context's last logits (step 1),
   token ``i > 0`` by the logits after ``continuation_ids[:i]``, computed in one teacher-forced
   forward over ``continuation_ids[:-1]``. Per-token NLL = ``-log_softmax(logits)[token]`` in
   float32 nats. ``top1_agreement`` = fraction of positions whose argmax equals the argmax of
   the uncompressed (``full``) run at that position; ``extra_nll`` = mean NLL minus the full
   run's mean NLL (nats/token).

Result file::

    {"device": "cpu", "threads": 1, "dtype": "float32", "attn_implementation": {...},
     "kvpress_version": "0.5.5", "transformers_version": "5.2.0", "torch_version": "2.13.0+cpu",
     "model_dir": "...", "n_tasks": 2, "wall_s": 12.3,
     "results": [
       {"press": "full", "ratio": 0.0, "retrieval_accuracy": 1.0, "extra_nll": 0.0,
        "top1_agreement": 1.0, "mean_nll": 2.1, "kv_kept": 1.0, "prefill_s": 0.5,
        "wall_s": 2.0, "error": null,
        "tasks": {"passkey-0.2-1k": {"kind": "retrieval", "correct": true, "text": "71432",
                                     "new_ids": [...], "kv_kept": 1.0, "prefill_s": ...,
                                     "decode_s": ...},
                  "fidelity-3": {"kind": "fidelity", "mean_nll": ..., "extra_nll": ...,
                                 "top1_agreement": ..., "nll": [...], "argmax": [...],
                                 "kv_kept": ..., "prefill_s": ..., "score_s": ...}}},
       {"press": "snapkv", "ratio": 0.5, ...}, ...]}

Aggregates are means over the tasks of that kind that ran (``null`` when there are none).
``kv_kept`` is the fraction of the context's KV entries left in the cache after the prefill,
over all layers (PyramidKV keeps different amounts per layer). ``prefill_s`` is the mean
per-task seconds of the compressed prefill (compression included). A press × ratio that fails
gets ``"error"`` (the first failure) and failed tasks get an ``"error"`` entry of their own;
``KVPRESS_RUNNER_DEBUG=1`` prints their tracebacks to stderr.

Compatibility shims (both in memory only): ``load_config`` maps transformers-5 ``rope_parameters``
to ``rope_theta`` should this venv ever hold a transformers 4.x (5.0-5.2 read it natively), and
``patch_varlen_masks`` lets PyramidKV's per-layer cache sizes run under SDPA (see there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

# Local files only: never reach a model hub (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvpress
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

DEFAULT_PRESSES = "snapkv,pyramidkv,expected_attention,tova,knorm,lagkv,streaming_llm"
DEFAULT_RATIOS = "0.5,0.75,0.9"

# name -> (kvpress class name, attention implementation it needs). All of these score from the
# keys, values, hidden states or a window of recomputed queries, so they run under SDPA (kvpress's
# README: only presses that read the observed attention weights, e.g. ObservedAttentionPress,
# need "eager", which materialises the attention matrix).
PRESSES: dict[str, tuple[str, str]] = {
    "snapkv": ("SnapKVPress", "sdpa"),
    "pyramidkv": ("PyramidKVPress", "sdpa"),
    "expected_attention": ("ExpectedAttentionPress", "sdpa"),
    "tova": ("TOVAPress", "sdpa"),
    "knorm": ("KnormPress", "sdpa"),
    "lagkv": ("LagKVPress", "sdpa"),
    "streaming_llm": ("StreamingLLMPress", "sdpa"),
    "random": ("RandomPress", "sdpa"),
    "keydiff": ("KeyDiffPress", "sdpa"),
    "observed_attention": ("ObservedAttentionPress", "eager"),
}
END_OF_TURN = "<|im_end|>"


def _fit_mask(mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Crop or left-extend a (batch, 1, q, kv) causal mask to ``kv_len`` keys.

    Valid for unpadded input (batch 1 here): the q new tokens are the last q keys, every cached
    key before them is visible, so the mask's leading columns are all "visible".
    """
    have = mask.shape[-1]
    if have > kv_len:
        return mask[..., have - kv_len :]
    visible = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], kv_len - have), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def patch_varlen_masks() -> None:
    """Let layers whose caches hold different numbers of entries share one attention mask.

    PyramidKVPress keeps a different number of KV pairs per layer. transformers builds one mask
    per forward, sized from layer 0's cache, so any multi-token forward after such a cache (the
    query, the teacher-forced continuation) fails under SDPA/eager with "The size of tensor a
    (492) must match the size of tensor b (507)" (transformers issue #35168: only
    flash-attention, which takes no mask, handles it; kvpress's own pipeline hits the same wall
    on CPU). This wraps the SDPA attention function (as kvpress itself wraps them) to crop or
    extend the mask to each layer's own key length. It changes nothing when the lengths already
    match, i.e. for every press that keeps the same count in all layers. (Eager attention is the
    model's own function, not in that registry: a per-layer-budget press under eager still fails
    and is reported as an error.)
    """
    for name in ("sdpa",):
        inner = ALL_ATTENTION_FUNCTIONS[name]
        if getattr(inner, "_dkv_varlen", False):
            continue

        def wrapper(module, query, key, value, attention_mask, *args, _inner=inner, **kwargs):
            if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
                attention_mask = _fit_mask(attention_mask, key.shape[-2])
            return _inner(module, query, key, value, attention_mask, *args, **kwargs)

        wrapper._dkv_varlen = True
        ALL_ATTENTION_FUNCTIONS[name] = wrapper


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """tqdm on stderr when installed, else a plain counter."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="task", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            log(f"[{self.done}/{self.total}] {label}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# model


def load_config(model_dir: Path):
    """The model's config, readable by this (older) transformers.

    The cached directory is written by dkv's transformers 5.x, which stores RoPE settings as
    ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...}``). transformers 5.0-5.2 (what
    kvpress 0.5.x allows) read that natively; transformers 4.x reads ``rope_theta`` /
    ``rope_scaling`` instead and would silently fall back to theta 10000, so map it here, in
    memory only (the cache directory is never modified).
    """
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.get("rope_parameters")
    if (
        isinstance(rope, dict)
        and "rope_theta" not in raw
        and not isinstance(getattr(config, "rope_parameters", None), dict)
    ):
        config.rope_theta = float(rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


class Models:
    """One loaded copy of the model per attention implementation that a press needs."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype):
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.config = load_config(model_dir)
        self._models: dict[str, object] = {}

    def get(self, attn_implementation: str):
        if attn_implementation not in self._models:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir,
                config=self.config,
                local_files_only=True,
                dtype=self.dtype,
                attn_implementation=attn_implementation,
            )
            model.to(self.device).eval().requires_grad_(False)
            with torch.inference_mode():  # warm-up, so the first timed prefill is not penalised
                model(input_ids=torch.ones((1, 32), dtype=torch.long, device=self.device), use_cache=False)
            self._models[attn_implementation] = model
        return self._models[attn_implementation]


def stop_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return ids


def make_press(name: str, ratio: float):
    cls_name, _ = PRESSES[name]
    cls = getattr(kvpress, cls_name)
    return cls(compression_ratio=ratio)


# ---------------------------------------------------------------------------------------------
# protocol


def prefill(model, context_ids: list[int], press, device: str):
    """Prefill the context (compressed by ``press`` when given): (cache, last logits, seconds)."""
    ids = torch.tensor([context_ids], dtype=torch.long, device=device)
    cache = DynamicCache()
    t0 = time.perf_counter()
    with press(model) if press is not None else nullcontext():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t0
    kept = sum(layer.keys.shape[-2] for layer in cache.layers) / (len(cache.layers) * len(context_ids))
    return cache, out.logits[0, -1].float(), seconds, kept


def forward_after(model, cache, ids: list[int], start: int, device: str, logits_to_keep: int = 0):
    """Feed ``ids`` after the cache at positions ``start, start+1, ...``; logits (len, vocab)."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    position_ids = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    out = model(
        input_ids=input_ids,
        past_key_values=cache,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    return out.logits[0].float()


def run_retrieval(model, tokenizer, task: dict, press, device: str, stops: set[int]) -> dict:
    context, query = task["context_ids"], task["query_ids"]
    if not query:
        raise ValueError("retrieval task has empty query_ids")
    cache, _, prefill_s, kept = prefill(model, context, press, device)
    t0 = time.perf_counter()
    pos = len(context)
    logits = forward_after(model, cache, query, pos, device, logits_to_keep=1)[-1]
    pos += len(query)
    new_ids: list[int] = []
    for _ in range(int(task.get("max_new_tokens", 16))):
        token = int(logits.argmax())
        new_ids.append(token)
        if token in stops:
            break
        logits = forward_after(model, cache, [token], pos, device)[-1]
        pos += 1
    decode_s = time.perf_counter() - t0
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    answer = str(task["answer"])
    return {
        "kind": "retrieval",
        "correct": answer in text,
        "text": text,
        "new_ids": new_ids,
        "kv_kept": kept,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
    }


def run_fidelity(model, task: dict, press, device: str, reference: dict | None) -> dict:
    context, cont = task["context_ids"], task["continuation_ids"]
    if not cont:
        raise ValueError("fidelity task has empty continuation_ids")
    cache, last_logits, prefill_s, kept = prefill(model, context, press, device)
    t0 = time.perf_counter()
    rows = [last_logits.unsqueeze(0)]
    if len(cont) > 1:
        rows.append(forward_after(model, cache, cont[:-1], len(context), device))
    logits = torch.cat(rows, dim=0)  # row i predicts cont[i]
    targets = torch.tensor(cont, dtype=torch.long, device=logits.device)
    nll = -torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    argmax = logits.argmax(dim=-1).tolist()
    score_s = time.perf_counter() - t0
    nll_list = [float(x) for x in nll.tolist()]
    mean_nll = sum(nll_list) / len(nll_list)
    if reference is None:  # this is the full-cache run itself
        ref_argmax, ref_mean = argmax, mean_nll
    else:
        ref_argmax, ref_mean = reference["argmax"], reference["mean_nll"]
    agree = sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax)
    return {
        "kind": "fidelity",
        "mean_nll": mean_nll,
        "extra_nll": mean_nll - ref_mean,
        "top1_agreement": agree,
        "nll": nll_list,
        "argmax": argmax,
        "kv_kept": kept,
        "prefill_s": prefill_s,
        "score_s": score_s,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(name: str, ratio: float, tasks: dict, wall_s: float, error: str | None) -> dict:
    ok = [t for t in tasks.values() if "error" not in t]
    retrieval = [t for t in ok if t["kind"] == "retrieval"]
    fidelity = [t for t in ok if t["kind"] == "fidelity"]
    return {
        "press": name,
        "ratio": ratio,
        "retrieval_accuracy": _mean([1.0 if t["correct"] else 0.0 for t in retrieval]),
        "extra_nll": _mean([t["extra_nll"] for t in fidelity]),
        "top1_agreement": _mean([t["top1_agreement"] for t in fidelity]),
        "mean_nll": _mean([t["mean_nll"] for t in fidelity]),
        "kv_kept": _mean([t["kv_kept"] for t in ok]),
        "prefill_s": _mean([t["prefill_s"] for t in ok]),
        "wall_s": wall_s,
        "error": error,
        "tasks": tasks,
    }


def run_config(name, ratio, models, tokenizer, tasks, device, reference, progress) -> dict:
    """One press at one ratio (``name == "full"``: no press) over all tasks."""
    t_start = time.perf_counter()
    label = name if name == "full" else f"{name}@{ratio}"
    error = None
    try:
        press = None if name == "full" else make_press(name, ratio)
        model = models.get("sdpa" if name == "full" else PRESSES[name][1])
        stops = stop_ids(tokenizer, model)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        for _ in tasks:
            progress.step(label)
        return aggregate(name, ratio, {}, time.perf_counter() - t_start, error)
    results: dict[str, dict] = {}
    for task in tasks:
        tid = str(task["id"])
        try:
            torch.manual_seed(0)
            with torch.inference_mode():
                if task["kind"] == "retrieval":
                    results[tid] = run_retrieval(model, tokenizer, task, press, device, stops)
                elif task["kind"] == "fidelity":
                    ref = None if reference is None else reference.get(tid)
                    if reference is not None and (ref is None or "error" in ref):
                        raise RuntimeError("the full-cache run of this task failed")
                    results[tid] = run_fidelity(model, task, press, device, ref)
                else:
                    raise ValueError(f"unknown task kind {task['kind']!r}")
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            if os.environ.get("KVPRESS_RUNNER_DEBUG"):
                traceback.print_exc()
            results[tid] = {"kind": task.get("kind"), "error": msg}
            error = error or msg
        progress.step(label)
    return aggregate(name, ratio, results, time.perf_counter() - t_start, error)


def validate(tasks: list[dict]) -> None:
    seen = set()
    for task in tasks:
        for key in ("id", "kind", "context_ids"):
            if key not in task:
                raise SystemExit(f"task {task.get('id')!r} lacks {key!r}")
        if str(task["id"]) in seen:
            raise SystemExit(f"duplicate task id {task['id']!r}")
        seen.add(str(task["id"]))
        if not task["context_ids"]:
            raise SystemExit(f"task {task['id']!r} has an empty context")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--tasks", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--presses", default=DEFAULT_PRESSES, help=f"comma-separated, from: {','.join(PRESSES)}")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, help="comma-separated compression ratios in [0, 1)")
    parser.add_argument("--device", default="cpu")
    # One thread by default. Measured on the 2-core dev box (SmolLM2-135M, 552-token passkey +
    # 232-token fidelity task): with the second core free, 2 threads halve the time (snapkv@0.5:
    # 1.2 s vs 2.5 s mean prefill), but with anything else running (load average ~3.5: other
    # benchmarks, test runs) 2 threads collapse (full baseline 9.0 s vs 2.3 s mean prefill,
    # whole run 65 s vs 34 s) because OpenMP threads spin-wait for a core. 1 thread is slower
    # at best and far steadier at worst; results are bit-identical either way. --threads 0
    # keeps torch's default; raise it on a quiet or larger machine.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        raise SystemExit(f"unknown press(es) {unknown}; known: {sorted(PRESSES)}")
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    if any(not 0.0 < r < 1.0 for r in ratios):
        raise SystemExit("ratios must lie in (0, 1)")
    tasks = json.loads(args.tasks.read_text())["tasks"]
    validate(tasks)
    model_dir = args.model_dir.expanduser()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a Hugging Face model directory (no config.json)")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    patch_varlen_masks()

    t_start = time.perf_counter()
    dtype = torch.float32
    models = Models(model_dir, args.device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    progress = Progress(len(tasks) * (1 + len(presses) * len(ratios)))
    full = run_config("full", 0.0, models, tokenizer, tasks, args.device, None, progress)
    results = [full]
    for name in presses:
        for ratio in ratios:
            results.append(run_config(name, ratio, models, tokenizer, tasks, args.device, full["tasks"], progress))
    progress.close()

    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": {"full": "sdpa", **{p: PRESSES[p][1] for p in presses}},
        "kvpress_version": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model_dir": str(model_dir),
        "n_tasks": len(tasks),
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True))
    tmp.replace(args.out)
    for r in results:
        if r["error"]:
            log(f"{r['press']}@{r['ratio']}: {r['error']}")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
