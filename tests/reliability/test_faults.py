"""Faults: the store loses entries, it never returns wrong bytes, never takes its callers down.

What goes wrong, and what each test checks (every miss means the caller recomputes):

* the network between client and store, through ``FaultProxy`` on loopback: latency and jitter
  (round trips stay exact), a bandwidth cap under a short deadline (DEADLINE_EXCEEDED in time,
  then the key is absent or whole), a stall mid-Get (DEADLINE_EXCEEDED at the deadline, the store
  keeps serving), a connection reset mid-Put and mid-Get (UNAVAILABLE; nothing committed, nothing
  wrong read);
* the store process (``dkv store serve``): SIGKILL mid-Put and mid-Get (UNAVAILABLE at once; after
  a restart against the same Redis nothing half-written is visible and entries demoted into
  Redis are served exactly), SIGTERM with an in-flight Get (NOT_SERVING at once, the Get
  finishes, exit code 0 within the grace period);
* Redis killed and restarted under load (no failed Get, Puts succeed or are UNAVAILABLE, Redis
  hits resume, nothing stale);
* broken Put streams (truncated, reordered, duplicated, foreign, corrupted, oversized frames
  and messages, entries over the limit): the right status and a message, nothing stored, and
  the store process's memory back near its baseline after 50 of them.

Loopback only, a real redis-server (the ``fresh_redis`` fixture), synthetic entries (no model).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis
import torch
from fault_proxy import FaultProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.kvstore import codec
from dkv.services.pb import store_pb2
from dkv.services.settings import StoreSettings
from dkv.services.store_client import StoreClient, StoreUnavailable
from dkv.services.store_server import SERVICE
from dkv.services.transport import free_port, open_channel
from dkv.services.wire import frame_message
from dkv.testing import synthetic_entry

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensor work (synthetic entries, the in-process store's checks) on one thread: on a
    loaded 2-core machine torch's thread pool made a 0.6 MB synthetic entry take 1 s, not 13 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ helpers


def same_entry(a, b) -> bool:
    """Same key, metadata and every tensor bit for bit (like test_store_service.assert_same_entry)."""
    if a.key != b.key or a.seq_len != b.seq_len or a.importance != b.importance or len(a.layers) != len(b.layers):
        return False
    for la, lb in zip(a.layers, b.layers):
        ta, tb = la.tensors(), lb.tensors()
        if ta.keys() != tb.keys() or not all(torch.equal(t, tb[name]) for name, t in ta.items()):
            return False
    return True


def assert_same_entry(got, expected) -> None:
    assert got is not None, "a miss where the entry was expected"
    assert same_entry(got, expected), f"entry {expected.key} came back with different bytes"


def entry_of(seq_len: int, heads: int = 4, seed: int = 0, **kw):
    """~``seq_len`` x 4.5 KB for 4 heads: 512 -> 2.3 MB, 1024 -> 4.6 MB, 2048 -> 9.2 MB."""
    return synthetic_entry(seq_len=seq_len, num_layers=4, num_kv_heads=heads, seed=seed, **kw)


def call_error(fn, *args) -> tuple[grpc.RpcError, float]:
    """The RpcError ``fn(*args)`` raises and the seconds it took to raise it."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value, time.monotonic() - start


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def measured(what: str, value: float, unit: str = "s") -> None:
    print(f"[measured] {what}: {value:.3f} {unit}")


class InThread:
    """Run ``fn(*args)`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn, *args):
        self.value = self.error = None
        self.started_at, self.ended_at = time.monotonic(), None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.value = fn(*args)
        except BaseException as e:
            self.error = e
        self.ended_at = time.monotonic()

    def result(self, timeout_s: float):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the call did not return within {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.value


def health(address: str, timeout_s: float = 2.0):
    """The server's overall health status, or None if it does not answer."""
    channel = open_channel(address)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
    except grpc.RpcError:
        return None
    finally:
        channel.close()


