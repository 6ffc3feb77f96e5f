"""The ``dkv`` command line, run as a user would: as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.kvstore import codec
from dkv.services.pb import store_pb2
from dkv.services.store_client import StoreClient
from dkv.services.transport import free_port
from dkv.testing import synthetic_entry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def dkv(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dkv", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        **kw,
    )


def start_store(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dkv", "store", "serve", "--port", str(port), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    for flag, env in (
        ("--cpu-bytes", "DKV_STORE_CPU_BYTES"),
        ("--redis-url", "DKV_STORE_REDIS_URL"),
        ("--device-bytes", "DKV_STORE_DEVICE_BYTES"),
        ("--redis-quant", "DKV_STORE_REDIS_QUANT"),
    ):
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


# --- one-line errors ------------------------------------------------------------------------------


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The failure's single stderr line (and nothing on stdout): no traceback, no log."""
    assert out.returncode != 0, out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dkv: "), out.stderr[-3000:]
    assert not out.stdout
    return lines[0]


@pytest.fixture
def taken_port():
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_up_with_an_unknown_model_says_so_in_one_line_before_starting_anything():
    started = time.monotonic()
    out = dkv("up", "--model", "no-such-model", "--port", str(free_port()))
    line = one_line_error(out)
    assert out.returncode == 2
    assert "unknown model 'no-such-model'" in line
    for form in ("smollm2-135m", ".gguf", "Hugging Face model folder", "ORG/NAME"):
        assert form in line  # what is accepted
    assert time.monotonic() - started < 30  # refused up front: no model was loaded, no child started


def test_up_refuses_an_unsupported_architecture_and_a_missing_gpu_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    line = one_line_error(dkv("up", "--model", str(tmp_path), "--port", str(free_port())))
    assert "model type 'gpt2' is not supported" in line and "llama, mistral, qwen2" in line
    line = one_line_error(dkv("up", "--device", "gpu", "--port", str(free_port())))
    assert "setting device = 'gpu'" in line and "cuda:N" in line
    import torch

    if not torch.cuda.is_available():
        line = one_line_error(dkv("up", "--device", "cuda", "--port", str(free_port())))
        assert "asked for a CUDA GPU" in line and "use device cpu or auto" in line


def test_a_taken_port_is_one_line(taken_port):
    for args in (["up", "--no-redis"], ["store", "serve"]):
        line = one_line_error(dkv(*args, "--port", str(taken_port)))
        assert f"cannot listen on 127.0.0.1:{taken_port} (Address already in use)" in line and "--port" in line
    for args in (["up", "--no-redis", "--port", str(free_port())], ["gateway", "serve"]):
        line = one_line_error(dkv(*args, "--http-port", str(taken_port)))
        assert f"cannot listen on 127.0.0.1:{taken_port} (Address already in use)" in line and "--http-port" in line


def test_an_unreachable_server_is_one_line():
    address = f"127.0.0.1:{free_port()}"
    for args in (
        ["generate", "a context", "a question", "--address", address],
        ["store", "stats", "--address", address],
    ):
        line = one_line_error(dkv(*args))
        assert "cannot reach the server" in line and address in line and "--address" in line


def test_a_bad_setting_is_one_line_and_debug_shows_the_traceback():
    line = one_line_error(dkv("prefill", "serve", "--dtype", "float64"))
    assert "setting dtype = 'float64'" in line and "bfloat16" in line
    out = dkv("--debug", "prefill", "serve", "--dtype", "float64")
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr and "SettingsError" in out.stderr
    out = dkv("store", "stats", "--address", f"127.0.0.1:{free_port()}", env={"DKV_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr


def test_help_lists_the_model_forms():
    for args in (["up"], ["prefill", "serve"], ["decode", "serve"]):
        text = " ".join(dkv(*args, "--help").stdout.split())
        assert "smollm2-135m" in text and ".gguf" in text and "repo id ORG/NAME" in text, args
        assert "cuda:N" in text and "bfloat16" in text, args
