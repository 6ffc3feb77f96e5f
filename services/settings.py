"""Typed settings: one dataclass per component, filled from CLI flags, ``DKV_*`` env vars and YAML.

Precedence: command-line flag > environment variable > YAML file (``--config``) > default. Each
field maps 1:1 to a flag (``--cpu-bytes``), an env var named after its component
(``DKV_STORE_CPU_BYTES``) and a YAML key (``cpu_bytes``); its ``help`` metadata is the one place
it is documented. Sizes accept units
(``512MiB``, ``2GB``). Validation errors name the setting, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from dkv.kvstore.recipe import SCHEMES
from dkv.kvstore.redis_url import redact_url
from dkv.workers.model_source import DTYPES, FORMS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


STORAGE_DTYPES = ("auto", "float16", "bfloat16", "float32")


class SettingsError(ValueError):
    """A setting has a value that is not allowed; the message says which and what to use."""


def parse_size(text: str | int) -> int:
    """``"512MiB"`` -> 536870912; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; use bytes or a unit like 512MiB, 2GB")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def setting(default: Any, help: str, kind: str | None = None, choices: tuple | None = None) -> Any:
    """A settings field; ``kind="size"`` parses units."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


def env_name(cls: type, name: str) -> str:
    """``DKV_<COMPONENT>_<SETTING>``: components sharing one environment never collide."""
    return f"DKV_{cls.component}_{name}".upper()


def _convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = f.metadata.get("kind")
    try:
        if kind == "size":
            return parse_size(raw)
        if f.type in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("use true or false")
        if f.type in (int, "int"):
            return int(raw)
        if f.type in (float, "float"):
            return float(raw)
        return str(raw)
    except ValueError as e:
        raise SettingsError(f"setting {f.name} ({source}) = {raw!r} is invalid: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field (default None, so unset flags fall through to env / YAML)."""
    parser.add_argument("--config", metavar="YAML", help="YAML file with settings (keys as the flags, with _)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar=f.name.upper() if f.type not in (bool, "bool") else "BOOL",
            help=f"{f.metadata.get('help', '')}{extra} [env {env_name(cls, f.name)}; default {f.default!r}]",
        )