class StoreProcess:
    """``python -m dkv store serve --port P ARGS``, its log in ``log_path``."""

    def __init__(self, log_path: Path, *args: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> StoreProcess:
        """Start (again on the same port) and wait until health says SERVING."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dkv",
                    "store",
                    "serve",
                    "--port",
                    str(self.port),
                    "--log-format",
                    "text",
                    *self.args,
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while health(self.address, timeout_s=1.0) != SERVING:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the store did not start (exit code {self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


@pytest.fixture
def store_process(tmp_path):
    """Factory: ``store_process(*args)`` starts a store subprocess; all are killed at teardown."""
    started = []

    def start(*args: str) -> StoreProcess:
        store = StoreProcess(tmp_path / f"store{len(started)}.log", *args)
        started.append(store)
        return store.start()

    yield start
    for store in started:
        store.kill()


def in_process_store(store_service, cpu_bytes: int = 256 * MiB, **settings):
    return store_service(StoreSettings(port=0, cpu_bytes=cpu_bytes, **settings))


# ------------------------------------------------------------------------------ the proxy itself


@pytest.mark.timeout(30)
def test_the_proxy_forwards_caps_stalls_and_resets():
    """The tool the other tests rely on: bytes pass unchanged, the cap holds, a stall holds bytes,
    a reset is a real RST (ECONNRESET on the client's socket)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def sink() -> None:  # accepts connections, echoes what it reads
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := _recv(conn):
                    received.append(len(data))
                    conn.sendall(data)

    def _recv(conn):
        try:
            return conn.recv(1 << 16)
        except OSError:
            return b""

    threading.Thread(target=sink, daemon=True).start()
    payload = os.urandom(400_000)
    with FaultProxy(f"127.0.0.1:{listener.getsockname()[1]}") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload):
                echoed += s.recv(1 << 16)
            assert echoed == payload
            proxy.down.bandwidth_bps = 1e6
            start = time.monotonic()
            s.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload):
                echoed += s.recv(1 << 16)
            assert 0.3 <= time.monotonic() - start < 5, "400 kB at 1 MB/s takes ~0.4 s"
            proxy.clear()
            proxy.up.stalled = True
            before = sum(received)
            s.sendall(b"x" * 1000)
            time.sleep(0.2)
            assert sum(received) == before  # held, connection still open
            proxy.up.stalled = False
            assert s.recv(1000)
            proxy.down.reset_after_bytes = 10
            s.sendall(b"y" * 100)
            with pytest.raises(ConnectionResetError):
                while s.recv(1000):
                    pass
        assert (proxy.connections, proxy.resets) == (1, 1)
        assert proxy.bytes_up == 2 * len(payload) + 1100 and proxy.bytes_down >= 2 * len(payload) + 10
        wait_for(lambda: proxy.open_connections == 0, 5, "the reset connection to be forgotten")
    listener.close()


# ------------------------------------------------------------------- network faults (in-process)


@pytest.mark.timeout(60)
def test_latency_and_jitter_keep_round_trips_exact(store_service):
    server = in_process_store(store_service)
    entries = [entry_of(256, heads=2, seed=i) for i in range(3)]
    multi_frame = entry_of(256, heads=2, seed=9)
    with FaultProxy(server.address) as proxy, StoreClient(proxy.address, timeout_s=30) as client:
        proxy.set(latency_s=0.002, jitter_s=0.004)
        for e in entries:
            assert client.put(e).key == e.key
        client.put_frames(codec.encode(multi_frame, max_frame_bytes=32 << 10))
        for e in (*entries, multi_frame):
            assert_same_entry(client.get(e.key), e)
        assert client.stats().entries == 4
        assert proxy.connections >= 1 and proxy.bytes_up > 4 * 500_000 and proxy.bytes_down > 4 * 500_000


@pytest.mark.timeout(60)
def test_a_put_slower_than_its_deadline_fails_in_time_and_is_never_half_stored(store_service):
    server = in_process_store(store_service)
    entry = entry_of(1024)  # 4.6 MB: 2.3 s at 2 MB/s
    with FaultProxy(server.address) as proxy, StoreClient(proxy.address, timeout_s=1.0) as client:
        client.wait_ready()
        proxy.up.bandwidth_bps = 2e6
        err, took = call_error(client.put, entry)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
        assert took < 1.0 + 1.5, f"the deadline was 1 s, the call took {took:.2f} s"
        measured("Put under a 2 MB/s cap, 1 s deadline: DEADLINE_EXCEEDED after", took)
        proxy.clear()
        client.timeout_s = 30
        got = client.get(entry.key)
        stats = client.stats()
        if got is None:  # the Put never committed
            assert stats.entries == 0 and stats.tiers[0].used_bytes == 0
        else:
            assert_same_entry(got, entry)
        assert client.put(entry).key == entry.key  # the same key can be written again
        assert_same_entry(client.get(entry.key), entry)


