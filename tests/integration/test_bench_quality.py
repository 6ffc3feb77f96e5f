"""``dkv bench quality`` on the real SmolLM2: the quick run's report, the docs it writes, the tasks."""

from __future__ import annotations

import math
import time

import pytest

from dkv.bench import quality
from dkv.bench.quality_tasks import PASSKEY_PLAN, build_tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROW_KEYS = {
    "impl",
    "method",
    "ratio",
    "quant",
    "merge",
    "chunked",
    "retrieval_accuracy",
    "extra_nll",
    "top1_agreement",
    "bytes_vs_fp16_kv",
    "bytes_vs_full_entry",
    "prefill_overhead",
}


@pytest.fixture(scope="module")
def report():
    started = time.perf_counter()
    out = quality.run(quick=True, peers=False, progress=False)
    out["_test_wall_s"] = time.perf_counter() - started
    return out


def test_quick_run_reports_the_schema_with_values_in_range(report):
    assert report["_test_wall_s"] < 180
    assert report["device"] == "cpu" and report["model"] == "smollm2-135m"
    assert report["n_tasks"] == 3 and report["tasks_dropped"] == 0
    rows = report["results"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert {r["impl"] for r in rows} == {"dkv"}  # peers=False
    full = next(r for r in rows if r["method"] == "full")
    assert full["retrieval_accuracy"] == 1.0 and full["extra_nll"] == 0.0 and full["top1_agreement"] == 1.0
    assert full["bytes_vs_full_entry"] == 1.0 and 1.0 < full["bytes_vs_fp16_kv"] < 1.2  # + positions, scores, pages
    plain = [r for r in rows if r["method"] in quality.QUICK_METHODS and r["quant"] == "none"]
    assert {r["method"] for r in plain} == set(quality.QUICK_METHODS) and {r["ratio"] for r in plain} == {0.5}
    dense_rows = [r for r in rows if r["selection"] == "dense"]
    for r in rows:
        assert r["error"] is None, r
        assert 0.0 <= r["retrieval_accuracy"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert math.isfinite(r["extra_nll"]) and r["extra_nll"] > -0.5  # compression rarely helps, never by much
    for r in plain:  # half the tokens, fp16: about half the bytes (metadata included)
        assert 0.45 < r["bytes_vs_fp16_kv"] < 0.6 and 0.45 < r["bytes_vs_full_entry"] < 0.55
    int4 = next(r for r in rows if r["quant"] == "int4")
    assert int4["method"] == report["best_method"] and int4["bytes_vs_fp16_kv"] < 0.25
    snap = next(r for r in plain if r["method"] == "snapkv")
    assert snap["prefill_overhead"] is not None and -0.5 < snap["prefill_overhead"] < 2.0
    assert all(r["attended"] > 0.95 for r in dense_rows if r["method"] == "full")


def test_equal_token_rows_attend_what_they_say(report):
    equal = [r for r in report["results"] if r["selection"] != "dense"]
    assert {(r["selection"], r["attend"]) for r in equal} == {
        (s, round(1 - ratio, 4)) for s in quality.EQUAL_SELECTIONS for ratio in quality.EQUAL_RATIOS
    }
    for r in equal:  # int4 at ratio 0.5 in the store; the decoder attends 1/4 or 1/10 of the context
        assert r["method"] == report["best_method"] and r["quant"] == "int4" and r["bytes_vs_fp16_kv"] < 0.25
        # everything counted, so never above the budget; pages may leave up to a page of it unused
        assert 0.8 * r["attend"] <= r["attended"] <= r["attend"] + 1e-6, r
    assert report["equal_tokens"] == []  # no kvpress rows to pair them with (peers=False)


def test_quick_run_evaluates_the_targets_it_can(report):
    targets = report["targets"]
    for t in targets.values():
        assert {"value", "threshold", "met", "rule"} <= set(t)
        assert t["met"] in (True, False, None)
    # without kvpress the comparison targets cannot be decided; the others can
    assert targets["retrieval_accuracy_vs_kvpress@0.5"]["met"] is None
    assert not any(name.startswith("equal_tokens") for name in targets)
    assert isinstance(targets["prefill_overhead:snapkv"]["met"], bool)
    bytes_target = targets["int4@0.5_bytes_vs_fp16_kv"]
    assert bytes_target["threshold"] == pytest.approx(0.150) and isinstance(bytes_target["met"], bool)


def test_docs_section_is_replaced_and_the_rest_kept(report, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n## Store\nstore numbers\n\n<!-- quality:start -->\nold\n"
        "<!-- quality:end -->\n\n## After\nkept\n"
    )
    quality.write_docs(report, tmp_path)
    text = doc.read_text()
    assert "store numbers" in text and "## After\nkept" in text and "\nold\n" not in text
    assert text.count("<!-- quality:start -->") == 1 and text.count("<!-- quality:end -->") == 1
    assert "| dkv | snapkv | 0.5 |" in text and "img/quality.png" in text
    assert "### Equal attended tokens" in text and f"| 0.10 | dkv | {report['best_method']} 0.5 + int4, topk |" in text
    assert (tmp_path / "img" / "quality.png").stat().st_size > 1000
    quality.write_docs(report, tmp_path / "new")  # missing file: created with the markers
    assert "<!-- quality:start -->" in (tmp_path / "new" / "benchmarks.md").read_text()


def test_tasks_are_final_token_ids_the_full_cache_solves(smollm2):
    model, tokenizer = smollm2
    tasks = build_tasks(tokenizer)
    kinds = {t["kind"] for t in tasks}
    assert kinds == {"retrieval", "fidelity"} and len({t["id"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert all(isinstance(i, int) for i in t["context_ids"])
        if t["kind"] == "retrieval":
            assert t["answer"] in tokenizer.decode(t["context_ids"]) and t["query_ids"] and t["max_new_tokens"] >= 5
            assert abs(len(t["context_ids"]) - t["length"]) <= 64  # lengths exact to a sentence
            start, end = t["needle"]
            assert t["answer"] in tokenizer.decode(t["context_ids"][start:end])
        else:
            assert len(t["context_ids"]) == 1000 and len(t["continuation_ids"]) == 64
    longest = max(PASSKEY_PLAN)[0]
    assert max(len(t["context_ids"]) for t in tasks) > longest - 64
    # the longest passkey (hardest for the full cache) and the quick set, solved by the full cache
    hard = [t for t in tasks if t["id"].startswith(f"passkey-{longest}-")][:1] + [
        t for t in build_tasks(tokenizer, quick=True) if t["kind"] == "retrieval"
    ]
    for t in hard:
        res = quality.run_retrieval(model, tokenizer, t, quality.Config("full", 0.0))
        assert res["correct"], (t["id"], res["text"])


def test_short_retrieval_tasks_span_350_to_1400_tokens_at_several_depths(smollm2):
    from dkv.bench.quality_tasks import short_retrieval_tasks

    _, tokenizer = smollm2
    tasks = short_retrieval_tasks(tokenizer)
    lengths = [len(t["context_ids"]) for t in tasks]
    assert 330 <= min(lengths) and max(lengths) <= 1400 and len({t["depth"] for t in tasks}) >= 5
    for t in tasks:
        start, end = t["needle"]
        assert t["answer"] in tokenizer.decode(t["context_ids"][start:end])
