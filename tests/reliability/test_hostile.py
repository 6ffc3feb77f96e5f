"""Hostile clients and sick dependencies (issue 14): one test per scenario, named after it.

1. a Lookup bomb (chunk_size 1, 4M token ids) is refused at once; health and other clients'
   Gets stay fast; the store's memory barely moves;
2. slow Put streams announcing 1 GB entries: past the bytes-in-flight budget and the stream cap
   they are refused, idle ones are aborted, memory stays bounded, others are served;
3. tenant beta Putting an entry labelled acme is denied on its header, before 8 MiB arrived;
   beta's Stats show beta only;
4. a tenant filling its quota with tiny entries that claim long contexts: it is refused, and
   another tenant's entries still land in the fast tier;
5. Redis evicting manifests, then the index and the byte counter, under load: misses, never
   errors; the audit repairs the counter and new Puts fit;
6. Redis stalled (packets held, no RST) under load: host-tier Gets stay fast, Puts that need
   Redis are UNAVAILABLE within 3 s, everything recovers;
8. an entry forged straight into Redis, replies swapped by a proxy, chunk keys out of order:
   never served;
9. the chart installs with auth on, a Redis password, and ``dkv config show`` masks them.

(Scenario 7, cancellation of decodes, belongs to the decode rewrite of issue 12.)

Each prints a ``[figures]`` line (requests tried, refused, served, recovered, wrong) for
docs/reliability.md. Loopback only, real redis-server and store processes, synthetic entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import redis
from bad_input_fixtures import make_frame
from fault_proxy import FaultProxy
from helm_chart import FULL, env, pod_env, render, render_raw
from test_faults import (
    InThread,
    assert_same_entry,
    call_error,
    entry_of,
    health,
    in_process_store,
    one_torch_thread,  # noqa: F401  an autouse fixture: imported, it applies here too
    redis_state,
    same_entry,
    store_process,  # noqa: F401  a fixture
    wait_for,
)

from dkv.kvstore import codec
from dkv.kvstore.codec import FRAME_HEAD_BYTES, KIND_DATA, KIND_HEADER, MAX_FRAME_BYTES
from dkv.kvstore.entry import FORMAT_VERSION, Identity, Recipe
from dkv.kvstore.mac import EntryMac
from dkv.kvstore.prefix import chain_hashes, check_chain
from dkv.kvstore.redis_tier import RedisTier
from dkv.services.pb import common_pb2, store_pb2
from dkv.services.settings import StoreSettings
from dkv.services.store_client import StoreClient
from dkv.services.store_server import SERVICE
from dkv.services.transport import Security
from dkv.services.wire import frame_message, parse_frame_message
from dkv.testing import synthetic_entry

MiB = 1 << 20
SERVING = 1
C = grpc.StatusCode
SERVICE_TOKEN, TENANT_TOKENS = "svc-token", "acme=acme-token,beta=beta-token"

pytestmark = pytest.mark.slow


def figures(scenario: int, **counts: int) -> None:
    """The line docs/reliability.md quotes (wrong is asserted 0 by every test)."""
    print(f"[figures] scenario {scenario}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def raw_stub(address: str, method: str, token: str = ""):
    """A bytes-in, bytes-out stub of a store method, and its channel (no client-side limit on what it sends)."""
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    )
    kind = channel.stream_unary if method == "Put" else channel.unary_unary
    stub = kind(f"/{SERVICE}/{method}")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return channel, lambda request, timeout=30.0: stub(request, timeout=timeout, metadata=metadata)


def claimed_entry(data_bytes: int, tenant: str = "default", seed: int = 0) -> tuple[bytes, bytes, int, int]:
    """(header frame, entry id, frames in all, data bytes) of an entry whose header announces about
    ``data_bytes`` of one fp16 layer (one KV head, head dim 64): consistent, so only its size,
    tenant and data are wrong. Its data frames come from ``data_frame``."""
    rows = data_bytes // 280  # positions 4 + scores 4 + keys 128 + values 128 + page min/max 16 per row
    pages = -(-rows // 16)
    specs, offset = [], 0
    for name, dtype, shape, itemsize in (
        ("positions", "int32", [rows], 4),
        ("head_offsets", "int32", [2], 4),
        ("scores", "float32", [rows], 4),
        ("page_min", "float16", [pages, 64], 2),
        ("page_max", "float16", [pages, 64], 2),
        ("keys", "float16", [rows, 64], 2),
        ("values", "float16", [rows, 64], 2),
    ):
        n = itemsize
        for d in shape:
            n *= d
        specs.append([0, name, dtype, shape, offset, n])
        offset += n
    recipe = Recipe(method="full", chunk_size=1 << 16)
    tokens = [random.Random(seed).randrange(49152) for _ in range(8)]
    hashes = chain_hashes(tokens, recipe.chunk_size, "synthetic-model", recipe.recipe_id)
    hashes += [
        hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).hexdigest() for i in range(-(-rows // (1 << 16)) - 1)
    ]
    header = {
        "format_version": FORMAT_VERSION,
        "identity": {
            "tenant": tenant,
            "model_fingerprint": "synthetic-model",
            "recipe": recipe.to_dict(),
            "chunk_hashes": hashes,
            "seq_len": rows,
            "start": 0,
        },
        "num_layers": 1,
        "num_kv_heads": 1,
        "head_dim": 64,
        "page_size": 16,
        "importance": 1.0,
        "derived": [],
        "tensors": specs,
        "data_bytes": offset,
        "data_xxh3": "0" * 32,
    }
    payload = json.dumps(header, separators=(",", ":")).encode()
    entry_id = hashlib.blake2b(payload, digest_size=8).digest()
    total = 1 + -(-offset // (MAX_FRAME_BYTES - FRAME_HEAD_BYTES))
    frame = make_frame(KIND_HEADER, entry_id, 0, total, payload)
    codec.parse_header(frame)  # what the store will accept as a header
    return frame, entry_id, total, offset


def data_frame(entry_id: bytes, seq: int, total: int) -> bytes:
    return make_frame(KIND_DATA, entry_id, seq, total, bytes(MAX_FRAME_BYTES - FRAME_HEAD_BYTES))


class Latencies:
    """Calls made again and again in a thread, each one's seconds and outcome kept."""

    def __init__(self, call, interval_s: float = 0.01):
        self.call, self.interval_s = call, interval_s
        self.seconds, self.errors = [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.call()
            except Exception as e:
                self.errors.append(e)
            self.seconds.append(time.monotonic() - start)
            self.stop.wait(self.interval_s)

    def finish(self) -> list[float]:
        self.stop.set()
        self.thread.join(30)
        return sorted(self.seconds)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p99(values: list[float]) -> float:
    return quantile(values, 0.99)


def p95(values: list[float]) -> float:
    """What latency bounds are asserted on: this machine's 2 cores are shared with other jobs, whose
    bursts can delay any one call; a bound on the 95th percentile still fails a store that blocks."""
    return quantile(values, 0.95)


# -------------------------------------------------------------------------------- 1. Lookup bombs


@pytest.mark.timeout(180)
def test_1_a_lookup_bomb_is_refused_at_once_while_health_and_other_gets_stay_fast(store_process):
    store = store_process("--cpu-bytes", "64MiB", "--log-level", "warning")
    entry = entry_of(64, heads=2)

    def lookup(tokens, chunk_size: int) -> bytes:
        return store_pb2.LookupRequest(
            model_fingerprint="synthetic-model",
            token_ids=tokens,
            recipe=common_pb2.Recipe(method="full", chunk_size=chunk_size),
        ).SerializeToString()

    bomb_ids = [i % 100 for i in range(4 << 20)]  # ids under 128 take one byte each: 4 MiB, under the 8 MiB limit
    bombs = {
        "chunk_size 1, 4M ids": lookup(bomb_ids, 1),
        "chunk_size 16, 4M ids": lookup(bomb_ids, 16),
        "chunk_size 1, 1000 ids": lookup(bomb_ids[:1000], 1),
        "a Probe of 100k keys": store_pb2.ProbeRequest(keys=[str(entry.key)] * 100_000).SerializeToString(),
    }
    largest = lookup(list(range(1 << 17)), 16)  # the most a Lookup may ask: answered, its hashing off the event loop
    with StoreClient(store.address, timeout_s=30) as client:
        client.put(entry)
        assert_same_entry(client.get(entry.key), entry)
        lookup_channel, raw_lookup = raw_stub(store.address, "Lookup")
        probe_channel, raw_probe = raw_stub(store.address, "Probe")

        def bomb(what: str) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as info:
                (raw_probe if what.startswith("a Probe") else raw_lookup)(bombs[what])
            return info.value

        def check_health() -> None:
            assert health(store.address, timeout_s=5) == SERVING

        raw_lookup(largest)  # warm-up: gRPC's buffers and the allocator reach their working size
        for _ in range(5):
            for what in bombs:
                bomb(what)
        baseline = store.rss_bytes()
        gets, checks = Latencies(lambda: assert_same_entry(client.get(entry.key), entry)), Latencies(check_health)
        refused, took = [], []
        try:
            for _ in range(50):
                for what in bombs:
                    start = time.monotonic()
                    err = bomb(what)
                    took.append(time.monotonic() - start)
                    assert err.code() == C.INVALID_ARGUMENT, (what, err.details())
                    assert any(s in err.details() for s in ("max_lookup_tokens", "min_chunk_size")), err.details()
                    refused.append(what)
        finally:
            get_seconds, check_seconds = gets.finish(), checks.finish()
        grown = store.rss_bytes() - baseline
        # then the largest Lookup allowed, again and again: slower, but the event loop stays free
        checks = Latencies(check_health)
        try:
            largest_took = []
            for _ in range(10):
                start = time.monotonic()
                assert store_pb2.LookupResponse.FromString(raw_lookup(largest)).hit is False
                largest_took.append(time.monotonic() - start)
        finally:
            beside_largest = checks.finish()
            lookup_channel.close()
            probe_channel.close()
    assert not gets.errors and not checks.errors, (gets.errors[:2], checks.errors[:2])
    print(
        f"[measured] {len(refused)} bombs refused in {min(took) * 1e3:.1f} ms (p95 {p95(took) * 1e3:.1f}, max "
        f"{max(took) * 1e3:.1f} ms); meanwhile {len(get_seconds)} Gets (p95 {p95(get_seconds) * 1e3:.0f}, max "
        f"{get_seconds[-1] * 1e3:.0f} ms) and {len(check_seconds)} health checks (p95 {p95(check_seconds) * 1e3:.0f}, max "
        f"{check_seconds[-1] * 1e3:.0f} ms); store RSS {grown / MiB:+.1f} MiB. The largest allowed Lookup (131072 ids): "
        f"{min(largest_took) * 1e3:.0f}-{max(largest_took) * 1e3:.0f} ms, health checks beside it p95 "
        f"{p95(beside_largest) * 1e3:.0f} ms"
    )
    figures(
        1,
        tried=len(refused) + len(get_seconds) + len(check_seconds),
        refused=len(refused),
        served=len(get_seconds) + len(check_seconds),
        wrong=0,
    )
    assert p95(took) < 0.1, f"bombs took {p95(took) * 1e3:.0f} ms (p95) to refuse"
    assert p95(get_seconds) < 0.2 and p95(check_seconds) < 0.2 and p95(beside_largest) < 0.2
    assert grown < 64 * MiB


# ---------------------------------------------------------------------------- 2. slow Put streams


@pytest.mark.timeout(180)
def test_2_slow_put_streams_are_refused_past_the_budget_aborted_when_idle_and_others_are_served(store_process):
    store = store_process(
        "--cpu-bytes",
        "2GiB",
        "--max-entry-bytes",
        "1GiB",
        "--put-bytes-in-flight",
        "2560MiB",
        "--max-put-streams",
        "16",
        "--put-idle-timeout-s",
        "3",
        "--log-level",
        "warning",
    )
    release = threading.Event()

    def slow_put(seed: int, send_header: bool = True):
        """A Put announcing a ~1 GB entry, then a data frame every 10 s."""
        header, entry_id, total, _ = claimed_entry(10**9, seed=seed)
        channel, put = raw_stub(store.address, "Put")

        def frames():
            if send_header:
                yield frame_message(header)
            for seq in range(1, total):
                if release.wait(10):
                    return
                yield frame_message(data_frame(entry_id, seq, total))

        try:
            put(frames(), timeout=60)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code(), e.details()
        finally:
            channel.close()

    others = [entry_of(256, heads=2, seed=i) for i in range(6)]
    with StoreClient(store.address, timeout_s=30) as client:
        client.put(others[0])
        baseline = store.rss_bytes()
        served = Latencies(lambda: assert_same_entry(client.get(others[0].key), others[0]), interval_s=0.05)
        try:
            streams = [InThread(slow_put, i) for i in range(20)]
            wait_for(lambda: sum(s.ended_at is not None for s in streams) >= 18, 20, "the refusals")
            rss_during = store.rss_bytes()
            for other in others[1:]:  # Puts of others still fit beside the two streams holding 2 GB
                assert client.put(other).tier == "cpu"
                assert_same_entry(client.get(other.key), other)
            assert sum(s.ended_at is None for s in streams) == 2, "others were served only once the idle ones were gone"
            outcomes = [s.result(30) for s in streams]
            # streams that never send their header count against max_put_streams until they idle out too
            silent = [InThread(slow_put, 100 + i, False) for i in range(16)]
            time.sleep(1)
            capped = slow_put(999)
            silent_outcomes = [s.result(30) for s in silent]
            assert client.put(entry_of(64, heads=2, seed=77)).tier == "cpu"  # the slots came back
        finally:
            release.set()
            get_seconds = served.finish()
        grown = max(rss_during, store.rss_bytes()) - baseline
        stats = client.stats()
    codes = [code for code, _ in outcomes]
    exhausted = [d for code, d in outcomes if code == C.RESOURCE_EXHAUSTED]
    idle = [d for code, d in outcomes if code == C.DEADLINE_EXCEEDED]
    print(
        f"[measured] 20 streams announcing 1 GB: {len(exhausted)} RESOURCE_EXHAUSTED, {len(idle)} aborted idle; "
        f"stream 17 of 16 silent ones: {capped[0].name}; store RSS {grown / MiB:+.1f} MiB; {len(get_seconds)} Gets "
        f"served meanwhile (max {max(get_seconds) * 1e3:.0f} ms)"
    )
    figures(
        2,
        tried=20 + 16 + 1 + len(others) - 1 + len(get_seconds),
        refused=len(exhausted) + 1,
        aborted=len(idle) + len(silent_outcomes),
        served=len(others) - 1 + len(get_seconds),
        wrong=0,
    )
    assert len(exhausted) == 18 and all("put_bytes_in_flight" in d or "max_put_streams" in d for d in exhausted), codes
    assert len(idle) == 2 and all("no frame for 3 s" in d for d in idle), codes
    assert capped[0] == C.RESOURCE_EXHAUSTED and "max_put_streams" in capped[1], capped
    assert [code for code, _ in silent_outcomes] == [C.DEADLINE_EXCEEDED] * 16
    assert not served.errors and grown < 64 * MiB
    assert stats.entries == len(others) + 1 and stats.rejected_puts == 18 + 2 + 1 + 16


# ------------------------------------------------------------------- 3. another tenant's header


@pytest.mark.timeout(120)
def test_3_a_put_labelled_for_another_tenant_is_denied_on_its_header_and_stats_show_only_the_caller(store_service):
    server = in_process_store(store_service, cpu_bytes=512 * MiB, auth_token=SERVICE_TOKEN, tenant_tokens=TENANT_TOKENS)
    header, entry_id, total, data_bytes = claimed_entry(100 * MiB, tenant="acme")
    assert total > 25
    sent = []

    def frames():
        yield frame_message(header)
        for seq in range(1, total):
            sent.append(seq)
            yield frame_message(data_frame(entry_id, seq, total))

    mine = entry_of(256, heads=2, seed=1, tenant="beta")
    theirs = [entry_of(256, heads=2, seed=2 + i, tenant="acme") for i in range(2)]
    with (
        StoreClient(server.address, security=Security("acme-token")) as acme,
        StoreClient(server.address, security=Security("beta-token")) as beta,
        StoreClient(server.address, security=Security(SERVICE_TOKEN)) as admin,
    ):
        beta.put(mine)
        for entry in theirs:
            acme.put(entry)
        before = admin.stats()
        with FaultProxy(server.address) as proxy:
            channel, put = raw_stub(proxy.address, "Put", "beta-token")
            with channel:
                err, took = call_error(put, frames())
        after, beta_view, acme_view = admin.stats(), beta.stats(), acme.stats()
    print(
        f"[measured] beta's Put of a {data_bytes / MiB:.0f} MiB acme entry: {err.code().name} after {took * 1e3:.0f} ms, "
        f"{proxy.bytes_up / 1024:.0f} KiB reached the store ({len(sent)} data frames taken from the client)"
    )
    figures(3, tried=1 + 3, refused=1, served=3, wrong=0)
    assert err.code() == C.PERMISSION_DENIED and "acts for tenant 'beta', not 'acme'" in err.details()
    assert proxy.bytes_up < 8 * MiB
    assert (after.entries, after.puts, [t.used_bytes for t in after.tiers]) == (
        before.entries,
        before.puts,
        [t.used_bytes for t in before.tiers],
    )
    # beta sees beta: its one entry, its bytes, its refused Put; nothing of acme's
    assert (beta_view.tenant, beta_view.entries, beta_view.puts, beta_view.rejected_puts) == ("beta", 1, 1, 1)
    assert beta_view.tiers[0].used_bytes == after.tenants[1].tiers[0].used_bytes and not beta_view.tenants
    assert (acme_view.tenant, acme_view.entries, acme_view.puts, acme_view.rejected_puts) == ("acme", 2, 2, 0)
    assert after.tenant == "" and [v.tenant for v in after.tenants] == ["acme", "beta"] and after.entries == 3


# ------------------------------------------------------------------------------- 4. tenant quotas


def claiming_entries(n: int, tenant: str) -> list[list[bytes]]:
    """``n`` entries of ~30 KB each claiming 65536 tokens over 64 layers (one token kept per layer,
    one narrow KV head): the frames of one such entry under ``n`` different contexts."""
    template = synthetic_entry(
        seq_len=1 << 16,
        keep_fraction=1 / (1 << 16),
        num_layers=64,
        num_kv_heads=1,
        head_dim=4,
        page_size=16,
        seed=0,
        tenant=tenant,
    )
    recipe = template.identity.recipe
    out = []
    for i in range(n):
        tokens = (np.arange(1 << 16) * 3 + i * 7919) % 49152
        hashes = tuple(chain_hashes(tokens, recipe.chunk_size, "synthetic-model", recipe.recipe_id))
        out.append(
            codec.encode(template.replace(identity=Identity("synthetic-model", recipe, hashes, 1 << 16, tenant)))
        )
    return out


@pytest.mark.timeout(300)
def test_4_a_tenant_filling_its_quota_with_inflated_claims_is_refused_and_cannot_squat_the_fast_tier(store_service):
    server = in_process_store(
        store_service,
        device="cpu",
        device_bytes=8 * MiB,
        cpu_bytes=32 * MiB,
        tenant_device_bytes=2 * MiB,
        tenant_cpu_bytes=8 * MiB,
        auth_token=SERVICE_TOKEN,
        tenant_tokens=TENANT_TOKENS,
    )
    hostile = claiming_entries(1000, "acme")
    honest = [entry_of(64, heads=2, seed=i, tenant="beta") for i in range(12)]  # 0.15 MB each, fp16, uncompressed
    outcomes = {"ok": 0, C.RESOURCE_EXHAUSTED: 0}
    with (
        StoreClient(server.address, security=Security("acme-token")) as acme,
        StoreClient(server.address, security=Security("beta-token")) as beta,
    ):
        for frames in hostile:
            try:
                acme.put_frames(frames)
                outcomes["ok"] += 1
            except grpc.RpcError as e:
                assert e.code() == C.RESOURCE_EXHAUSTED and "at its quota" in e.details(), e.details()
                outcomes[C.RESOURCE_EXHAUSTED] += 1
        tiers = [beta.put(entry).tier for entry in honest]
        for entry in honest[-4:]:
            assert_same_entry(beta.get(entry.key), entry)
        acme_view, beta_view = acme.stats(), beta.stats()
    store = server.server.store
    claimed = [store._entries[k].stats for k in store._entries if k.tenant == "acme"]
    print(
        f"[measured] acme: {outcomes['ok']} entries stored, {outcomes[C.RESOURCE_EXHAUSTED]} RESOURCE_EXHAUSTED; "
        f"bytes held {[t.used_bytes for t in acme_view.tiers]} of quotas {[t.quota_bytes for t in acme_view.tiers]}; "
        f"beta's {len(honest)} entries: {tiers.count('device')} in the fast tier; an acme entry ranked as "
        f"{claimed[0].seq_len} tokens x {claimed[0].num_layers} layers (claims 65536 x 64)"
    )
    figures(
        4,
        tried=len(hostile) + len(honest),
        refused=outcomes[C.RESOURCE_EXHAUSTED],
        served=outcomes["ok"] + len(honest),
        wrong=0,
    )
    assert outcomes["ok"] > 100 and outcomes[C.RESOURCE_EXHAUSTED] > 100
    assert acme_view.over_quota == outcomes[C.RESOURCE_EXHAUSTED]
    assert all(t.used_bytes <= t.quota_bytes for t in acme_view.tiers) and not acme_view.tenants
    assert tiers == ["device"] * len(honest)  # every new entry of beta is admitted to the fast tier
    assert beta_view.tiers[0].entries == len(honest) and beta_view.over_quota == 0
    assert all(s.seq_len < 1 << 16 for s in claimed)


# --------------------------------------------------------------------- 5. Redis drift under load


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_5_redis_evicting_manifests_then_index_and_counter_under_load_misses_never_errors_and_is_repaired(
    store_service, redis_url
):
    entries = [entry_of(512, heads=2, seed=i, token_ids=list(range(1000 * i, 1000 * i + 512))) for i in range(24)]
    size = sum(map(len, codec.encode(entries[0])))  # 1.15 MB
    server = in_process_store(
        store_service, cpu_bytes=3 * size, redis_url=redis_url, redis_bytes=20 * size, audit_interval_s=1
    )
    r = redis.Redis.from_url(redis_url, socket_timeout=5)
    stop = threading.Event()
    log = {"puts": 0, "gets": 0, "hits": 0, "misses": 0, "errors": [], "wrong": []}
    lock = threading.Lock()

    def load(w: int) -> None:
        rng = random.Random(w)
        with StoreClient(server.address, timeout_s=30) as client:
            while not stop.is_set():
                i = rng.randrange(len(entries))
                try:
                    if rng.random() < 0.3:
                        client.put(entries[i])
                        with lock:
                            log["puts"] += 1
                        continue
                    got = client.get(entries[i].key)
                except grpc.RpcError as e:
                    with lock:
                        log["errors"].append((e.code(), e.details()))
                    continue
                with lock:
                    log["gets"] += 1
                    log["hits" if got is not None else "misses"] += 1
                    if got is not None and not same_entry(got, entries[i]):
                        log["wrong"].append(i)

    with StoreClient(server.address, timeout_s=30) as client:
        for entry in entries[:16]:
            client.put(entry)
        assert sum(t.name == "redis" and t.entries for t in client.stats().tiers) >= 10
        workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(3)]
        for t in workers:
            t.start()
        try:
            time.sleep(1)
            manifests = sorted(r.scan_iter(match="dkv:m:*"))
            evicted = manifests[: len(manifests) // 2]
            r.delete(*evicted)  # what allkeys-lru does to cold manifests
            time.sleep(1)
            r.delete("{dkv:}used", "{dkv:}index", "{dkv:}versions")  # and then to the bookkeeping itself
            time.sleep(2.5)  # the load goes on; the store audits every second
        finally:
            stop.set()
            for t in workers:
                t.join(30)
        server.server.store.audit()  # one more, now that no write is under way
        index = redis_state(r)  # consistent: manifests == index, data keys whole, used == sum(index)
        assert index.keys() == {k.decode() for k in r.hkeys("{dkv:}index")}  # every published entry counted
        really = sum(int(r.strlen(k)) for k in r.scan_iter(match="dkv:d:*") if r.ttl(k) == -1)
        stats = client.stats()
        (redis_tier,) = [t for t in stats.tiers if t.name == "redis"]
        assert int(r.get("{dkv:}used") or 0) == really == sum(index.values()) == redis_tier.used_bytes
        # new Puts fit: the tier is not full of entries that are gone
        fresh = [
            entry_of(512, heads=2, seed=100 + i, token_ids=list(range(90_000 + 1000 * i, 90_000 + 1000 * i + 512)))
            for i in range(12)
        ]
        placed = [client.put(e).tier for e in fresh]
        for e in fresh[:4]:
            got = client.get(e.key)
            assert got is None or same_entry(got, e)
        recovered = sum(client.get(e.key) is not None for e in entries)
    r.close()
    print(
        f"[measured] {len(evicted)} manifests, then index, versions and used deleted under load: {log['gets']} Gets "
        f"({log['hits']} hits, {log['misses']} misses), {log['puts']} Puts, {len(log['errors'])} errors; after the "
        f"audit used = {really} B = what Redis holds; {stats.lost} entries found lost; 12 new Puts: {placed}; "
        f"{recovered} of the {len(entries)} entries still served"
    )
    figures(
        5,
        tried=log["gets"] + log["puts"] + len(fresh),
        refused=len(log["errors"]),
        served=log["gets"] + log["puts"] + len(fresh),
        recovered=len(placed),
        wrong=len(log["wrong"]),
    )
    assert not log["errors"], log["errors"][:3]
    assert not log["wrong"]
    assert log["misses"] > 0 and log["hits"] > 0 and stats.lost > 0
    assert placed.count("redis") + placed.count("cpu") == len(fresh)


# ------------------------------------------------------------------------------- 6. Redis stalled


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_6_a_stalled_redis_slows_only_what_needs_redis_and_everything_recovers(store_process, fresh_redis):
    small = [entry_of(64, heads=2, seed=i) for i in range(4)]  # 0.15 MB each: the host tier
    big = [entry_of(1024, seed=10 + i) for i in range(4)]  # 4.6 MB each: larger than the host tier, Redis only
    big_frames = [codec.encode(e) for e in big]  # encoded up front: the client's own work stays out of the timings
    with FaultProxy(f"127.0.0.1:{fresh_redis.port}") as proxy:
        store = store_process(
            "--cpu-bytes", "4MiB", "--redis-url", f"redis://{proxy.address}/0", "--log-level", "warning"
        )
        with StoreClient(store.address, timeout_s=30) as client:
            for e in small:
                assert client.put(e).tier == "cpu"
            assert client.put_frames(big_frames[0]).tier == "redis"
            host_gets = Latencies(lambda: [assert_same_entry(client.get(e.key), e) for e in small[:2]], interval_s=0.02)
            try:
                time.sleep(1)
                proxy.set(stalled=True)  # packets held, connections open: no RST, no FIN
                stalled_at = time.monotonic()
                redis_get = client.get(big[0].key)  # a miss once the tier times out, never an error
                refused = []
                for frames in big_frames[1:]:
                    err, took = call_error(client.put_frames, frames)
                    refused.append((err.code(), took))
                    time.sleep(0.5)
                time.sleep(1)
                during = [s for s in host_gets.seconds]
                proxy.clear()
                cleared_at = time.monotonic()
                recovered = wait_for(
                    lambda: _put_ok(client, big_frames[1]), 20, "a Put into Redis after the stall", 0.2
                )
                back = time.monotonic() - cleared_at
            finally:
                host_gets.finish()
            assert_same_entry(client.get(big[1].key), big[1])
            assert_same_entry(client.get(big[0].key), big[0])  # missed during the stall, not forgotten
            for e in small:
                assert_same_entry(client.get(e.key), e)
    print(
        f"[measured] Redis stalled for {cleared_at - stalled_at:.1f} s: host-tier Gets p95 {p95(during) * 1e3:.0f} ms, "
        f"p99 {p99(during) * 1e3:.0f} ms, max {max(during) * 1e3:.0f} ms over {len(during)}; Puts needing Redis: "
        f"{[(c.name, round(t, 2)) for c, t in refused]}; Redis Get: {'miss' if redis_get is None else 'hit'}; "
        f"Puts into Redis work again {back:.1f} s after the stall"
    )
    figures(
        6,
        tried=len(host_gets.seconds) + len(refused) + 1,
        refused=len(refused),
        served=len(host_gets.seconds),
        recovered=int(recovered),
        wrong=0,
    )
    assert not host_gets.errors, host_gets.errors[:2]
    assert p95(during) < 0.1
    assert all(code == C.UNAVAILABLE and took < 3 for code, took in refused), refused
    assert redis_get is None or same_entry(redis_get, big[0])


def _put_ok(client: StoreClient, frames) -> bool:
    try:
        return client.put_frames(frames).tier == "redis"
    except grpc.RpcError as e:
        assert e.code() == C.UNAVAILABLE, e.details()
        return False


# ------------------------------------------------------------------ 8. forged and swapped entries


class SwappingProxy:
    """A store in the middle that answers every Get, Summaries and Select with those of another
    entry: replies that pass every check of their own, for the wrong key."""

    def __init__(self, store_address: str, swap: dict[str, str]):
        self.upstream = grpc.insecure_channel(store_address)
        self.swap = swap
        self._get_upstream = self.upstream.unary_stream(f"/{SERVICE}/Get")
        self._summaries_upstream = self.upstream.unary_stream(f"/{SERVICE}/Summaries")
        self._select_upstream = self.upstream.unary_stream(f"/{SERVICE}/Select")
        handlers = {
            "Get": grpc.unary_stream_rpc_method_handler(
                self._get, request_deserializer=store_pb2.GetRequest.FromString, response_serializer=frame_message
            ),
            "Summaries": grpc.unary_stream_rpc_method_handler(
                self._summaries,
                request_deserializer=store_pb2.GetRequest.FromString,
                response_serializer=store_pb2.LayerSummary.SerializeToString,
            ),
            "Select": grpc.unary_stream_rpc_method_handler(
                self._select,
                request_deserializer=store_pb2.SelectRequest.FromString,
                response_serializer=store_pb2.LayerPages.SerializeToString,
            ),
        }
        self.server = grpc.server(ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def _get(self, request, context):
        for message in self._get_upstream(store_pb2.GetRequest(key=self.swap[request.key]).SerializeToString()):
            yield parse_frame_message(message)

    def _summaries(self, request, context):
        for message in self._summaries_upstream(store_pb2.GetRequest(key=self.swap[request.key]).SerializeToString()):
            yield store_pb2.LayerSummary.FromString(message)

    def _select(self, request, context):
        swapped = store_pb2.SelectRequest(key=self.swap[request.key], layer=request.layer, pages=request.pages)
        for message in self._select_upstream(swapped.SerializeToString()):
            yield store_pb2.LayerPages.FromString(message)

    def close(self) -> None:
        self.server.stop(0)
        self.upstream.close()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_8_forged_swapped_and_out_of_order_entries_are_never_served(store_service, redis_url):
    secret = "cluster-secret-of-this-test"
    server = in_process_store(store_service, cpu_bytes=1 * MiB, redis_url=redis_url, cluster_secret=secret)
    tokens = list(range(2000, 2000 + 512))
    genuine = entry_of(512, heads=2, seed=1, token_ids=tokens)
    forgery = entry_of(512, heads=2, seed=2, token_ids=tokens)  # the same key, other tensors
    other = entry_of(512, heads=2, seed=3, token_ids=list(range(9000, 9512)))
    assert genuine.key == forgery.key and not same_entry(genuine, forgery)
    tried = refused = 0
    with StoreClient(server.address, timeout_s=30) as client:
        for e in (genuine, other):
            assert client.put(e).tier == "redis"
        # someone with write access to Redis but not the secret replaces the entry: valid frames,
        # every unkeyed checksum right, no MAC (or a MAC under another secret)
        for forger_mac in (None, EntryMac("a guess")):
            forger = RedisTier("redis", 1 << 30, redis_url, mac=forger_mac)
            forger.put(genuine.key, codec.encode(forgery))
            forger.close()
            tried += 1
            got = client.get(genuine.key)
            assert got is None, "a forged entry was served"
            refused += 1
            client.put(genuine)  # written again by the store: served again
            assert_same_entry(client.get(genuine.key), genuine)
        failures = client.stats().checksum_failures
        # a store restarted over a forged Redis adopts the entry from its header, and refuses it on read
        forger = RedisTier("redis", 1 << 30, redis_url)
        forger.put(genuine.key, codec.encode(forgery))
        forger.close()
    restarted = in_process_store(store_service, cpu_bytes=1 * MiB, redis_url=redis_url, cluster_secret=secret)
    with StoreClient(restarted.address, timeout_s=30) as client:
        assert client.stats().entries == 2
        tried += 1
        assert client.get(genuine.key) is None
        refused += 1
        assert_same_entry(client.get(other.key), other)
        # a proxy that swaps replies: whole, valid entries and pages, of another key
        client.put(genuine)
        proxy = SwappingProxy(restarted.address, {str(genuine.key): str(other.key), str(other.key): str(genuine.key)})
        try:
            with StoreClient(proxy.address, timeout_s=30) as swapped:
                for call in (
                    lambda: swapped.get(genuine.key),
                    lambda: swapped.summaries(genuine.key),
                    lambda: swapped.select(genuine.key, 0, [0, 1]),
                ):
                    tried += 1
                    assert call() is None, "a reply for another key was taken for this one"
                    refused += 1
            direct_summaries = client.summaries(genuine.key)
            assert direct_summaries is not None and len(direct_summaries) == genuine.num_layers
            assert client.select(genuine.key, 0, [0, 1]) is not None
        finally:
            proxy.close()
    # chunk entries given out of order (or with a gap) are refused before any decoding
    recipe = Recipe(method="full", chunk_size=256, chunked=True)
    context = list(range(3000, 3000 + 768))
    hashes = chain_hashes(context, 256, "synthetic-model", recipe.recipe_id)
    chunks = [
        Identity("synthetic-model", recipe, tuple(hashes[: c + 1]), min(256 * (c + 1), 768), "default", 256 * c)
        for c in range(3)
    ]
    check_chain(chunks)
    for order in ([1, 0, 2], [0, 2, 1], [0, 2]):
        tried += 1
        with pytest.raises(ValueError, match="consecutive|not 0"):
            check_chain([chunks[i] for i in order])
        refused += 1
    print(
        f"[measured] forged entries: {failures} checksum/MAC failures counted, each a miss; swapped replies: "
        f"3 of 3 misses; chunk orders refused: 3 of 3"
    )
    figures(8, tried=tried, refused=refused, served=0, wrong=0)
    assert failures >= 2


# ----------------------------------------------------------------------- 9. the chart's defaults


@pytest.mark.timeout(120)
def test_9_the_chart_installs_with_auth_and_a_redis_password_and_config_show_masks_them(tmp_path):
    docs = render()
    for component in ("store", "prefill", "decode", "gateway"):
        token = env(docs, component)[f"DKV_{component.upper()}_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": f"{FULL}-auth", "key": "token"}, component
    redis_args = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{FULL}-redis"][0]["spec"][
        "template"
    ]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    notes = render_raw()["dkv/templates/NOTES.txt"]
    assert f"kubectl -n ml get secret {FULL}-auth -o jsonpath='{{.data.token}}' | base64 -d" in notes
    # what the store process would see, Secrets filled in, and what `dkv config show store` prints of it
    secrets = {"token": "tok-3f9a1c", "cluster-secret": "mac-7d2e44", "redis-password": "pw-58b0e1"}
    process_env = pod_env(docs, "store", secrets)
    assert process_env["DKV_STORE_REDIS_URL"] == f"redis://:pw-58b0e1@{FULL}-redis:6379/0"
    shown = subprocess.run(
        [sys.executable, "-m", "dkv", "config", "show", "store"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **process_env},
    )
    assert shown.returncode == 0, shown.stderr
    settings = json.loads(shown.stdout)
    assert settings["redis_url"] == f"redis://:***@{FULL}-redis:6379/0"
    assert settings["auth_token"] == settings["cluster_secret"] == "***"
    assert not any(value in shown.stdout + shown.stderr for value in secrets.values())
    assert (
        StoreSettings(
            **{**settings, "redis_url": process_env["DKV_STORE_REDIS_URL"], "auth_token": "t", "cluster_secret": "s"}
        ).max_entry_bytes
        == 256 * MiB
    )  # the chart's, as the store loads them
    figures(9, tried=3, refused=0, served=3, wrong=0)