@pytest.mark.timeout(60)
def test_a_stalled_store_costs_one_control_deadline_then_fails_fast_until_retry(store_service):
    server = in_process_store(store_service)
    entry = entry_of(64, heads=2)
    with (
        FaultProxy(server.address) as proxy,
        StoreClient(proxy.address, timeout_s=30, control_timeout_s=0.5, retry_after_s=1.0) as client,
    ):
        client.put(entry)
        proxy.set(stalled=True)
        err, took = call_error(client.stats)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 0.5 + 1.0
        err, took = call_error(client.get, entry.key)  # not sent: the store is taken as hung
        assert isinstance(err, StoreUnavailable) and err.code() == grpc.StatusCode.UNAVAILABLE
        assert took < 0.05 and "not called again" in err.details()
        proxy.clear()
        time.sleep(1.1)
        assert_same_entry(client.get(entry.key), entry)


@pytest.mark.timeout(60)
def test_a_stalled_get_ends_at_its_deadline_and_the_store_keeps_serving(store_service):
    server = in_process_store(store_service)
    entry, other = entry_of(1024), entry_of(256, heads=2, seed=1)
    deadline_s = 3.0
    with StoreClient(server.address, timeout_s=30) as direct:
        direct.put(entry)
        direct.put(other)
        with FaultProxy(server.address) as proxy, StoreClient(proxy.address, timeout_s=deadline_s) as client:
            client.wait_ready()
            proxy.down.bandwidth_bps = 1e6
            start_bytes = proxy.bytes_down
            call = InThread(client.get, entry.key)
            wait_for(lambda: proxy.bytes_down > start_bytes + 200_000, 10, "the Get to be under way")
            proxy.down.stalled = True  # mid-Get: bytes stop, the connection stays open
            stalled_at = proxy.bytes_down
            with pytest.raises(grpc.RpcError) as info:
                call.result(deadline_s + 10)
            took = call.ended_at - call.started_at
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
            assert deadline_s - 0.05 <= took < deadline_s + 2.0, f"deadline {deadline_s} s, failed after {took:.2f} s"
            measured("stalled Get, 3 s deadline: DEADLINE_EXCEEDED after", took)
            assert proxy.bytes_down <= stalled_at + (64 << 10)
            # the store serves others meanwhile, directly and through a fresh connection
            assert_same_entry(direct.get(other.key), other)
            proxy.clear()
            with StoreClient(proxy.address, timeout_s=30) as again:
                assert_same_entry(again.get(entry.key), entry)


RESET_CODES = {grpc.StatusCode.UNAVAILABLE}  # what grpc 1.85 reports for a connection reset mid-call


@pytest.mark.timeout(60)
def test_a_connection_reset_mid_put_is_unavailable_and_commits_nothing(store_service):
    server = in_process_store(store_service)
    entry = entry_of(512)
    frames = codec.encode(entry, max_frame_bytes=64 << 10)  # 37 frames, 2.3 MB
    total = sum(map(len, frames))
    assert len(frames) > 30
    offsets = (200, 3000, 150_000, 1_200_000, total - 20_000)  # in the headers, in frame 1, ..., near the end
    with FaultProxy(server.address) as proxy:
        for offset in offsets:
            with StoreClient(proxy.address, timeout_s=30) as client:
                client.wait_ready()
                sent_before = proxy.bytes_up
                proxy.up.reset_after_bytes = offset
                err, took = call_error(client.put_frames, frames)
                assert err.code() in RESET_CODES, (offset, err.code(), err.details())
                assert took < 10
                # (a few bytes of HTTP/2 control frames may pass just before the fault is armed)
                assert offset <= proxy.bytes_up - sent_before <= offset + 1024 and offset < total
        assert proxy.resets == len(offsets)
    with StoreClient(server.address, timeout_s=30) as direct:
        stats = direct.stats()
        assert (stats.entries, stats.puts, stats.tiers[0].used_bytes) == (0, 0, 0)
        assert direct.get(entry.key) is None
        assert direct.put_frames(frames).key == entry.key  # whole, it goes in
        assert_same_entry(direct.get(entry.key), entry)


