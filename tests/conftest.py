"""Shared fixtures: a real redis-server and a real Redis Cluster (never a fake) for the Redis tier's tests, a test
PKI for TLS.

Markers (``redis``, ``gpu``, ``slow``) are declared in pyproject.toml.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Triton kernels run on a CPU only under its interpreter, which it reads when a kernel module is
# imported: set it before anything imports triton (workers.decode, workers.selection, kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from in_process import InProcessServer

from dkv.services.redis_server import LocalRedisCluster, RedisServer, redis_server_available

_SKIP_REASON = "redis-server not on PATH: apt-get install -y redis-server (make test installs it)"


def _running(kind):
    """A started ``kind()`` (``RedisServer`` or ``LocalRedisCluster``), stopped after; skipped without redis-server."""
    if not redis_server_available():
        pytest.skip(_SKIP_REASON)
    with kind() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the whole session (started on first use, stopped at the end)."""
    yield from _running(RedisServer)


@pytest.fixture
def redis_url(redis_server):
    """URL of the shared server, emptied (FLUSHALL) for this test."""
    import redis

    if not redis_server.running:  # a test stopped it: bring it back, on the same port
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def fresh_redis():
    """A dedicated redis-server this test may kill, stop or restart; stopped at teardown."""
    yield from _running(RedisServer)


@pytest.fixture(scope="session")
def redis_cluster():
    """One Redis Cluster (3 masters, 3 replicas on loopback) for the whole session; tests that kill
    its nodes use ``fresh_redis_cluster``."""
    yield from _running(LocalRedisCluster)


@pytest.fixture
def redis_cluster_url(redis_cluster):
    """URL of a node of the shared cluster, every master emptied (FLUSHALL) for this test."""
    import redis

    client = redis.RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    try:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()
    return redis_cluster.url


@pytest.fixture
def fresh_redis_cluster():
    """A dedicated Redis Cluster this test may kill nodes of; stopped at teardown."""
    yield from _running(LocalRedisCluster)


@pytest.fixture
def store_service():
    """Factory: ``store_service(settings=None, store=None)`` starts a store server on loopback."""
    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import StoreServer

    started = []

    def start(settings: StoreSettings | None = None, store=None) -> InProcessServer:
        settings = settings or StoreSettings(port=0, cpu_bytes=256 << 20)
        running = InProcessServer(StoreServer(settings, store))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# --- TLS: a test CA and certificates it signed --------------------------------------------------


def _certificate(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("dkv test CA", ca_key, ca=True)
    files = {"ca": root / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"dkv {who}", key, ca, ca_key)
        files[f"{who}_cert"] = root / f"{who}.pem"
        files[f"{who}_key"] = root / f"{who}-key.pem"
        files[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return {name: str(path) for name, path in files.items()}


from model_fixtures import random_models, smollm2  # noqa: E402,F401  models shared by the session
