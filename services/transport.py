"""How dkv processes talk: channels, TLS, bearer tokens, tenants, request ids.

Tokens. ``auth_token`` is the cluster's own service token: a caller presenting it may act for any
tenant (requests name their tenant). A token from ``tenant_tokens`` lets its caller act only for
its tenant: a request naming another tenant, or a key in another tenant's namespace, is
PERMISSION_DENIED. With neither set, authentication is off. Health checks and reflection need no
token (Kubernetes probes cannot send one).

TLS. ``tls_cert`` + ``tls_key`` turn TLS on for a server; ``tls_ca`` on a server requires client
certificates signed by it (mutual TLS). A client verifies servers with ``tls_ca`` (the system
roots when empty) and presents ``tls_cert``/``tls_key`` when it has them.

The interceptor records the caller's allowed tenant in a context variable that the servicers read
with ``tenant_for(requested)``; outbound calls carry the token and the request id through
``call_metadata``.
"""

from __future__ import annotations

import hmac
import json
import socket
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 8 << 20  # a 4 MiB frame, or ~1M token ids, with room to spare
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Channels to stateless workers spread calls over every address their name resolves to (a
# Kubernetes headless Service: one per ready pod) instead of pinning to the first one.
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))
# Servers of stateless workers close each connection after this long (calls in flight get the
# grace period to finish), so clients re-resolve their Service and reach pods added since.
WORKER_CONNECTION_AGE = [
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]
# A peer that went away (a restarted store, Redis-less store, worker) is dialled again within 2 s:
# gRPC's default backoff grows to 120 s, and a cache that came back would sit unused that long.
RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
DEFAULT_TENANT = "default"
ANY_TENANT = None
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

allowed_tenant: ContextVar[str | None] = ContextVar("dkv_allowed_tenant", default=ANY_TENANT)
request_id: ContextVar[str] = ContextVar("dkv_request_id", default="")


class PermissionDenied(Exception):
    """The caller's token does not allow acting for the tenant the request names."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it); callers retry if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tenant_for(requested: str) -> str:
    """The tenant a request acts for: the one it names (or the caller's own), if the caller may."""
    allowed = allowed_tenant.get()
    if allowed is ANY_TENANT:
        return requested or DEFAULT_TENANT
    if requested and requested != allowed:
        raise PermissionDenied(
            f"this token acts for tenant {allowed!r}, not {requested!r}: "
            "use that tenant's token or leave the tenant empty"
        )
    return allowed


@dataclass(frozen=True)
class Security:
    """What a client needs to reach a dkv service: a bearer token and TLS files (all optional)."""

    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @classmethod
    def of(cls, settings) -> Security:
        """The outbound security of a component: its service token and TLS files."""
        return cls(settings.auth_token, settings.tls_ca, settings.tls_cert, settings.tls_key)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )


def open_channel(address: str, security: Security | None = None, aio: bool = False, balanced: bool = False):
    """A channel to ``address``: TLS when ``security`` has TLS files, plaintext otherwise.

    ``balanced`` (for stateless workers) sends calls round robin over every address ``address``
    resolves to: ``dns:///dkv-decode:50054`` reaches each pod of a headless Service, and
    ``ipv4:127.0.0.1:50054,127.0.0.1:50064`` a fixed list. Store channels stay on one address: its
    shards are separate caches, and an entry must be read where it was written.
    """
    security = security or Security()
    module = grpc.aio if aio else grpc
    options = GRPC_OPTIONS + RECONNECT + ([ROUND_ROBIN] if balanced else [])
    if security.tls:
        return module.secure_channel(address, security.channel_credentials(), options=options)
    return module.insecure_channel(address, options=options)


def call_metadata(security: Security | None) -> tuple[tuple[str, str], ...]:
    """Metadata for one outbound call: the bearer token and the current request id."""
    metadata = []
    if security is not None and security.token:
        metadata.append(("authorization", f"Bearer {security.token}"))
    if request_id.get():
        metadata.append(("x-request-id", request_id.get()))
    return tuple(metadata)


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """TLS credentials of a server, or None when its settings leave TLS off."""
    if not settings.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key), _read(settings.tls_cert))],
        root_certificates=_read(settings.tls_ca),
        require_client_auth=bool(settings.tls_ca),
    )


def parse_tenant_tokens(text: str) -> dict[str, str]:
    """``"a=tok1,b=tok2"`` -> ``{"tok1": "a", "tok2": "b"}`` (settings validated the shape)."""
    tokens = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        tenant, _, token = pair.partition("=")
        tokens[token.strip()] = tenant.strip()
    return tokens


class Authenticator:
    """Maps a call's ``authorization`` metadata to the tenant it may act for, or rejects it."""

    def __init__(self, service_token: str, tenant_tokens: str = ""):
        self.service_token = service_token
        self.tenant_tokens = parse_tenant_tokens(tenant_tokens)

    @classmethod
    def of(cls, settings) -> Authenticator:
        return cls(settings.auth_token, settings.tenant_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.service_token or self.tenant_tokens)

    def check(
        self, method: str, metadata, how: str = "metadata 'authorization: Bearer <token>' (DkvClient(token=...))"
    ) -> tuple[str | None, grpc.StatusCode | None, str]:
        """(allowed tenant, None, "") for an accepted call; (None, code, why) for a rejected one; ``how``
        tells a caller without a token how to send one."""
        if not self.enabled or method.startswith(OPEN_SERVICES):
            return ANY_TENANT, None, ""
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None, grpc.StatusCode.UNAUTHENTICATED, f"missing bearer token: send {how}"
        token = token.strip()
        if self.service_token and hmac.compare_digest(token.encode(), self.service_token.encode()):
            return ANY_TENANT, None, ""
        for known, tenant in self.tenant_tokens.items():
            if hmac.compare_digest(token.encode(), known.encode()):
                return tenant, None, ""
        return None, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"


def new_request_id(metadata) -> str:
    """The caller's ``x-request-id`` (kept short), or a fresh one."""
    given = next((str(value) for key, value in metadata or () if key == "x-request-id"), "")
    return given[:64] if given else uuid.uuid4().hex[:16]


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