@pytest.mark.timeout(60)
def test_a_connection_reset_mid_get_is_an_error_or_a_miss_never_wrong_bytes(store_service):
    server = in_process_store(store_service)
    entry = entry_of(512)
    frames = codec.encode(entry, max_frame_bytes=64 << 10)
    total = sum(map(len, frames))
    outcomes = []
    with StoreClient(server.address, timeout_s=30) as direct:
        direct.put_frames(frames)
        with FaultProxy(server.address) as proxy:
            for offset in (100, 5000, 70_000, 1_000_000, total - 5000):
                with StoreClient(proxy.address, timeout_s=30) as client:
                    client.wait_ready()
                    proxy.down.reset_after_bytes = offset
                    try:
                        got = client.get(entry.key)
                    except grpc.RpcError as e:
                        outcomes.append(e.code())
                        continue
                    outcomes.append("miss" if got is None else "whole")
                    if got is not None:
                        assert_same_entry(got, entry)
            assert proxy.resets == 5
        assert set(outcomes) <= RESET_CODES | {"miss"}, outcomes  # never fewer bytes passed off as the entry
        assert_same_entry(direct.get(entry.key), entry)  # the stored entry is untouched
        assert direct.stats().checksum_failures == 0


def raw_put(address: str, max_send: int = 64 * MiB):
    """A Put stub that may send messages over the store's 8 MiB limit (StoreClient may not)."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", max_send)])
    put = channel.stream_unary(
        f"/{SERVICE}/Put", request_serializer=frame_message, response_deserializer=store_pb2.PutResponse.FromString
    )
    return channel, put


@pytest.mark.timeout(60)
def test_a_put_ended_by_grpc_or_by_the_client_is_not_reported_as_a_server_error(store_service, caplog):
    """A message over the limit is RESOURCE_EXHAUSTED, a client that goes away is CANCELLED: neither
    is UNKNOWN in ``dkv_rpc_duration_seconds`` nor an ERROR in the log (alerts watch both)."""
    server = in_process_store(store_service)
    frames = codec.encode(entry_of(512), max_frame_bytes=64 << 10)
    registry = server.server.metrics.registry

    def put_calls(code: str | None = None) -> float:
        return sum(
            s.value
            for m in registry.collect()
            for s in m.samples
            if s.name == "dkv_rpc_duration_seconds_count"
            and s.labels["method"] == "Put"
            and code in (None, s.labels["code"])
        )

    def assert_no_server_error(what: str) -> None:
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not put_calls("UNKNOWN") and not errors, f"{what}: UNKNOWN={put_calls('UNKNOWN')}, ERROR logs {errors}"

    caplog.set_level(logging.INFO, logger="dkv.server")
    channel, put = raw_put(server.address)
    with channel:  # always reproduces it
        err, _ = call_error(put, iter([frames[0], bytes(9 * MiB)]), 10)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()
        wait_for(lambda: put_calls() >= 1, 10, "the server to finish the call")
        assert_no_server_error("a message over the limit")
    with FaultProxy(server.address) as proxy:  # reproduces it ~4 times in 5 here
        for attempt in range(20):
            with StoreClient(proxy.address, timeout_s=30) as client:
                client.wait_ready()
                proxy.up.reset_after_bytes = 2000  # inside frame 1: the server has the call, not the entry
                assert call_error(client.put_frames, frames)[0].code() in RESET_CODES
            wait_for(lambda: put_calls() >= attempt + 2, 10, "the server to finish the reset call")
            assert_no_server_error(f"reset {attempt}")


# ---------------------------------------------------------------- the store process dies or stops


def slow_frames(frames, started: threading.Event, after: int, pause_s: float = 0.05):
    """Yield ``frames`` with a pause between them; set ``started`` once ``after`` of them were taken
    (``after=len(frames)``: as soon as gRPC asks for one more after the last)."""
    for i, frame in enumerate(frames):
        if i == after:
            started.set()
        if i:
            time.sleep(pause_s)
        yield frame
    started.set()


def redis_state(r: redis.Redis) -> dict:
    """The entries published in Redis (key -> bytes), checked for consistency against
    kvstore/redis_tier.py's layout: every published manifest has all its data keys, whole and
    persistent; only staging keys (TTL set) may be unpublished; the store counts (index) only
    published entries, at their size, and ``used`` is the sum of its index. A write cut between its
    publish and its count leaves one published entry uncounted (readable; counted when read)."""
    import json

    index = {k.decode(): int(v) for k, v in r.hgetall("{dkv:}index").items()}
    manifests = {k.decode()[len("dkv:m:{") : -1]: json.loads(r.get(k)) for k in r.scan_iter(match="dkv:m:*")}
    published, data = {}, set()
    for key, m in manifests.items():
        data_keys = [f"dkv:d:{{{key}}}:{m['v']}:{i}" for i in range(len(m["sizes"]))]
        assert [r.strlen(k) for k in data_keys] == m["sizes"], f"{key}: a published frame is missing or cut"
        assert all(r.ttl(k) == -1 for k in data_keys), f"{key}: a published frame would expire"
        published[key] = sum(m["sizes"])
        data.update(data_keys)
    assert all(published.get(key) == size for key, size in index.items()), "a count of no published entry"
    assert len(set(published) - set(index)) <= 1, "published entries the store does not count"
    for k in r.scan_iter(match="dkv:d:*"):
        if k.decode() not in data:
            assert r.ttl(k) > 0, f"{k!r}: an unpublished data key that never expires"
    assert int(r.get("{dkv:}used") or 0) == sum(index.values())
    return published


@pytest.mark.redis
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kill_at", ["mid-stream", "during-redis-write"])
def test_sigkill_mid_put_is_unavailable_and_the_restarted_store_serves_only_whole_entries(
    store_process, fresh_redis, kill_at
):
    """``mid-stream``: killed after 10 of 37 frames. ``during-redis-write``: an entry larger than the
    host tier (so the store writes it to Redis) killed as soon as its first staged frame shows up
    in Redis, so the kill lands while it is staged or published: whole or absent, both are fine."""
    # 1.15 MB entries, a 3 MiB host tier: the first ones are demoted into Redis by the later ones
    store = store_process("--cpu-bytes", "3MiB", "--redis-url", fresh_redis.url, "--log-level", "warning")
    earlier = [entry_of(512, heads=2, seed=i) for i in range(5)]
    if kill_at == "mid-stream":
        victim = entry_of(512, seed=100)
        frames = codec.encode(victim, max_frame_bytes=64 << 10)  # 37 frames: ~2 s at 50 ms each
        after = 10
    else:
        victim = entry_of(1024, seed=100)  # 4.6 MB > 3 MiB: straight to Redis
        frames = codec.encode(victim, max_frame_bytes=512 << 10)
        after = len(frames)
    r = redis.Redis.from_url(fresh_redis.url, socket_timeout=5)
    with StoreClient(store.address, timeout_s=20) as client:
        for e in earlier:
            client.put(e)
        in_redis = set(redis_state(r))
        assert len(in_redis) >= 2, "nothing was demoted into Redis: the test would prove nothing"
        started = threading.Event()
        call = InThread(client.put_frames, slow_frames(frames, started, after))
        assert started.wait(20)
        if kill_at == "during-redis-write":
            staged = f"dkv:d:{{{victim.key}}}:*"
            wait_for(lambda: next(r.scan_iter(match=staged, count=1000), None), 20, "the victim's staging", 0)
        killed_at = time.monotonic()
        store.kill()
        call.thread.join(30)
        assert call.ended_at is not None, "the Put did not return"
        measured(f"SIGKILL ({kill_at}) to the Put's end", call.ended_at - killed_at)
        assert call.ended_at - killed_at < 5, f"the Put ended {call.ended_at - killed_at:.1f} s after the kill"
        assert call.ended_at - call.started_at < client.timeout_s
        if kill_at == "mid-stream" or call.error is not None:
            assert isinstance(call.error, grpc.RpcError), call.error
            assert call.error.code() == grpc.StatusCode.UNAVAILABLE, call.error.details()
        committed = str(victim.key) in redis_state(r)  # consistent: nothing half-written
        leftovers = sum(1 for _ in r.scan_iter(match=f"dkv:d:{{{victim.key}}}:*"))
        print(
            f"[measured] {kill_at}: Put {'failed' if call.error else 'succeeded'}, "
            f"{'whole in Redis' if committed else 'absent from Redis'}, {leftovers} data keys of it in Redis"
        )
        if kill_at == "mid-stream":
            assert not committed
        if call.error is None:
            assert committed, "an acknowledged Put into Redis is gone although Redis survived"

    store.start()  # same port, same Redis
    with StoreClient(store.address, timeout_s=20) as client:
        assert client.stats().entries == len(in_redis) + committed
        got = client.get(victim.key)
        if committed:
            assert_same_entry(got, victim)
        else:
            assert got is None
        for e in earlier:
            if str(e.key) in in_redis:
                assert_same_entry(client.get(e.key), e)  # demoted into Redis before the kill: still whole
            else:
                assert client.get(e.key) is None  # it lived in the host tier, which died with the process
    r.close()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_sigkill_mid_get_is_unavailable_and_after_a_restart_the_entry_is_whole_or_a_miss(store_process, fresh_redis):
    store = store_process("--cpu-bytes", "4MiB", "--redis-url", fresh_redis.url, "--log-level", "warning")
    big = entry_of(2048)  # 9.2 MB: larger than the host tier, so it goes to Redis
    with StoreClient(store.address, timeout_s=20) as client:
        assert client.put(big).tier == "redis"
    with FaultProxy(store.address) as proxy, StoreClient(proxy.address, timeout_s=20) as client:
        client.wait_ready()
        proxy.down.bandwidth_bps = 4e6  # ~2.5 s for the whole entry
        before = proxy.bytes_down
        call = InThread(client.get, big.key)
        wait_for(lambda: proxy.bytes_down > before + 1_000_000, 20, "the Get to be under way")
        killed_at = time.monotonic()
        store.kill()
        proxy.clear()  # what was sent before the kill arrives at once
        with pytest.raises(grpc.RpcError) as info:
            call.result(30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        measured("SIGKILL mid-Get to UNAVAILABLE", call.ended_at - killed_at)
        assert call.ended_at - killed_at < 5, f"UNAVAILABLE {call.ended_at - killed_at:.1f} s after the kill"
    store.start()
    with StoreClient(store.address, timeout_s=20) as client:
        got = client.get(big.key)
        assert got is None or same_entry(got, big), "wrong bytes after a restart"
        assert got is not None, "the entry lived in Redis, which survived: it should be served"


@pytest.mark.timeout(120)
def test_sigterm_turns_health_off_at_once_lets_the_slow_get_finish_and_exits_0(store_process):
    store = store_process("--cpu-bytes", "64MiB", "--drain-delay-s", "1", "--grace-s", "5")
    entry = entry_of(1024)  # 4.6 MB: ~2.3 s at 2 MB/s
    with StoreClient(store.address, timeout_s=30) as direct:
        direct.put(entry)
    with FaultProxy(store.address) as proxy, StoreClient(proxy.address, timeout_s=30) as client:
        client.wait_ready()
        proxy.down.bandwidth_bps = 2e6
        before = proxy.bytes_down
        call = InThread(client.get, entry.key)
        wait_for(lambda: proxy.bytes_down > before + 300_000, 20, "the Get to be under way")
        signalled_at = time.monotonic()
        store.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health(store.address, timeout_s=1.0) == NOT_SERVING, 5, "health NOT_SERVING", 0.02)
        not_serving_after = time.monotonic() - signalled_at
        measured("SIGTERM to health NOT_SERVING", not_serving_after)
        assert not_serving_after < 1.0, f"NOT_SERVING {not_serving_after:.2f} s after SIGTERM"
        assert call.ended_at is None, "the Get should still be in flight"
        assert_same_entry(call.result(30), entry)
        measured("SIGTERM to the in-flight Get's end", call.ended_at - signalled_at)
        code = store.proc.wait(1 + 5 + 5)
        exited_after = time.monotonic() - signalled_at
        measured("SIGTERM to exit", exited_after)
    assert code == 0, store.log_tail()
    assert exited_after < 1 + 5 + 3, f"exited {exited_after:.1f} s after SIGTERM"
    assert "NOT_SERVING" in store.log_tail()


# ------------------------------------------------------------------------ Redis dies under load


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_redis_killed_and_restarted_under_load_fails_no_get_and_serves_nothing_stale(store_service, fresh_redis):
    """3 threads Put (overwriting their keys with other versions) and Get for ~7 s while Redis is
    SIGKILLed and restarted empty on the same port. Gets never fail (a miss is fine), Puts succeed
    or are UNAVAILABLE (no tier could take the entry), every entry read is the one last written
    under its key, and hits from Redis resume soon after the restart."""
    workers, keys_per_worker, versions = 3, 4, 3

    def versions_of(w: int, k: int) -> list:
        # key 0 of each worker is larger than the host tier: it can only live in Redis
        tokens = list(range(1000 * (10 * w + k), 1000 * (10 * w + k) + (512 if k == 0 else 256)))
        return [
            entry_of(len(tokens), heads=4 if k == 0 else 2, seed=1000 * w + 10 * k + v, token_ids=tokens)
            for v in range(versions)
        ]

    entries = [[versions_of(w, k) for k in range(keys_per_worker)] for w in range(workers)]
    assert all(len({e.key for e in key_versions}) == 1 for w in entries for key_versions in w)
    size = sum(map(len, codec.encode(entries[0][1][0])))  # 0.58 MB; key 0's are 2.3 MB
    server = in_process_store(store_service, cpu_bytes=int(2.5 * size), redis_url=fresh_redis.url)
    stop = threading.Event()
    lock = threading.Lock()
    log = {"put_ok": 0, "put_failed": [], "get_errors": [], "wrong": [], "gets": []}  # gets: (time, tier or "miss")

    def worker(w: int) -> None:
        rng = random.Random(w)
        expected: dict[int, int | None] = {}  # key -> version last written (None: none, or the write failed)
        written = [0] * keys_per_worker
        with StoreClient(server.address, timeout_s=30) as client:
            while not stop.is_set():
                k = rng.randrange(keys_per_worker)
                if rng.random() < 0.4:
                    v = written[k] % versions
                    written[k] += 1
                    try:
                        client.put(entries[w][k][v])
                        expected[k] = v
                        with lock:
                            log["put_ok"] += 1
                    except grpc.RpcError as e:
                        expected[k] = None  # the store dropped the old version before placing the new one
                        with lock:
                            log["put_failed"].append((time.monotonic(), e.code(), e.details()))
                    continue
                try:
                    got = client.get_with_tier(entries[w][k][0].key)
                except grpc.RpcError as e:
                    with lock:
                        log["get_errors"].append((e.code(), e.details()))
                    continue
                v = expected.get(k)
                wrong = got is not None and (v is None or not same_entry(got[0], entries[w][k][v]))
                with lock:
                    log["gets"].append((time.monotonic(), got[1] if got else "miss"))
                    if wrong:
                        log["wrong"].append((w, k, v, got[1]))

    def gets(since: float, until: float = float("inf"), tier: str | None = None) -> list[float]:
        with lock:
            return [at for at, t in log["gets"] if since < at < until and tier in (None, t)]

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
    started_at = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: gets(started_at, tier="redis"), 15, "hits from Redis before the fault")
        time.sleep(1.0)
        killed_at = time.monotonic()
        fresh_redis.kill()
        with StoreClient(server.address, timeout_s=30) as client:  # an entry only Redis could hold
            err, took = call_error(client.put, entry_of(512, seed=77))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "no tier could take the entry" in err.details()
            assert took < 5
        time.sleep(2.5)
        restarted_at = time.monotonic()
        fresh_redis.start()  # same port, empty: a crashed cache
        wait_for(lambda: gets(restarted_at, tier="redis"), 15, "hits from Redis after the restart", 0.05)
        resumed_after = gets(restarted_at, tier="redis")[0] - restarted_at
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    ended_at = time.monotonic()
    assert not any(t.is_alive() for t in threads)

    during = gets(killed_at, restarted_at)
    failed_during = sum(killed_at <= at <= restarted_at + 2 for at, _, _ in log["put_failed"])
    print(
        f"[measured] Redis load: {ended_at - started_at:.1f} s, outage {restarted_at - killed_at:.1f} s; "
        f"{log['put_ok']} Puts ok, {len(log['put_failed'])} UNAVAILABLE ({failed_during} in or just after "
        f"the outage); {len(log['gets'])} Gets: {len(gets(0, tier='redis'))} from Redis, "
        f"{len(gets(0, tier='cpu'))} from cpu, {len(gets(0, tier='miss'))} misses, {len(during)} during the "
        f"outage; Redis hits resumed {resumed_after:.2f} s after the restart"
    )
    assert not log["get_errors"], log["get_errors"][:3]
    assert not log["wrong"], f"stale or wrong entries served: {log['wrong'][:5]}"
    assert {code for _, code, _ in log["put_failed"]} <= {grpc.StatusCode.UNAVAILABLE}, log["put_failed"][:3]
    assert all("no tier could take the entry" in details for _, _, details in log["put_failed"])
    assert log["put_ok"] > 20 and len(during) > 5
    assert resumed_after < 10
    with StoreClient(server.address, timeout_s=30) as client:
        stats = client.stats()
        assert stats.tiers[1].errors > 0, "the store never noticed Redis was gone: the test proved nothing"
        assert [t.healthy for t in stats.tiers] == [True, True]


# -------------------------------------------------------------------------- broken Put streams


def broken_streams() -> dict:
    """name: (frames, status, words of the message) of Puts the store must refuse, 3-9 MB each."""
    good = codec.encode(entry_of(768, seed=1), max_frame_bytes=512 << 10)  # 3.4 MB in 9 frames
    foreign = codec.encode(entry_of(768, seed=2), max_frame_bytes=512 << 10)
    too_big = codec.encode(entry_of(2048, seed=3))  # 9.2 MB of data: over --max-entry-bytes 8MiB
    assert len(good) == len(foreign) >= 6
    corrupted = bytearray(good[-1])
    corrupted[1000] ^= 0x01
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        "truncated": (good[:-1], invalid, "truncated"),
        "reordered": ([good[0], good[2], good[1], *good[3:]], invalid, "reordered"),
        "duplicated": ([*good[:2], good[1], *good[2:]], invalid, "reordered, duplicated or lost"),
        "foreign": ([*good[:-1], foreign[-1]], invalid, "belongs to another entry"),
        "corrupted": ([*good[:-1], bytes(corrupted)], invalid, "checksum"),
        "oversized frame": ([good[0], b"DKVF" + bytes(5 * MiB)], invalid, "frame limit"),
        "oversized message": ([good[0], bytes(9 * MiB)], exhausted, "larger than max"),
        "entry over the limit": (too_big, exhausted, "over the limit"),
        "good": (good, None, ""),
    }


@pytest.mark.timeout(120)
def test_broken_put_streams_get_the_right_status_and_store_nothing(store_process):
    store = store_process("--cpu-bytes", "64MiB", "--max-entry-bytes", "8MiB", "--log-level", "warning")
    cases = broken_streams()
    good, _, _ = cases.pop("good")
    small = entry_of(64, heads=2, seed=4)
    channel, put = raw_put(store.address)
    with channel, StoreClient(store.address, timeout_s=30) as client:
        client.put(small)  # something stored, to see that nothing else is
        before = client.stats()
        for name, (frames, code, words) in cases.items():
            err, _ = call_error(put, iter(frames), 30)
            assert err.code() == code and words in err.details(), (name, err.code(), err.details())
            stats = client.stats()
            assert (stats.entries, stats.puts) == (before.entries, before.puts), f"{name}: something was stored"
            assert [t.used_bytes for t in stats.tiers] == [t.used_bytes for t in before.tiers], name
        # every refusal is counted (gRPC itself refuses the oversized message; counted today, not required)
        assert client.stats().rejected_puts - before.rejected_puts >= len(cases) - 1
        assert_same_entry(client.get(small.key), small)
        assert client.put_frames(good).tier == "cpu"  # and it still takes good entries


@pytest.mark.timeout(180)
def test_memory_returns_to_baseline_after_50_refused_multi_mb_puts(store_process):
    """Puts refused once their whole payload has arrived (3-5 MB each): after a warm-up of each kind,
    50 more must leave the store process's RSS within 64 MiB of where it was."""
    store = store_process("--cpu-bytes", "64MiB", "--max-entry-bytes", "8MiB", "--log-level", "warning")
    cases = broken_streams()
    kinds = [cases[name] for name in ("truncated", "foreign", "corrupted", "oversized frame")]
    channel, put = raw_put(store.address)
    with channel:

        def refuse(frames, code, words) -> None:
            err, _ = call_error(put, iter(frames), 30)
            assert err.code() == code and words in err.details(), (err.code(), err.details())

        for kind in kinds:  # the allocator and gRPC's buffers reach their working size
            refuse(*kind)
        baseline = store.rss_bytes()
        start = time.monotonic()
        count = 52
        for i in range(count):
            refuse(*kinds[i % len(kinds)])
        took = time.monotonic() - start
        grown = store.rss_bytes() - baseline
    sent = sum(sum(map(len, kinds[i % len(kinds)][0])) for i in range(count))
    print(
        f"[measured] {count} refused Puts ({sent / 1e6:.0f} MB) in {took:.1f} s; "
        f"store RSS {baseline / MiB:.0f} MiB -> {(baseline + grown) / MiB:.0f} MiB"
    )
    assert grown < 64 * MiB, f"the store's RSS grew by {grown / MiB:.0f} MiB over {count} refused Puts"
    with StoreClient(store.address, timeout_s=30) as client:
        assert client.stats().entries == 0
