"""``dkv bench store``: Put/Get throughput of the store service, next to the limits of the machine.

One run measures, on the same bytes (the codec frames of a SmolLM2-sized cache: 4096 tokens,
30 layers, 3 KV heads, head dim 64, fp16, and its 20% and 10% variants):

- the store: Put and Get through a ``dkv store serve`` process over loopback gRPC, with the
  launcher's malloc tuning and without it;
- raw gRPC: the same frames streamed to and from a bare gRPC server process with identity
  serializers (no protobuf, no store): the transport's ceiling;
- Redis: redis-py pipelined SET / GET of the same frames on a real redis-server;
- loopback TCP: ``sendall`` / ``recv_into`` a reused buffer;
- memcpy: ``numpy.copyto`` into a reused buffer.

Each figure is the median of ``--repeats`` timed runs after one warm-up, in GB/s (1e9 bytes/s)
of frame bytes moved. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import redis

from dkv.kvstore import codec
from dkv.services.malloc import MALLOC_TUNING
from dkv.services.redis_server import RedisServer, redis_server_available
from dkv.services.server import GRPC_OPTIONS
from dkv.services.store_client import StoreClient
from dkv.services.transport import free_port
from dkv.testing import synthetic_entry

RAW_SERVICE = "dkv.bench.Raw"
VARIANTS = {"full": 1.0, "keep20": 0.2, "keep10": 0.1}


def _identity(x):
    return x


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-touch page faults, connection set-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _gbps(nbytes: int, times: list[float]) -> float:
    return round(nbytes / statistics.median(times) / 1e9, 3)


# ----------------------------------------------------------------------------- processes


def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _env(tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNING}
    env["DKV_MALLOC_TUNING"] = "1" if tuned else "0"
    if tuned:
        env.update(MALLOC_TUNING)
    return env


def _wait_ready(address: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        proc.kill()
        raise RuntimeError(f"server at {address} did not start: {proc.stderr.read().decode()[-2000:]}") from None
    finally:
        channel.close()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- raw gRPC server


def raw_server(port: int) -> None:
    """A bare gRPC server: RawPut keeps the streamed frames, RawGet streams them back."""
    held: list[bytes] = []

    async def put(request_iterator, context):
        held.clear()
        async for frame in request_iterator:
            held.append(frame)
        return b""

    async def get(request, context):
        for frame in held:
            yield frame

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    RAW_SERVICE,
                    {
                        "RawPut": grpc.stream_unary_rpc_method_handler(
                            put, request_deserializer=_identity, response_serializer=_identity
                        ),
                        "RawGet": grpc.unary_stream_rpc_method_handler(
                            get, request_deserializer=_identity, response_serializer=_identity
                        ),
                    },
                ),
            )
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# ----------------------------------------------------------------------------- measurements


def bench_store(frames_by_variant: dict[str, list[bytes]], repeats: int, tuned: bool) -> dict:
    port = free_port()
    proc = _spawn(
        ["-m", "dkv", "store", "serve", "--port", str(port), "--cpu-bytes", "4GiB", "--log-level", "warning"],
        _env(tuned),
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_ready(address, proc)
        out = {}
        with StoreClient(address, timeout_s=120) as client:
            for name, frames in frames_by_variant.items():
                nbytes = sum(map(len, frames))
                key = client.put_frames(frames).key
                put_t = _timed(lambda: client.put_frames(frames), repeats)
                get_t = _timed(lambda: client.get_frames(key), repeats)
                dec_t = _timed(lambda: client.get(key), repeats)
                out[name] = {
                    "entry_bytes": nbytes,
                    "put_ms": round(statistics.median(put_t) * 1e3, 1),
                    "get_ms": round(statistics.median(get_t) * 1e3, 1),
                    "put_gbps": _gbps(nbytes, put_t),
                    "get_gbps": _gbps(nbytes, get_t),
                    "get_decoded_gbps": _gbps(nbytes, dec_t),
                }
        return out
    finally:
        _stop(proc)


def bench_raw_grpc(frames: list[bytes], repeats: int) -> dict:
    port = free_port()
    proc = _spawn(["-m", "dkv.bench.store", "--raw-server", str(port)], _env(True))
    address = f"127.0.0.1:{port}"
    try:
        _wait_ready(address, proc)
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        put = channel.stream_unary(
            f"/{RAW_SERVICE}/RawPut", request_serializer=_identity, response_deserializer=_identity
        )
        get = channel.unary_stream(
            f"/{RAW_SERVICE}/RawGet", request_serializer=_identity, response_deserializer=_identity
        )
        nbytes = sum(map(len, frames))
        put_t = _timed(lambda: put(iter(frames), timeout=120), repeats)
        get_t = _timed(lambda: list(get(b"", timeout=120)), repeats)
        channel.close()
        return {"raw_grpc_put_gbps": _gbps(nbytes, put_t), "raw_grpc_gbps": _gbps(nbytes, get_t)}
    finally:
        _stop(proc)


def bench_redis(frames: list[bytes], repeats: int) -> dict:
    if not redis_server_available():
        return {"redis_gbps": None, "redis_put_gbps": None, "redis_note": "redis-server not on PATH"}
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        keys = [f"bench:{i}" for i in range(len(frames))]

        def put() -> None:
            pipe = client.pipeline(transaction=False)
            for k, f in zip(keys, frames):
                pipe.set(k, f)
            pipe.execute()

        def get() -> None:
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            pipe.execute()

        nbytes = sum(map(len, frames))
        put_t = _timed(put, repeats)
        get_t = _timed(get, repeats)
        client.close()
        return {"redis_put_gbps": _gbps(nbytes, put_t), "redis_gbps": _gbps(nbytes, get_t)}


def bench_tcp(nbytes: int, repeats: int) -> dict:
    payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sink = bytearray(4 << 20)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                header = conn.recv(8, socket.MSG_WAITALL)
                if len(header) < 8:
                    return
                left = int.from_bytes(header, "little")
                view = memoryview(sink)
                while left:
                    left -= conn.recv_into(view[: min(left, len(sink))])
                conn.sendall(b"k")

    threading.Thread(target=serve, daemon=True).start()
    sender = socket.create_connection(("127.0.0.1", port))

    def send() -> None:
        sender.sendall(nbytes.to_bytes(8, "little"))
        sender.sendall(memoryview(payload))
        sender.recv(1)

    times = _timed(send, repeats)
    sender.close()
    listener.close()
    return {"tcp_gbps": _gbps(nbytes, times)}


def bench_memcpy(nbytes: int, repeats: int) -> dict:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return {"memcpy_gbps": _gbps(nbytes, _timed(lambda: np.copyto(dst, src), repeats))}


def run(tokens: int = 4096, repeats: int = 5, progress: Callable[[str], None] = lambda s: None) -> dict:
    frames_by_variant = {}
    kv_bytes = {}
    for name, keep in VARIANTS.items():
        entry = synthetic_entry(seq_len=tokens, num_layers=30, num_kv_heads=3, head_dim=64, keep_fraction=keep, seed=1)
        kv_bytes[name] = sum(layer.keys.nbytes + layer.values.nbytes for layer in entry.layers)
        frames_by_variant[name] = codec.encode(entry)
    full = frames_by_variant["full"]
    nbytes = sum(map(len, full))
    progress("store (tuned malloc)")
    store = bench_store(frames_by_variant, repeats, tuned=True)
    progress("store (default malloc)")
    untuned = bench_store({"full": full}, repeats, tuned=False)["full"]
    progress("raw gRPC")
    raw = bench_raw_grpc(full, repeats)
    progress("redis")
    red = bench_redis(full, repeats)
    progress("tcp, memcpy")
    tcp = bench_tcp(nbytes, repeats)
    mem = bench_memcpy(nbytes, repeats)
    result = {
        "benchmark": "store",
        "shape": {"tokens": tokens, "layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "float16"},
        "kv_bytes_full": kv_bytes["full"],
        "entry_bytes_full": nbytes,
        "frames_full": len(full),
        "put_gbps": store["full"]["put_gbps"],
        "get_gbps": store["full"]["get_gbps"],
        **raw,
        **red,
        **tcp,
        **mem,
        "variants": store,
        "untuned_malloc": {"put_gbps": untuned["put_gbps"], "get_gbps": untuned["get_gbps"]},
        "repeats": repeats,
        "cpus": os.cpu_count(),
    }
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    result["ratios"] = {
        "get_vs_raw_grpc": ratio(result["get_gbps"], result["raw_grpc_gbps"]),
        "put_vs_raw_grpc_put": ratio(result["put_gbps"], result["raw_grpc_put_gbps"]),
        "raw_grpc_vs_tcp": ratio(result["raw_grpc_gbps"], result["tcp_gbps"]),
        "redis_vs_tcp": ratio(result["redis_gbps"], result["tcp_gbps"]),
        "get_vs_redis": ratio(result["get_gbps"], result["redis_gbps"]),
        "tcp_vs_memcpy": ratio(result["tcp_gbps"], result["memcpy_gbps"]),
        "tuned_vs_untuned_get": ratio(result["get_gbps"], untuned["get_gbps"]),
        "tuned_vs_untuned_put": ratio(result["put_gbps"], untuned["put_gbps"]),
    }
    return result


def main(args: argparse.Namespace) -> int:
    report = (lambda s: None) if args.json else (lambda s: print(f"measuring {s} ...", file=sys.stderr))
    print(json.dumps(run(args.tokens, args.repeats, report), indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-server":
        raw_server(int(sys.argv[2]))
