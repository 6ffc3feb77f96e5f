"""``dkv bench serve`` runs end to end on a small load: every phase measured for each system, the
ratios to the targets worked out (a smoke test of the benchmark, not of speed)."""

from __future__ import annotations

import pytest

from dkv.bench import serve

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]


def test_a_small_serve_benchmark_measures_every_phase_of_each_system(tmp_path):
    result = serve.run(
        context_tokens=128,
        new_tokens=4,
        systems=("transformers", "dkv-full"),
        clients=(1, 2),
        capacity_contexts=3,
        capacity_kv_gib=0.01,
        log=lambda msg: None,
    )
    for name in ("transformers", "dkv-full"):
        system = result["systems"][name]
        assert system["ttft_hit_ms"]["p50"] < system["ttft_miss_ms"]["p50"], name
        assert system["single_stream_tokens_per_s"] > 0
        assert set(system["concurrency"]) == {"1", "2"}
        assert system["concurrency"]["2"]["tokens"] == 2 * 2 * 4  # 2 clients x 2 requests x 4 tokens
    assert result["systems"]["transformers"]["batched_generate"]["aggregate_tokens_per_s"] > 0
    assert result["targets"]["dkv-full"]["single_vs_transformers"]["measured"] > 0
    assert result["targets"]["dkv-full"]["aggregate8_vs_vllm"]["measured"] is None  # no vLLM here, no 8 clients
    assert result["targets"]["dkv-default"]["capacity_ttft_vs_vllm"]["measured"] is None  # no vLLM: no ratio
    capacity = result["capacity"]["dkv-default"]["capacity"]
    assert capacity["contexts"] == 3 and capacity["second_pass_hits"] == 3  # the tiers held all three
    assert capacity["pass2_mean_ttft_ms"] < capacity["pass1_mean_ttft_ms"]
    assert "worker" not in capacity["second_pass_entries_read_from"]
    serve.plot(result, str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000
