"""Operations over real gRPC on loopback: bearer tokens, tenants, TLS and mutual TLS, metrics, logs."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.services.logs import JsonFormatter, RequestIdFilter
from dkv.services.settings import StoreSettings
from dkv.services.store_client import StoreClient
from dkv.services.transport import Security, free_port, open_channel
from dkv.testing import synthetic_entry

pytestmark = pytest.mark.timeout(120)

SERVICE_TOKEN = "svc-secret"
TENANTS = "acme=acme-secret,beta=beta-secret"


def code_of(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value.code(), info.value.details()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {"name{labels}": value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_calls_need_a_token_and_tenants_stay_in_their_namespace(store_service):
    server = store_service(
        StoreSettings(
            port=0, cpu_bytes=64 << 20, auth_token=SERVICE_TOKEN, tenant_tokens=TENANTS, metrics_port=free_port()
        )
    )
    acme_entry = synthetic_entry(tenant="acme", seed=1, token_ids=list(range(64)))
    beta_entry = synthetic_entry(seq_len=64, tenant="beta", seed=2)
    with (
        StoreClient(server.address) as anonymous,
        StoreClient(server.address, security=Security("wrong")) as forged,
        StoreClient(server.address, security=Security("acme-secret")) as acme,
        StoreClient(server.address, security=Security("beta-secret")) as beta,
        StoreClient(server.address, security=Security(SERVICE_TOKEN)) as service,
    ):
        code, why = code_of(anonymous.stats)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in why
        assert code_of(anonymous.put, acme_entry)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(forged.get, acme_entry.key)[0] == grpc.StatusCode.UNAUTHENTICATED
        with open_channel(server.address) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        key = acme.put(acme_entry).key
        assert acme.get(key) is not None and service.get(key) is not None
        code, why = code_of(beta.get, key)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'beta'" in why and "'acme'" in why
        assert code_of(beta.delete, key)[0] == grpc.StatusCode.PERMISSION_DENIED
        recipe = acme_entry.identity.recipe
        assert (
            code_of(beta.lookup, "synthetic-model", recipe, list(range(64)), "acme")[0]
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert beta.lookup("synthetic-model", recipe, list(range(64)), "") is None  # beta's own namespace
        assert acme.lookup("synthetic-model", recipe, list(range(64)), "").keys == [key]
        assert code_of(acme.put, beta_entry)[0] == grpc.StatusCode.PERMISSION_DENIED  # writing as another tenant
        assert service.stats().entries == 1  # the refused entry was not stored
        assert acme.get(key) is not None  # and nothing of acme's was lost

    samples = scrape(server.server.metrics_port)
    assert samples['dkv_rpc_duration_seconds_count{code="UNAUTHENTICATED",method="Stats",service="kvstore"}'] == 1
    assert samples['dkv_rpc_duration_seconds_count{code="PERMISSION_DENIED",method="Get",service="kvstore"}'] == 1
    assert samples['dkv_rpc_duration_seconds_count{code="OK",method="Put",service="kvstore"}'] == 1
    assert samples["dkv_store_puts_total"] == 1
    assert samples['dkv_store_used_bytes{tier="cpu"}'] > 0
    assert samples['dkv_store_capacity_bytes{tier="cpu"}'] == 64 << 20
    assert samples['dkv_store_hits_total{tier="cpu"}'] == 3


def test_metrics_move_with_traffic(store_service):
    server = store_service(StoreSettings(port=0, cpu_bytes=1 << 20, metrics_port=free_port()))
    port = server.server.metrics_port
    before = scrape(port)
    entries = [
        synthetic_entry(seq_len=256, num_layers=2, seed=i, token_ids=list(range(i * 1000, i * 1000 + 256)))
        for i in range(6)
    ]
    with StoreClient(server.address) as client:
        keys = [client.put(e).key for e in entries]  # 6 x 0.4 MiB into 1 MiB: evictions
        for key in keys:
            client.get(key)
        client.lookup("synthetic-model", entries[-1].identity.recipe, list(range(5000, 5256)))
        client.lookup("synthetic-model", entries[-1].identity.recipe, list(range(9000, 9256)))
    after = scrape(port)
    assert before["dkv_store_puts_total"] == 0 and after["dkv_store_puts_total"] == 6
    assert after["dkv_store_evictions_total"] > 0
    assert after["dkv_store_misses_total"] == after["dkv_store_evictions_total"]
    assert after['dkv_store_hits_total{tier="cpu"}'] == 6 - after["dkv_store_evictions_total"]
    assert after['dkv_store_lookups_total{tier="cpu"}'] == 1 and after['dkv_store_lookups_total{tier="miss"}'] == 1
    assert after['dkv_store_used_bytes{tier="cpu"}'] <= 1 << 20
    evicted = after["dkv_store_evictions_total"]
    assert after['dkv_rpc_duration_seconds_count{code="OK",method="Get",service="kvstore"}'] == 6 - evicted
    assert after['dkv_rpc_duration_seconds_count{code="NOT_FOUND",method="Get",service="kvstore"}'] == evicted


def test_tls_and_mutual_tls(store_service, pki):
    entry = synthetic_entry(seq_len=64, seed=3)
    tls = store_service(
        StoreSettings(port=0, cpu_bytes=16 << 20, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    )
    with StoreClient(f"127.0.0.1:{tls.port}", security=Security(tls_ca=pki["ca"])) as client:
        assert client.get(client.put(entry).key) is not None
    with StoreClient(f"127.0.0.1:{tls.port}", timeout_s=3) as plaintext:
        assert code_of(plaintext.stats)[0] == grpc.StatusCode.UNAVAILABLE

    mutual = store_service(
        StoreSettings(
            port=0, cpu_bytes=16 << 20, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"]
        )
    )
    with StoreClient(f"127.0.0.1:{mutual.port}", timeout_s=3, security=Security(tls_ca=pki["ca"])) as no_cert:
        assert code_of(no_cert.stats)[0] == grpc.StatusCode.UNAVAILABLE
    with StoreClient(
        f"127.0.0.1:{mutual.port}",
        security=Security(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"]),
    ) as client:
        assert client.get(client.put(entry).key) is not None


def test_logs_are_json_lines_with_the_request_id(store_service, caplog):
    server = store_service()
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="dkv.server")
    with open_channel(server.address) as channel:
        get = channel.unary_stream("/dkv.v1.KVStore/Get")
        with pytest.raises(grpc.RpcError):
            list(get(b"\x0a\x03a/b", metadata=(("x-request-id", "req-42"),), timeout=5))
    deadline = time.monotonic() + 10  # the server logs the call as it ends, maybe after the client saw it end
    while (
        not (records := [r for r in caplog.records if getattr(r, "rpc", "") == "Get"]) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert records and records[-1].request_id == "req-42" and records[-1].code == "INVALID_ARGUMENT"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "req-42" and line["rpc"] == "Get" and line["level"] == "info"
    assert "Get INVALID_ARGUMENT" in line["msg"]


def test_bad_security_settings_say_what_to_fix(tmp_path):
    from dkv.services.settings import SettingsError

    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        StoreSettings(tls_cert=str(tmp_path / "a.pem"))
    with pytest.raises(SettingsError, match="no such file"):
        StoreSettings(tls_cert=str(tmp_path / "a.pem"), tls_key=str(tmp_path / "b.pem"))
    with pytest.raises(SettingsError, match="tenant_tokens"):
        StoreSettings(tenant_tokens="acme")


def test_balanced_channels_spread_calls_over_every_address_and_store_channels_do_not():
    """Worker channels (``balanced=True``) send calls round robin over the addresses their target
    resolves to (the pods behind a headless Service; here a fixed ``ipv4:`` list of two servers);
    store channels keep one server, where the entries they wrote are."""
    from concurrent import futures

    servers, ports = [], []
    for name in (b"a", b"b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context, name=name: name)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", {"Am": handler}),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    try:
        for balanced, expected in ((True, {b"a", b"b"}), (False, 1)):
            with open_channel(target, balanced=balanced) as channel:
                who = channel.unary_unary("/test.Who/Am")
                answers = [who(b"", timeout=10) for _ in range(16)]
            if balanced:  # the first calls may all go to the first server to connect; then they alternate
                assert set(answers) == expected and answers[-4:].count(b"a") == answers[-4:].count(b"b") == 2, answers
            else:
                assert len(set(answers)) == expected
    finally:
        for server in servers:
            server.stop(None)
