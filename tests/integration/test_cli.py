"""The ``dkv`` command line, run as a user would: as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.kvstore import codec
from dkv.kvstore.redis_server import free_port
from dkv.kvstore.synthetic import synthetic_entry
from dkv.services.pb import store_pb2
from dkv.services.store_client import StoreClient

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def dkv(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dkv", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, **kw)


def start_store(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dkv", "store", "serve", "--port", str(port), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    with StoreClient(address) as client:
        try:
            client.wait_ready(30)
        except grpc.FutureTimeoutError:
            proc.kill()
            pytest.fail(f"dkv store serve did not start: {proc.stdout.read()}")
    return proc, address


def test_help_explains_every_command_and_setting():
    top = dkv("--help")
    assert top.returncode == 0
    for command in ("store", "bench", "demo", "config"):
        assert command in top.stdout
    serve = dkv("store", "serve", "--help").stdout
    for flag, env in (("--cpu-bytes", "DKV_STORE_CPU_BYTES"), ("--redis-url", "DKV_STORE_REDIS_URL"),
                      ("--device-bytes", "DKV_STORE_DEVICE_BYTES"), ("--redis-quant", "DKV_STORE_REDIS_QUANT")):
        assert flag in serve and env in serve


def test_config_show_merges_flags_env_and_yaml(tmp_path):
    config = tmp_path / "store.yaml"
    config.write_text("port: 6000\ncpu_bytes: 1GiB\nredis_quant: int4\n")
    out = dkv("config", "show", "store", "--config", str(config), env={"DKV_STORE_CPU_BYTES": "2GiB"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["port"], shown["cpu_bytes"], shown["redis_quant"]) == (6000, 2 << 30, "int4")


def test_a_bad_setting_is_refused_with_what_to_use():
    out = dkv("store", "serve", "--cpu-quant", "int3")
    assert out.returncode == 2
    assert "cpu_quant" in out.stderr and "int4" in out.stderr
    out = dkv("store", "serve", "--cpu-bytes", "lots")
    assert out.returncode == 2 and "cpu_bytes" in out.stderr and "512MiB" in out.stderr


def test_serve_stats_and_graceful_sigterm():
    proc, address = start_store("--cpu-bytes", "512MiB", "--grace-s", "10", "--drain-delay-s", "1")
    try:
        entry = synthetic_entry(seq_len=4096, num_layers=30)
        with StoreClient(address, timeout_s=30) as client:
            key = client.put(entry).key
            stats = dkv("store", "stats", "--address", address)
            assert stats.returncode == 0 and json.loads(stats.stdout)["entries"] == "1"
            in_flight = client._get(store_pb2.GetRequest(key=str(key)), timeout=30)
            first = next(in_flight)  # the call is running on the server
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            channel = grpc.insecure_channel(address)
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            channel.close()
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            frames = [first, *in_flight]
            assert codec.decode(frames).key == key  # the call in flight finished whole
        assert proc.wait(30) == 0
        assert "NOT_SERVING" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
