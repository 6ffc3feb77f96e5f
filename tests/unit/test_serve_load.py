"""bench/serve_load.py against a fake system whose latencies are known sleeps."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dkv.bench.serve_load import WorkloadError, percentile, run_workload, validate

CONTEXT_TOKENS = 6
MISS_TTFT_S = 0.08  # the fake's prefill of a context it has not seen
HIT_TTFT_S = 0.01  # ... of one it has
TOKEN_S = 0.005  # every later token


def context(i: int) -> list[int]:
    return [1000 + i] * CONTEXT_TOKENS


def workload(n_contexts: int = 3, n_capacity: int | None = None, **overrides) -> dict:
    w = {
        "contexts": [context(i) for i in range(n_contexts)],
        "queries": [[[1, i], [2, i, i]] for i in range(n_contexts)],
        "max_new_tokens": 6,
        "concurrency": [1, 4],
        "requests_per_client": 2,
        "capacity": None
        if n_capacity is None
        else {"contexts": [context(100 + i) for i in range(n_capacity)], "query": [3]},
    }
    w.update(overrides)
    return w


class FakeSystem:
    """Streams ``max_new_tokens`` ids; slow first token for an unseen context, fast after.

    Requests overlap (each sleeps on its own), so N concurrent clients get N times the tokens/s:
    a perfectly batching server.
    """

    def __init__(self, extra_tokens: int = 0):
        self.calls: list[list[int]] = []
        self.seen: set[tuple[int, ...]] = set()
        self.extra_tokens = extra_tokens

    async def generate(self, prompt: list[int], max_new_tokens: int):
        self.calls.append(prompt)
        key = tuple(prompt[:CONTEXT_TOKENS])
        await asyncio.sleep(HIT_TTFT_S if key in self.seen else MISS_TTFT_S)
        self.seen.add(key)
        for i in range(max_new_tokens + self.extra_tokens):
            if i:
                await asyncio.sleep(TOKEN_S)
            yield 7


def run(system: FakeSystem, w: dict, log=None) -> dict:
    return asyncio.run(run_workload(system.generate, w, log=log or (lambda line: None)))


def test_percentile_interpolates_linearly_between_closest_ranks():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile(list(range(101)), 99) == 99
    assert percentile([0, 10], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_phases_run_in_order_with_the_prompts_the_docstring_names():
    w = workload(n_contexts=3, n_capacity=2)
    system = FakeSystem()
    lines = []
    result = run(system, w, log=lines.append)
    ctx, q = w["contexts"], w["queries"]
    miss = [ctx[i] + q[i][0] for i in range(3)]
    hit = [ctx[i] + q[i][1] for i in range(3)]
    assert system.calls[:3] == miss and system.calls[3:6] == hit
    pairs = miss + hit  # query-major
    concurrent = system.calls[6 : 6 + 2 + 8]
    assert concurrent[:2] == [pairs[0], pairs[1]]  # one client: pairs 0, 1
    # four clients start at pairs 0..3 at once, then each asks its next pair
    assert sorted(map(tuple, concurrent[2:6])) == sorted(map(tuple, pairs[0:4]))
    assert sorted(map(tuple, concurrent[6:])) == sorted(map(tuple, pairs[1:5]))
    capacity = [c + [3] for c in w["capacity"]["contexts"]]
    assert system.calls[16:] == capacity + capacity
    assert len(lines) == 3 + 3 + 2 + 2 * 2
    assert result["capacity"]["contexts"] == 2


def test_counts_and_maths_follow_the_known_sleeps():
    result = run(FakeSystem(), workload(n_contexts=3, n_capacity=2))
    new = 6
    # sleeps never end early; the upper bounds leave room for a busy machine
    assert MISS_TTFT_S * 1000 <= result["ttft_miss_ms"]["p50"] < MISS_TTFT_S * 1000 + 60
    assert HIT_TTFT_S * 1000 <= result["ttft_hit_ms"]["p50"] < HIT_TTFT_S * 1000 + 60
    for summary in (result["ttft_miss_ms"], result["ttft_hit_ms"]):
        assert set(summary) == {"p50", "p99", "mean"} and summary["p50"] <= summary["p99"]
    assert 0.3 / TOKEN_S < result["single_stream_tokens_per_s"] <= 1 / TOKEN_S
    one, four = result["concurrency"]["1"], result["concurrency"]["4"]
    for clients, phase in ((1, one), (4, four)):
        assert phase["requests"] == clients * 2 and phase["tokens"] == clients * 2 * new
        assert phase["aggregate_tokens_per_s"] == pytest.approx(phase["tokens"] / phase["wall_s"])
        assert TOKEN_S * 1000 <= phase["itl_ms"]["p50"] <= phase["itl_ms"]["p99"]
        # every context was seen in phases 1-2: each first token is a hit
        assert HIT_TTFT_S * 1000 <= phase["ttft_ms"]["p50"] < MISS_TTFT_S * 1000
    # the fake overlaps requests perfectly: four clients get close to four times the tokens/s
    assert four["aggregate_tokens_per_s"] > 2.5 * one["aggregate_tokens_per_s"]
    # the first capacity pass misses every context, the second hits
    assert result["capacity"]["pass1_mean_ttft_ms"] >= MISS_TTFT_S * 1000
    assert HIT_TTFT_S * 1000 <= result["capacity"]["pass2_mean_ttft_ms"] < MISS_TTFT_S * 1000


def test_without_capacity_the_result_says_none():
    system = FakeSystem()
    result = run(system, workload(n_contexts=2, concurrency=[2]))
    assert result["capacity"] is None and list(result["concurrency"]) == ["2"]
    assert len(system.calls) == 2 + 2 + 2 * 2


@pytest.mark.parametrize("extra", [-1, 1])
def test_a_wrong_number_of_tokens_raises(extra):
    with pytest.raises(WorkloadError, match="yielded"):
        run(FakeSystem(extra_tokens=extra), workload(n_contexts=1, concurrency=[1]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"contexts": []}, "contexts"),
        ({"queries": [[[1], [2]]]}, "one entry per context"),
        ({"queries": [[[1]], [[1]], [[1]]]}, "two queries"),
        ({"contexts": [[1], ["a"], [2]]}, r"contexts\[1\]"),
        ({"max_new_tokens": 1}, "max_new_tokens"),
        ({"concurrency": [0]}, "concurrency"),
        ({"requests_per_client": 0}, "requests_per_client"),
        ({"capacity": {"contexts": [[1]], "query": []}}, "capacity.query"),
    ],
)
def test_malformed_workloads_name_the_field(change, message):
    with pytest.raises(WorkloadError, match=message):
        validate(workload(**change))
    with pytest.raises(WorkloadError, match="lacks"):
        validate({"contexts": [[1]]})


def test_imports_only_the_standard_library():
    """The vLLM venv imports this file too, and holds nothing of dkv's dependencies."""
    source = Path(__file__).parents[2] / "bench" / "serve_load.py"
    tree = ast.parse(source.read_text())
    modules = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules and modules <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)


RUNNER = Path(__file__).parents[2] / "bench" / "vllm_runner.py"


@pytest.mark.parametrize(
    "change, args, message",
    [
        ({"max_new_tokens": 0}, [], "max_new_tokens"),
        ({}, ["--kv-cache-gib", "0"], "kv-cache-gib"),
        ({}, ["--threads", "4096"], "--threads 4096"),
    ],
)
def test_the_vllm_runner_refuses_bad_input_before_starting_vllm(tmp_path, change, args, message):
    """Checked with dkv's interpreter, which has no vllm: the runner must stop before importing it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    workload_file = tmp_path / "workload.json"
    workload_file.write_text(json.dumps(workload(**change)))
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--model-dir",
            str(model_dir),
            "--workload",
            str(workload_file),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # 2: argparse's error, not a failed import of vllm (1)
    assert done.returncode == 2 and message in done.stderr and not out.exists()


def test_the_vllm_runner_wants_a_model_folder(tmp_path):
    workload_file = tmp_path / "workload.json"
    workload_file.write_text(json.dumps(workload()))
    done = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--model-dir",
            str(tmp_path),
            "--workload",
            str(workload_file),
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "holds no config.json" in done.stderr
