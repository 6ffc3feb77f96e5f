"""The load driver of ``dkv bench serve``: the same phases, prompts and maths for every system.

Standard library only: bench/serve.py imports it in dkv's venv and bench/vllm_runner.py in the
vLLM venv (which puts bench/ on ``sys.path`` and imports ``serve_load``), so a number differs
between systems because the systems differ, never because two drivers measured differently.

A system is one async function, ``generate(prompt_ids, max_new_tokens)``, that yields the
generated token ids as they come, exactly ``max_new_tokens`` of them (end-of-sequence is ignored
in this benchmark; any other count raises ``WorkloadError``). A prompt is context + query.

Workload (JSON)::

    {"contexts": [[ids], ...], "queries": [[[ids], [ids]], ...],  # two queries per context
     "max_new_tokens": 64, "concurrency": [1, 4, 8, 16], "requests_per_client": 2,
     "capacity": null | {"contexts": [[ids], ...], "query": [ids]}}

Phases, in this order:

1. miss: each context with its first query, one at a time (the system has not seen it): TTFT.
2. hit: each context with its second query, one at a time: TTFT, and the single-stream decode
   speed per request, (tokens - 1) / (time of last token - time of first token).
3. for each ``c`` in ``concurrency``: ``c`` clients at once, each running
   ``requests_per_client`` requests one after another. The (context, query) pairs seen in phases
   1-2 are ordered query-major (every context with its first query, then with its second) and
   client ``k`` takes pairs ``k, k+1, ...`` (wrapping), so clients that run at the same time ask
   about different contexts. Aggregate tokens/s = all tokens of the phase / its wall time;
   inter-token latency is every gap between consecutive tokens of one request.
4. capacity (when given): every capacity context with the capacity query, one at a time, then
   all of them again in the same order; the mean TTFT of each pass (the second pass is what a
   tiered store is for: a working set larger than the fast tier, asked again).

Times are ``time.perf_counter()`` in the driver's process, so TTFT includes everything between
the call and the first token (queueing, transport, prefill). Percentiles interpolate linearly
between the closest ranks (numpy's default), see ``percentile``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

Generate = Callable[[list[int], int], AsyncIterator[int]]
Log = Callable[[str], None]


class WorkloadError(ValueError):
    """The workload file is malformed, or a system answered with the wrong number of tokens."""


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must be within [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms_summary(seconds: list[float], with_mean: bool = False) -> dict:
    ms = [s * 1000 for s in seconds]
    summary = {"p50": percentile(ms, 50), "p99": percentile(ms, 99)}
    if with_mean:
        summary["mean"] = statistics.fmean(ms)
    return summary


@dataclass
class Timing:
    """When one request was sent and when each of its tokens arrived (perf_counter seconds)."""

    start: float
    token_times: list[float]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


async def timed_request(generate: Generate, prompt: list[int], max_new_tokens: int) -> Timing:
    start = time.perf_counter()
    token_times = []
    async for _ in generate(prompt, max_new_tokens):
        token_times.append(time.perf_counter())
    if len(token_times) != max_new_tokens:
        raise WorkloadError(
            f"a request for {max_new_tokens} new tokens yielded {len(token_times)} "
            f"(prompt of {len(prompt)} tokens): systems must ignore end-of-sequence here"
        )
    return Timing(start, token_times)


def _check_ids(ids, what: str) -> None:
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise WorkloadError(f"{what} must be a non-empty list of token ids (ints >= 0)")


def validate(workload: dict) -> None:
    """Raise ``WorkloadError`` naming the first field that is missing or malformed."""
    missing = {"contexts", "queries", "max_new_tokens", "concurrency", "requests_per_client"} - workload.keys()
    if missing:
        raise WorkloadError(f"the workload lacks {sorted(missing)}")
    contexts, queries = workload["contexts"], workload["queries"]
    if not isinstance(contexts, list) or not (contexts or workload.get("capacity")):
        raise WorkloadError(
            "workload 'contexts' must be a non-empty list of token-id lists (it may be empty "
            "only beside a capacity scenario, which then runs alone)"
        )
    if not isinstance(queries, list) or len(queries) != len(contexts):
        raise WorkloadError(f"workload 'queries' must hold one entry per context ({len(contexts)})")
    for i, (context, pair) in enumerate(zip(contexts, queries)):
        _check_ids(context, f"contexts[{i}]")
        if not isinstance(pair, list) or len(pair) != 2:
            raise WorkloadError(f"queries[{i}] must hold two queries (miss, then hit)")
        _check_ids(pair[0], f"queries[{i}][0]")
        _check_ids(pair[1], f"queries[{i}][1]")
    if not isinstance(workload["max_new_tokens"], int) or workload["max_new_tokens"] < 2:
        raise WorkloadError("workload 'max_new_tokens' must be an int >= 2 (decode speed needs two tokens)")
    concurrency = workload["concurrency"]
    if not isinstance(concurrency, list) or not all(isinstance(c, int) and c >= 1 for c in concurrency):
        raise WorkloadError("workload 'concurrency' must be a list of client counts (ints >= 1)")
    if not isinstance(workload["requests_per_client"], int) or workload["requests_per_client"] < 1:
        raise WorkloadError("workload 'requests_per_client' must be an int >= 1")
    capacity = workload.get("capacity")
    if capacity is not None:
        if not isinstance(capacity, dict) or not isinstance(capacity.get("contexts"), list) or not capacity["contexts"]:
            raise WorkloadError("workload 'capacity' must be null or {'contexts': [[ids], ...], 'query': [ids]}")
        for i, context in enumerate(capacity["contexts"]):
            _check_ids(context, f"capacity.contexts[{i}]")
        _check_ids(capacity.get("query"), "capacity.query")


async def _one_at_a_time(
    generate: Generate, prompts: list[list[int]], max_new_tokens: int, log: Log, phase: str
) -> list[Timing]:
    timings = []
    for i, prompt in enumerate(prompts):
        timing = await timed_request(generate, prompt, max_new_tokens)
        timings.append(timing)
        log(f"{phase} {i + 1}/{len(prompts)}: {len(prompt)} prompt tokens, ttft {timing.ttft * 1000:.0f} ms")
    return timings


async def _concurrent(
    generate: Generate, pairs: list[list[int]], clients: int, requests_per_client: int, max_new_tokens: int
) -> dict:
    async def client(k: int) -> list[Timing]:
        return [
            await timed_request(generate, pairs[(k + r) % len(pairs)], max_new_tokens)
            for r in range(requests_per_client)
        ]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    timings = [t for ts in per_client for t in ts]
    tokens = sum(len(t.token_times) for t in timings)
    return {
        "aggregate_tokens_per_s": tokens / wall,
        "itl_ms": _ms_summary([gap for t in timings for gap in t.gaps]),
        "ttft_ms": _ms_summary([t.ttft for t in timings]),
        "requests": len(timings),
        "tokens": tokens,
        "wall_s": wall,
    }


async def run_workload(generate: Generate, workload: dict, log: Log = print) -> dict:
    """Run the four phases of the module docstring against ``generate``; the result dict."""
    validate(workload)
    contexts, queries, new = workload["contexts"], workload["queries"], workload["max_new_tokens"]
    result = {"concurrency": {}, "capacity": None}
    if contexts:
        miss = await _one_at_a_time(generate, [c + q[0] for c, q in zip(contexts, queries)], new, log, "miss")
        hit = await _one_at_a_time(generate, [c + q[1] for c, q in zip(contexts, queries)], new, log, "hit")
        result.update(
            {
                "ttft_miss_ms": _ms_summary([t.ttft for t in miss], with_mean=True),
                "ttft_hit_ms": _ms_summary([t.ttft for t in hit], with_mean=True),
                "single_stream_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in hit),
            }
        )
    pairs = [c + q[j] for j in range(2) for c, q in zip(contexts, queries)]
    for clients in workload["concurrency"] if contexts else []:
        phase = await _concurrent(generate, pairs, clients, workload["requests_per_client"], new)
        result["concurrency"][str(clients)] = phase
        log(
            f"{clients} clients: {phase['aggregate_tokens_per_s']:.1f} tokens/s, itl p50 "
            f"{phase['itl_ms']['p50']:.0f} ms p99 {phase['itl_ms']['p99']:.0f} ms, "
            f"ttft p50 {phase['ttft_ms']['p50']:.0f} ms"
        )
    capacity = workload.get("capacity")
    if capacity is not None:
        prompts = [c + capacity["query"] for c in capacity["contexts"]]
        passes = [await _one_at_a_time(generate, prompts, new, log, f"capacity pass {n}") for n in (1, 2)]
        result["capacity"] = {
            "pass1_mean_ttft_ms": statistics.fmean(t.ttft * 1000 for t in passes[0]),
            "pass2_mean_ttft_ms": statistics.fmean(t.ttft * 1000 for t in passes[1]),
            "contexts": len(prompts),
        }
    return result
