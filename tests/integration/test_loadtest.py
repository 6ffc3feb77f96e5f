"""The locust load test (``loadtest/``): its gRPC interceptor, a 30-second smoke of ``make loadtest``, and a
20-second smoke of its HTTP scenario.

The interceptor tests run a store server in this process and check what would be reported to
locust for each kind of call. The smoke runs ``python -m dkv.loadtest.run`` (``dkv up`` on free
loopback ports, then locust headless, mixed scenario) as a subprocess and reads its CSV.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dkv.kvstore import codec
from dkv.loadtest.grpc_locust import LocustInterceptor, intercepted, store_outcome
from dkv.services.store_client import StoreClient
from dkv.testing import synthetic_entry

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self):
        self.calls: list[dict] = []

    def fire(self, **kwargs) -> None:
        self.calls.append(kwargs)

    def names(self) -> list[str]:
        return [c["name"] for c in self.calls]


@pytest.fixture
def recorded_store(store_service):
    server = store_service()
    recorder = Recorder()
    with intercepted(LocustInterceptor(recorder.fire, store_outcome)):
        client = StoreClient(server.address, timeout_s=10)
    try:
        yield client, recorder
    finally:
        client.close()


def test_interceptor_reports_unary_streaming_and_misses(recorded_store):
    store, recorder = recorded_store
    entry = synthetic_entry(seq_len=64, num_layers=2, token_ids=list(range(64)))
    frames = codec.encode(entry)

    reply = store.put_frames(frames)  # client streaming
    got = store.get_frames(reply.key)  # server streaming, consumed by the client
    assert got is not None
    assert store.get_frames(str(reply.key)[:-4] + "0000") is None  # NOT_FOUND: a miss
    assert store.lookup(entry.identity.model_fingerprint, entry.identity.recipe, [1, 2, 3]) is None
    assert store.lookup(entry.identity.model_fingerprint, entry.identity.recipe, list(range(64))) is not None
    store.stats()  # unary

    assert recorder.names() == ["Put", "Get", "Get (miss)", "Lookup (miss)", "Lookup", "Stats"]
    for call in recorder.calls:
        assert call["request_type"] == "grpc"
        assert call["exception"] is None
        assert call["response_time"] >= 0
    get = recorder.calls[1]
    assert get["response_length"] == sum(len(f) for f in got)  # every byte of the stream
    assert recorder.calls[2]["response_length"] == 0


def test_interceptor_reports_failures(recorded_store):
    store, recorder = recorded_store
    with pytest.raises(grpc.RpcError) as raised:
        store.put_frames([b"not a dkv frame"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        store.get_frames("not a key")  # INVALID_ARGUMENT from a stream
    put, get = recorder.calls
    assert (put["name"], put["exception"].code) == ("Put", grpc.StatusCode.INVALID_ARGUMENT)
    assert (get["name"], get["exception"].code) == ("Get", grpc.StatusCode.INVALID_ARGUMENT)
    assert str(get["exception"]).startswith("INVALID_ARGUMENT: ")


def test_interceptor_reports_unreachable_server():
    recorder = Recorder()
    from dkv.services.transport import free_port

    with intercepted(LocustInterceptor(recorder.fire, store_outcome)):
        client = StoreClient(f"127.0.0.1:{free_port()}", timeout_s=2)
    with client, pytest.raises(grpc.RpcError):
        client.stats()
    assert recorder.names() == ["Stats"]
    assert recorder.calls[0]["exception"].code == grpc.StatusCode.UNAVAILABLE


def test_summary_fails_on_failures_and_slow_p99():
    from dkv.loadtest.summary import format_summary, problems

    row = dict(
        type="grpc", requests=10, failures=0, rps=1.0, p50_ms=5.0, p95_ms=9.0, p99_ms=12.0, max_ms=12.0, avg_bytes=100.0
    )
    summary = dict(
        scenario="store",
        users=1,
        duration_s=10.0,
        requests=10,
        failures=0,
        rps=1.0,
        exceptions=0,
        rows=[dict(row, name="Get")],
        get_hit_rate=0.5,
        lookup_hit_rate=None,
        generate_cache=dict(hit=0, partial=0, miss=0, prefix_tokens_reused=None),
        key_space=None,
        bytes_put=0,
        store=None,
        p99_bound_ms=100.0,
    )
    assert problems(summary) == []
    assert "Get" in format_summary(summary)
    assert problems({**summary, "p99_bound_ms": 10.0}) == ["p99 of Get is 12 ms > --p99-ms 10"]
    assert problems({**summary, "failures": 2}) == ["2 failed calls"]
    assert problems({**summary, "requests": 0, "rows": []}) == ["no call completed"]


def _stats(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loadtest_smoke(tmp_path):
    """30 s of the mixed scenario against a fresh dkv on loopback: exit 0, files, every call kind, no failure.

    The store's tiers are ``make loadtest``'s (64 MiB each), which the store users fill: a
    prefill's new chunk entries, the least valuable in the store, must still reach the decode
    worker (they were once dropped between Put and Get; see docs/benchmarks.md, "Load test").
    """
    out = tmp_path / "loadtest"
    cmd = [
        sys.executable,
        "-m",
        "dkv.loadtest.run",
        "--time",
        "30s",
        "--users",
        "3",
        "--scenario",
        "mixed",
        "--p99-ms",
        "300000",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail

    stats = _stats(out / "dkv_stats.csv")
    assert (out / "report.html").stat().st_size > 10_000, tail
    assert "Generate" in (out / "report.html").read_text()
    for name in ("Put", "Get", "Lookup", "Generate"):
        assert name in stats and int(stats[name]["Request Count"]) > 0, (name, sorted(stats), tail)
    assert int(stats["Aggregated"]["Failure Count"]) == 0, tail
    assert all(int(row["Failure Count"]) == 0 for row in stats.values())

    summary = json.loads((out / "dkv_summary.json").read_text())
    assert summary["failures"] == 0 and summary["exceptions"] == 0 and summary["problems"] == []
    assert summary["get_hit_rate"] is not None
    cache = summary["generate_cache"]
    assert cache["hit"] + cache["partial"] + cache["miss"] == int(stats["Generate"]["Request Count"])
    assert "dkv load test: scenario mixed" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loadtest_http_smoke(tmp_path):
    """20 s of the http scenario (``make loadtest LOADTEST_SCENARIO=http``): chats over the OpenAI API, no failure."""
    out = tmp_path / "loadtest"
    cmd = [
        sys.executable,
        "-m",
        "dkv.loadtest.run",
        "--time",
        "20s",
        "--users",
        "2",
        "--scenario",
        "http",
        "--p99-ms",
        "300000",
        "--no-redis",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    stats = _stats(out / "dkv_stats.csv")
    assert int(stats["/v1/chat/completions"]["Request Count"]) > 0, (sorted(stats), tail)
    assert all(int(row["Failure Count"]) == 0 for row in stats.values()), tail
    summary = json.loads((out / "dkv_summary.json").read_text())
    cache = summary["generate_cache"]
    assert cache["hit"] + cache["partial"] + cache["miss"] == int(stats["/v1/chat/completions"]["Request Count"])
    assert cache["partial"] + cache["hit"] > 0, tail  # later turns found the earlier turns' context cached
    assert "dkv load test: scenario http" in proc.stdout