def load(
    cls: type,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: str | Path | None = None,
):
    """Build ``cls`` from flags, env and YAML (see module docstring)."""
    env = os.environ if env is None else env
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    config = flags.pop("config", None) or config or env.get(env_name(cls, "config"))
    file_values: dict = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        file_values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_values, dict):
            raise SettingsError(f"config file {path} must be a YAML mapping of setting: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise SettingsError(f"config file {config}: unknown settings {unknown}; known: {sorted(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        for source, raw in (
            (f"--{f.name.replace('_', '-')}", flags.get(f.name)),
            (env_name(cls, f.name), env.get(env_name(cls, f.name))),
            (f"{config}:{f.name}", file_values.get(f.name)),
        ):
            if raw is not None:
                values[f.name] = _convert(f, raw, source)
                break
    return cls(**values)


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise SettingsError(f"setting {name} = {value!r} is not allowed; use one of {sorted(choices)}")


def check_device(name: str, value: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise SettingsError(f"setting {name} = {value!r} is not allowed; use auto, cpu, cuda or cuda:N")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise SettingsError(f"setting {name} = {value!r} must be between {lo} and {hi}")


SECRETS = ("auth_token", "tenant_tokens", "cluster_secret")
URLS = ("redis_url",)  # settings whose password, if the URL has one, is masked


def describe(settings) -> dict:
    """Effective settings as a plain dict (for logs and ``dkv config show``); secrets masked."""
    values = dataclasses.asdict(settings)
    for name in SECRETS:
        if values.get(name):
            values[name] = "***"
    for name in URLS:
        if values.get(name):
            values[name] = redact_url(values[name])
    return values


@dataclass
class ServerSettings:
    """What every dkv server has: where it listens, how it stops, how much it logs."""

    component: ClassVar[str] = "server"

    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 in a container).")
    port: int = setting(0, "gRPC port.")
    grace_s: float = setting(5.0, "Seconds in-flight calls get to finish on SIGTERM.")
    drain_delay_s: float = setting(
        0.0,
        "Seconds to keep serving with health NOT_SERVING after SIGTERM, so load "
        "balancers stop sending before the server stops taking calls (a few seconds on "
        "Kubernetes).",
    )
    log_level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = setting(
        "auto",
        "Log format: json, text, or auto (json when stderr is not a terminal).",
        choices=("auto", "json", "text"),
    )
    metrics_port: int = setting(0, "Port of the Prometheus /metrics HTTP endpoint; 0 disables it.")
    auth_token: str = setting(
        "",
        "Bearer token of the cluster's own services. A caller presenting it may act for "
        "any tenant (dkv-tenant header); this component also sends it on its outbound calls. "
        "Empty (and no tenant_tokens) = no authentication.",
    )
    tenant_tokens: str = setting(
        "",
        "Per-tenant bearer tokens, 'tenant=token,tenant=token': a caller presenting "
        "one acts only for that tenant, whose entries live in their own namespace.",
    )
    tls_cert: str = setting(
        "",
        "PEM certificate this component presents (server side, and client side for mutual "
        "TLS); with tls_key, turns TLS on.",
    )
    tls_key: str = setting("", "PEM private key of tls_cert.")
    tls_ca: str = setting(
        "",
        "PEM CA bundle: verifies the servers this component calls and, when set on a server "
        "with tls_cert, requires and verifies client certificates (mutual TLS).",
    )

    def __post_init__(self) -> None:
        check_range("port", self.port, 0, 65535)
        check_range("metrics_port", self.metrics_port, 0, 65535)
        for f in dataclasses.fields(self):  # each field's choices, declared once beside it
            if f.metadata.get("choices"):
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("settings tls_cert and tls_key go together: set both (TLS on) or neither (TLS off)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"setting {name} = {path!r}: no such file; give the path of a PEM file")
        for pair in filter(None, self.tenant_tokens.split(",")):
            tenant, _, token = pair.partition("=")
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", tenant.strip()) or not token.strip():
                raise SettingsError(
                    "setting tenant_tokens must be 'tenant=token,...' with tenant names of letters, "
                    f"digits, '_', '.', '-' and a non-empty token; got an entry {tenant.strip()!r}"
                )
        check_range("grace_s", self.grace_s, 0, 3600)
        check_range("drain_delay_s", self.drain_delay_s, 0, 3600)


@dataclass
class StoreSettings(ServerSettings):
    """The KV store server (``dkv store serve``)."""

    component: ClassVar[str] = "store"

    port: int = setting(50052, "gRPC port of the store.")
    device: str = setting(
        "auto", "Torch device of the device tier: auto (cuda if present, else cpu), cuda, cuda:N, cpu."
    )
    device_bytes: int = setting(0, "Capacity of the device-memory tier; 0 disables it.", kind="size")
    cpu_bytes: int = setting(1 << 30, "Capacity of the host-memory tier; 0 disables it.", kind="size")
    redis_url: str = setting("", "Redis URL of the last tier (redis://host:port/db); empty disables it.")
    redis_cluster: bool = setting(
        False,
        "redis_url is one node of a Redis Cluster: the store learns the others from "
        "it, follows MOVED/ASK redirections and failovers (database 0 only).",
    )
    redis_bytes: int = setting(4 << 30, "Capacity the store may use in Redis.", kind="size")
    redis_namespace: str = setting(
        "dkv:",
        "Prefix of the entries' keys in Redis, the same for every store of the "
        "cluster: a store reads the entries other stores wrote or demoted there (the "
        "shared last tier), so a lost shard loses only its memory tiers.",
    )
    redis_prefix: str = setting(
        "dkv:",
        "Prefix of this store's bookkeeping in Redis (the index and byte count of "
        "the entries it holds there). Store shards that share a Redis need one each: a store "
        "counts, recovers after a restart and evicts only its own entries, and reads any.",
    )
    cpu_keep_fraction: float = setting(1.0, "Fraction of tokens an entry keeps when demoted into the host tier.")
    cpu_quant: str = setting("none", "Requantize entries demoted into the host tier.", choices=tuple(SCHEMES))
    redis_keep_fraction: float = setting(1.0, "Fraction of tokens an entry keeps when demoted into Redis.")
    redis_quant: str = setting("none", "Requantize entries demoted into Redis.", choices=tuple(SCHEMES))
    policy: str = setting(
        "value", "Eviction policy: value (importance x reuse x cost / bytes) or lru.", choices=("value", "lru")
    )
    max_entry_bytes: int = setting(1 << 30, "Largest entry accepted.", kind="size")
    tenant_device_bytes: int = setting(
        0,
        "Quota: bytes one tenant may hold in the device tier (its new entries push "
        "its own older ones down); 0 = no quota.",
        kind="size",
    )
    tenant_cpu_bytes: int = setting(0, "Quota: bytes one tenant may hold in the host tier; 0 = no quota.", kind="size")
    tenant_redis_bytes: int = setting(
        0,
        "Quota: bytes one tenant may hold in Redis. A tenant over its quota in every "
        "tier whose entries there are still unread gets RESOURCE_EXHAUSTED; 0 = no quota.",
        kind="size",
    )
    cluster_secret: str = setting(
        "",
        "Secret shared by the cluster's stores: every entry written to Redis carries a "
        "keyed MAC (BLAKE2b) of its frames and every read checks it, so entries written into "
        "Redis by anyone else are never served. Empty = no MAC (the store says so at start).",
    )
    audit_interval_s: float = setting(
        60.0,
        "Seconds between audits that reconcile the index with what Redis really "
        "holds (entries, index and byte counter Redis evicted or lost).",
    )
    min_chunk_size: int = setting(
        16,
        "Smallest recipe chunk_size a Lookup may ask for: the store hashes the prompt "
        "chunk by chunk, so the work per token grows as chunks shrink.",
    )
    max_lookup_tokens: int = setting(
        1 << 17,
        "Most token ids in one Lookup; a Probe may send as many keys as such a prompt has chunks of min_chunk_size.",
    )
    max_put_streams: int = setting(64, "Put streams received at once; more get RESOURCE_EXHAUSTED.")
    put_bytes_in_flight: int = setting(
        1 << 30,
        "Memory for Puts being received: each takes its entry's full size "
        "(from its header) until it is stored or refused; a Put that does not fit gets "
        "RESOURCE_EXHAUSTED. At least max_entry_bytes.",
        kind="size",
    )
    put_idle_timeout_s: float = setting(
        30.0, "A Put stream that sends no frame for this long is aborted (DEADLINE_EXCEEDED) and what it sent is freed."
    )
    keepalive_s: float = setting(
        30.0,
        "Seconds between the server's HTTP/2 pings on a connection with calls open; a "
        "client that does not answer within keepalive_timeout_s is dropped, and its calls "
        "with it. 0 = no pings.",
    )
    keepalive_timeout_s: float = setting(10.0, "Seconds a client has to answer a keepalive ping.")
    max_connection_age_s: float = setting(
        0.0,
        "Close each client connection after this long (calls in flight get "
        "grace_s to finish; clients reconnect). 0 = never.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "device_bytes",
            "cpu_bytes",
            "redis_bytes",
            "max_entry_bytes",
            "tenant_device_bytes",
            "tenant_cpu_bytes",
            "tenant_redis_bytes",
            "put_bytes_in_flight",
        ):
            check_range(name, getattr(self, name), 0, 1 << 50)
        if self.put_bytes_in_flight < self.max_entry_bytes:
            raise SettingsError(
                f"setting put_bytes_in_flight = {self.put_bytes_in_flight} is below max_entry_bytes = "
                f"{self.max_entry_bytes}: an entry of the largest size could never be received; raise "
                "it or lower max_entry_bytes"
            )
        check_range("audit_interval_s", self.audit_interval_s, 1, 24 * 3600)
        check_range("min_chunk_size", self.min_chunk_size, 1, 1 << 16)
        check_range("max_lookup_tokens", self.max_lookup_tokens, self.min_chunk_size, 1 << 24)
        check_range("max_put_streams", self.max_put_streams, 1, 1 << 16)
        check_range("put_idle_timeout_s", self.put_idle_timeout_s, 0.1, 3600)
        check_range("keepalive_s", self.keepalive_s, 0, 24 * 3600)
        check_range("keepalive_timeout_s", self.keepalive_timeout_s, 0.1, 3600)
        check_range("max_connection_age_s", self.max_connection_age_s, 0, 30 * 24 * 3600)
        check_device("device", self.device)
        for name in ("cpu_keep_fraction", "redis_keep_fraction"):
            check_range(name, getattr(self, name), 0.01, 1.0)
        if self.redis_url and not re.match(r"^rediss?://", self.redis_url):
            raise SettingsError(f"setting redis_url = {self.redis_url!r} must start with redis:// or rediss://")
        for name in ("redis_prefix", "redis_namespace"):
            if not re.fullmatch(r"[A-Za-z0-9:._-]{1,128}", getattr(self, name)):
                raise SettingsError(f"setting {name} = {getattr(self, name)!r} must be 1-128 chars of [A-Za-z0-9:._-]")
        if self.redis_cluster and not self.redis_url:
            raise SettingsError("setting redis_cluster = true needs redis_url: the address of one node of the cluster")
        if self.redis_cluster and urllib.parse.urlsplit(self.redis_url).path.strip("/") not in ("", "0"):
            raise SettingsError(
                f"setting redis_url = {redact_url(self.redis_url)!r} names a database other than 0; a "
                "Redis Cluster (redis_cluster = true) has only database 0: use redis://host:port/0"
            )
        if not (self.device_bytes or self.cpu_bytes or self.redis_url):
            raise SettingsError("every tier is disabled: set device_bytes, cpu_bytes or redis_url")


@dataclass
class WorkerSettings(ServerSettings):
    """What the prefill and decode workers share: their model and where it runs."""

    component: ClassVar[str] = "worker"

    model: str = setting("smollm2-135m", f"Model: {FORMS}.")
    device: str = setting(
        "auto",
        "Torch device of the model: auto (the first CUDA GPU if there is one, else cpu), "
        "cpu, cuda, cuda:N. cuda when no GPU is there is refused at start.",
    )
    dtype: str = setting(
        "auto",
        "Precision of the model's weights and KV: auto (float32 on cpu; bfloat16 on a GPU that has it, else float16).",
        choices=("auto", *DTYPES),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_device("device", self.device)


@dataclass
class PrefillSettings(WorkerSettings):
    """A prefill worker (``dkv prefill serve``)."""

    component: ClassVar[str] = "prefill"

    port: int = setting(50053, "gRPC port of the prefill worker.")
    store: str = setting(
        "127.0.0.1:50052",
        "Address of the KV store (host:port), or of its shards: comma-separated, "
        "or dns:///NAME:PORT for every address NAME resolves to (a headless Service), looked up again "
        "every 10 s. Each entry lives on the shard its key picks (rendezvous hashing).",
    )
    store_timeout_s: float = setting(60.0, "Deadline of each call to the store, in seconds.")
    max_tokens: int = setting(0, "Longest context accepted; 0 = the model's maximum.")
    threads: int = setting(
        0, "torch threads for the model; 0 = one per core (dkv up divides the cores among its workers)."
    )
    storage_dtype: str = setting(
        "auto",
        "dtype of the K/V the store keeps for entries not quantized: float16, "
        "bfloat16, float32, or auto (float16 for a float32 model, else the model's).",
        choices=STORAGE_DTYPES,
    )
    min_chunk_size: int = setting(
        16,
        "Smallest recipe chunk_size accepted: a chunked recipe stores one entry per "
        "chunk, so chunk_size 1 would make one entry per token.",
    )

    held_bytes: int = setting(
        512 << 20,
        "Entries the store did not take (down, full, refusing), held here for "
        "the decode workers that ask for them (Prefill.Entries) and stored once it is back.",
        kind="size",
    )
    held_ttl_s: float = setting(120.0, "How long such an entry is held.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("store_timeout_s", self.store_timeout_s, 0.1, 3600)
        check_range("max_tokens", self.max_tokens, 0, 1 << 24)
        check_range("threads", self.threads, 0, 1024)
        check_range("held_bytes", self.held_bytes, 0, 1 << 50)
        check_range("held_ttl_s", self.held_ttl_s, 0.1, 24 * 3600)
        check_range("min_chunk_size", self.min_chunk_size, 1, 1 << 16)


@dataclass
class DecodeSettings(WorkerSettings):
    """A decode worker (``dkv decode serve``)."""

    component: ClassVar[str] = "decode"
    port: int = setting(50054, "gRPC port of the decode worker.")
    store: str = setting(
        "127.0.0.1:50052",
        "Address of the KV store (host:port), or of its shards: comma-separated, "
        "or dns:///NAME:PORT for every address NAME resolves to (a headless Service), looked up again "
        "every 10 s. Each entry lives on the shard its key picks (rendezvous hashing).",
    )
    store_timeout_s: float = setting(60.0, "Deadline of each call to the store, in seconds.")
    prefill: str = setting(
        "127.0.0.1:50053",
        "Address of a prefill worker (dns:///host:port balances over its "
        "pods), to recompute missing entries; empty = a missing entry is NOT_FOUND.",
    )
    prefill_timeout_s: float = setting(600.0, "Deadline of a recompute through the prefill worker, in seconds.")
    page_cache_bytes: int = setting(
        256 << 20, "Local page cache for paged decoding (device memory on a GPU).", kind="size"
    )
    threads: int = setting(
        0, "torch threads for the model loop; 0 = one per core (dkv up divides the cores among its workers)."
    )
    max_active_streams: int = setting(
        16, "Streams decoded together, one batched forward per step; more wait in the queue."
    )
    max_queued_requests: int = setting(
        64,
        "Requests that may wait for a free stream (or be reading the store) "
        "beyond the active ones; more get RESOURCE_EXHAUSTED.",
    )
    entry_cache_bytes: int = setting(
        1 << 30,
        "Entries kept in this worker after decoding from them: a context asked again skips the store (0 = none).",
        kind="size",
    )
    entry_cache_ttl_s: float = setting(
        300.0,
        "Longest time an entry stays in the worker's cache (an entry deleted from the store is not served after that).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("store_timeout_s", self.store_timeout_s, 0.1, 3600)
        check_range("prefill_timeout_s", self.prefill_timeout_s, 0.1, 3600)
        check_range("page_cache_bytes", self.page_cache_bytes, 1 << 20, 1 << 50)
        check_range("threads", self.threads, 0, 1024)
        check_range("max_active_streams", self.max_active_streams, 1, 4096)
        check_range("max_queued_requests", self.max_queued_requests, 0, 1 << 20)
        check_range("entry_cache_bytes", self.entry_cache_bytes, 0, 1 << 50)
        check_range("entry_cache_ttl_s", self.entry_cache_ttl_s, 0.1, 30 * 24 * 3600)


@dataclass
class GatewaySettings(ServerSettings):
    """The gateway (``dkv gateway serve``): the one entry point for clients."""

    component: ClassVar[str] = "gateway"
    port: int = setting(50051, "gRPC port of the gateway.")
    http_port: int = setting(
        0,
        "Port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health), served beside gRPC with the same tokens and TLS; 0 disables it "
        "(dkv up serves it on 8000).",
    )
    prefill: str = setting(
        "127.0.0.1:50053",
        "Address of the prefill worker (host:port), or dns:///host:port to "
        "send calls round robin over every address the name resolves to (a headless Service).",
    )
    decode: str = setting(
        "127.0.0.1:50054",
        "Addresses of the decode workers, comma-separated; requests go to the "
        "least loaded. A dns:///host:port address is balanced call by call over its pods.",
    )
    model: str = setting("smollm2-135m", f"Model whose tokenizer and chat template the gateway applies: {FORMS}.")
    max_positions: int = setting(8192, "Longest context + query + new tokens accepted.")
    timeout_s: float = setting(600.0, "Deadline of each call to a worker, in seconds.")
    max_text_bytes: int = setting(
        1 << 20,
        "Longest context_text + query_text tokenized here (characters); longer "
        "requests get INVALID_ARGUMENT (send token ids).",
        kind="size",
    )
    store: str = setting(
        "",
        "Address of the KV store (or its shards, as for the workers): a context it holds whole "
        "goes straight to decode (one Lookup, no Prefill call). Empty = every request goes through "
        "a prefill worker.",
    )
    store_timeout_s: float = setting(
        5.0, "Deadline of the gateway's store Lookup, in seconds; when it fails the request goes through prefill."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prefill or not self.decode:
            raise SettingsError("settings prefill and decode need worker addresses (host:port)")
        check_range("max_text_bytes", self.max_text_bytes, 1, 1 << 30)
        check_range("http_port", self.http_port, 0, 65535)
        if self.http_port and self.http_port == self.port:
            raise SettingsError(f"settings port and http_port are both {self.port}: gRPC and HTTP need a port each")
        check_range("store_timeout_s", self.store_timeout_s, 0.1, 3600)
        check_range("max_positions", self.max_positions, 1, 1 << 24)
        check_range("timeout_s", self.timeout_s, 0.1, 24 * 3600)
