"""Helpers of ``test_bad_input.py``: raw (bytes in, bytes out) calls, the tally of what was tried,
the property checks, codec frame surgery and the hypothesis strategies of hostile requests.

Every call goes through a generic channel (``channel.unary_unary(path)`` without serializers), so a
test can send anything: random bytes, truncated messages, forged frames, missing or wrong tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from dkv.kvstore import codec
from dkv.kvstore.codec import FRAME_HEAD_BYTES, HEAD, KIND_DATA, KIND_HEADER, MAGIC
from dkv.kvstore.entry import FORMAT_VERSION
from dkv.services.pb import common_pb2, decode_pb2, gateway_pb2, prefill_pb2, store_pb2
from dkv.services.wire import frame_message
from dkv.testing import synthetic_entry

SERVICE_TOKEN = "svc-token"
TENANT_TOKENS = "acme=acme-token,beta=beta-token"
# how a caller authenticates: the service token, a tenant's token, or not properly
AUTH_HEADERS = {
    "service": f"Bearer {SERVICE_TOKEN}",
    "acme": "Bearer acme-token",
    "beta": "Bearer beta-token",
    "none": None,
    "wrong": "Bearer not-a-token",
    "malformed": "Basic YWNtZTphY21lLXRva2Vu",
    "empty": "Bearer ",
}
GOOD_AUTH = ("service", "acme", "beta")
TENANT_OF = {"acme": "acme", "beta": "beta"}  # the tenant a tenant token acts for
PREFILL_MAX_TOKENS = 64
MAX_MESSAGE = 8 << 20

KVSTORE, PREFILL, DECODE, GATEWAY = "dkv.v1.KVStore", "dkv.v1.Prefill", "dkv.v1.Decode", "dkv.v1.Gateway"
# rpc -> (service, kind, request message type); kind: uu unary-unary, us unary-stream, su stream-unary
RPCS = {
    "Put": (KVSTORE, "su", store_pb2.Frame),
    "Get": (KVSTORE, "us", store_pb2.GetRequest),
    "Lookup": (KVSTORE, "uu", store_pb2.LookupRequest),
    "Probe": (KVSTORE, "uu", store_pb2.ProbeRequest),
    "Delete": (KVSTORE, "uu", store_pb2.DeleteRequest),
    "Summaries": (KVSTORE, "us", store_pb2.GetRequest),
    "Select": (KVSTORE, "us", store_pb2.SelectRequest),
    "Stats": (KVSTORE, "uu", store_pb2.StatsRequest),
    "Prefill": (PREFILL, "uu", prefill_pb2.PrefillRequest),
    "Entries": (PREFILL, "us", prefill_pb2.PrefillRequest),
    "Decode": (DECODE, "us", decode_pb2.DecodeRequest),
    "Generate": (GATEWAY, "us", gateway_pb2.GenerateRequest),
}
MODEL_RPCS = ("Prefill", "Entries", "Decode", "Generate")

VERBOSE = bool(os.environ.get("DKV_BAD_INPUT_VERBOSE"))  # print every outcome (to stderr)
OK = grpc.StatusCode.OK
# codes a rejection may have; UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS, DEADLINE_EXCEEDED never
REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
KEY_PART = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


# ------------------------------------------------------------------------------------------- calls


@dataclass
class Outcome:
    rpc: str
    code: grpc.StatusCode
    details: str
    replies: list = field(default_factory=list)  # raw reply messages (bytes)
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.rpc}: {self.code.name} {self.details[:300]!r}"


def metadata(auth: str) -> tuple:
    header = AUTH_HEADERS[auth]
    return () if header is None else (("authorization", header),)


def raw_call(
    channel: grpc.Channel, rpc: str, payload, auth: str = "service", timeout: float = 30.0, path: str | None = None
) -> Outcome:
    """Send ``payload`` (bytes; for Put an iterable of messages) to ``rpc`` with no serializers."""
    service, kind, _ = RPCS.get(rpc, (None, "uu", None))
    path = path or f"/{service}/{rpc}"
    started = time.perf_counter()
    replies: list = []
    try:
        if kind == "uu":
            replies = [channel.unary_unary(path)(payload, metadata=metadata(auth), timeout=timeout)]
        elif kind == "us":
            replies = list(channel.unary_stream(path)(payload, metadata=metadata(auth), timeout=timeout))
        else:
            replies = [channel.stream_unary(path)(iter(payload), metadata=metadata(auth), timeout=timeout)]
        code, details = OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    return Outcome(rpc, code, details, replies, time.perf_counter() - started)


class Tally:
    """Examples tried per RPC and how each ended; printed at the end of the module."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.seconds: Counter = Counter()

    def record(self, outcome: Outcome) -> None:
        self.codes[outcome.rpc][outcome.code.name] += 1
        self.seconds[outcome.rpc] += outcome.seconds

    def lines(self, elapsed_s: float) -> list[str]:
        total = sum(sum(c.values()) for c in self.codes.values())
        clean = {c.name for c in REJECTIONS}
        rejected = sum(n for c in self.codes.values() for code, n in c.items() if code in clean)
        accepted = sum(c["OK"] for c in self.codes.values())
        unclean = sum(n for c in self.codes.values() for code, n in c.items() if code in ("UNKNOWN", "INTERNAL"))
        out = [
            f"bad-input summary: {total} requests tried in {elapsed_s:.0f} s: {rejected} rejected with a clean "
            f"status code and a message, {accepted} accepted (valid after all), {unclean} UNKNOWN/INTERNAL"
        ]
        for rpc in sorted(self.codes, key=lambda r: list(RPCS).index(r) if r in RPCS else 99):
            c = self.codes[rpc]
            codes = ", ".join(f"{k} {v}" for k, v in c.most_common())
            out.append(f"  {rpc:<10} {sum(c.values()):>5} tried in {self.seconds[rpc]:6.1f} s: {codes}")
        return out


TALLY = Tally()


def decodes(message_type, payload: bytes) -> bool:
    """Whether ``payload`` parses as ``message_type`` (what the server's deserializer does)."""
    try:
        message_type.FromString(payload)
        return True
    except Exception:
        return False


def assert_sane(outcome: Outcome, allowed: set | None = None, expected: set | None = None) -> None:
    """The properties every example must have (see the test module's docstring)."""
    TALLY.record(outcome)
    if VERBOSE:
        print(f"{outcome.seconds * 1e3:7.1f} ms {outcome}", file=sys.__stderr__)
    assert outcome.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), str(outcome)
    allowed = (REJECTIONS | {OK}) if allowed is None else allowed
    assert outcome.code in allowed, f"{outcome} not in {sorted(c.name for c in allowed)}"
    if expected is not None:
        assert outcome.code in expected, f"{outcome}; expected {sorted(c.name for c in expected)}"
    if outcome.code != OK:
        assert len(outcome.details) > 10, f"rejection without a useful message: {outcome}"


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------ frame surgery


def make_frame(
    kind: int, entry_id: bytes, seq: int, total: int, payload: bytes, version: int = FORMAT_VERSION
) -> bytes:
    """One codec frame with a correct checksum (whatever its content says)."""
    head = HEAD.pack(MAGIC, version, kind, 0, entry_id, seq, total, len(payload), 0)
    return head + struct.pack("<Q", xxhash.xxh3_64(head + payload).intdigest()) + payload


def payload_of(frame: bytes) -> bytes:
    return bytes(frame[FRAME_HEAD_BYTES:])


def header_of(frames: list[bytes]) -> dict:
    return json.loads(payload_of(frames[0]))


def data_of(frames: list[bytes]) -> bytes:
    return b"".join(payload_of(f) for f in frames[1:])


def reencode(
    header, data: bytes, piece: int = 1024, recompute_hash: bool = True, entry_id: bytes | None = None
) -> list[bytes]:
    """Frames of ``header`` (any JSON value) and ``data``, all consistent: entry id, sequence,
    checksums and (when asked and the header has one) the data hash."""
    if recompute_hash and isinstance(header, dict) and "data_xxh3" in header:
        header = {**header, "data_xxh3": xxhash.xxh3_128(data).hexdigest()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    entry_id = entry_id or hashlib.blake2b(header_bytes, digest_size=8).digest()
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    total = 1 + len(pieces)
    return [make_frame(KIND_HEADER, entry_id, 0, total, header_bytes)] + [
        make_frame(KIND_DATA, entry_id, seq, total, p) for seq, p in enumerate(pieces, start=1)
    ]


def messages(frames: list[bytes]) -> list[bytes]:
    """The Put stream of ``frames``: one serialized ``dkv.v1.Frame`` each."""
    return [frame_message(f) for f in frames]


@dataclass
class Template:
    """A valid entry to mutate: its frames (split small, so there are several data frames)."""

    name: str
    tenant: str
    frames: list[bytes]

    @property
    def header(self) -> dict:
        return header_of(self.frames)

    @property
    def data(self) -> bytes:
        return data_of(self.frames)


def _template(name: str, piece: int = 1064, **kwargs) -> Template:
    entry = synthetic_entry(**kwargs)
    return Template(name, entry.identity.tenant, codec.encode(entry, max_frame_bytes=piece))


TEMPLATES = [
    _template(
        "fp16",
        seq_len=24,
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        page_size=4,
        seed=11,
        tenant="acme",
        keep_fraction=0.75,
    ),
    _template(
        "int4",
        seq_len=20,
        num_layers=1,
        num_kv_heads=2,
        head_dim=8,
        page_size=4,
        seed=12,
        tenant="beta",
        quant_scheme="int4",
    ),
    _template(
        "mixed",
        seq_len=18,
        num_layers=1,
        num_kv_heads=1,
        head_dim=16,
        page_size=8,
        seed=13,
        tenant="default",
        quant_scheme="mixed",
        keep_fraction=0.5,
    ),
    _template(
        "bf16",
        seq_len=12,
        num_layers=1,
        num_kv_heads=3,
        head_dim=4,
        page_size=2,
        seed=14,
        tenant="acme",
        dtype=torch.bfloat16,
        piece=4096,
    ),
]

# the entry every test must leave intact (bit-exact), and its geometry
GOOD_ENTRY = synthetic_entry(
    seq_len=40,
    num_layers=2,
    num_kv_heads=2,
    head_dim=16,
    page_size=4,
    seed=7,
    tenant="acme",
    token_ids=list(range(1000, 1040)),
)
GOOD_FRAMES = [bytes(f) for f in codec.encode(GOOD_ENTRY)]
GOOD_KEY = str(GOOD_ENTRY.key)
GOOD_PAGES = [int(layer.page_min.shape[0]) for layer in GOOD_ENTRY.layers]


def leaf_paths(value, prefix=()) -> list[tuple]:
    """Every path into ``value`` (dict keys and list indices), containers included."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += leaf_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += leaf_paths(v, prefix + (i,))
    return out


def set_path(value, path: tuple, new, delete: bool = False):
    """A deep copy of ``value`` with ``path`` set to ``new`` (or deleted)."""
    value = json.loads(json.dumps(value))
    target = value
    for p in path[:-1]:
        target = target[p]
    if delete:
        if isinstance(target, dict):
            del target[path[-1]]
        else:
            target.pop(path[-1])
    else:
        target[path[-1]] = new
    return value


# ------------------------------------------------------------------------------------ strategies

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1
uint32s = st.one_of(
    st.integers(0, 16),
    st.sampled_from([255, 256, 4095, 65535, 65536, 2**31 - 1, 2**31, UINT32]),
    st.integers(0, UINT32),
)
any_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 1e-320, 1e308, -1e308]),
)
short_text = st.text(max_size=24)
key_parts = st.from_regex(r"[A-Za-z0-9._-]{1,24}", fullmatch=True)
bad_parts = st.one_of(
    st.just(""), st.text(min_size=1, max_size=12).filter(lambda s: not KEY_PART.match(s)), st.just("a" * 129)
)
METHODS = ["full", "snapkv", "pyramidkv", "h2o", "dynamickv", "cake", "lagkv", "tova", "knorm", "streaming_llm"]
PARAM_NAMES = [
    "window_size",
    "kernel_size",
    "sink",
    "lag_size",
    "recent_fraction",
    "beta",
    "gamma",
    "tau1",
    "tau2",
    "r_max",
    "share_heads",
    "merge",
]


def auths(good_weight: int = 6) -> st.SearchStrategy[str]:
    """Mostly valid tokens (so the request reaches the servicer), sometimes none or a bad one."""
    good = ["service"] * good_weight + ["acme"] * (good_weight // 2) + ["beta"] * (good_weight // 3)
    return st.sampled_from(good + ["none", "wrong", "malformed", "empty"])


def keys(tenants=("acme", "beta", "default")) -> st.SearchStrategy[str]:
    """Key strings: well-formed but forged, malformed in every way, or the good key altered."""
    well_formed = st.builds(
        lambda t, m, r, h: f"{t}/{m}/{r}/{h}", st.sampled_from(tenants) | key_parts, key_parts, key_parts, key_parts
    )
    good = GOOD_KEY.split("/")
    altered = st.builds(
        lambda i, p: "/".join(p if j == i else g for j, g in enumerate(good)),
        st.integers(1, 3),
        key_parts.filter(lambda p: p not in good),
    )
    wrong_count = st.lists(key_parts, min_size=0, max_size=7).filter(lambda ps: len(ps) != 4).map("/".join)
    bad_part = st.builds(
        lambda i, bad, ps: "/".join(bad if j == i else p for j, p in enumerate(ps)),
        st.integers(0, 3),
        bad_parts,
        st.lists(key_parts, min_size=4, max_size=4),
    )
    return st.one_of(
        well_formed,
        altered,
        wrong_count,
        bad_part,
        st.text(max_size=300),
        st.sampled_from(["", "/", "///", "////", GOOD_KEY + "/", "/" + GOOD_KEY, GOOD_KEY + "\n"]),
    )


def params() -> st.SearchStrategy[dict]:
    name = st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=10))
    return st.lists(st.tuples(name, any_floats), max_size=3).map(dict)


VALID_PARAMS = {
    "snapkv": {"window_size": [4.0, 8.0, 16.0], "kernel_size": [1.0, 3.0, 5.0]},
    "pyramidkv": {"window_size": [4.0, 8.0], "kernel_size": [1.0, 5.0], "beta": [1.0, 20.0]},
    "h2o": {"recent_fraction": [0.0, 0.25, 0.5]},
    "dynamickv": {"window_size": [4.0, 8.0], "kernel_size": [3.0, 7.0], "r_max": [1.0, 10.0]},
    "cake": {"window_size": [4.0, 8.0], "kernel_size": [3.0, 5.0], "gamma": [10.0, 200.0]},
    "lagkv": {"sink": [0.0, 4.0], "lag_size": [2.0, 8.0]},
    "tova": {"window_size": [1.0, 4.0]},
    "streaming_llm": {"sink": [1.0, 4.0]},
    "full": {},
    "knorm": {},
}


@st.composite
def valid_recipes(draw, chunk_sizes=(0, 8, 16, 256)):
    """Recipes a prefill worker accepts: every method, ratio, quantization, chunking, some parameters."""
    method = draw(st.sampled_from(METHODS), "method")
    choices = {**VALID_PARAMS[method], "share_heads": [0.0, 1.0], "merge": [0.0, 1.0]}
    names = draw(st.lists(st.sampled_from(sorted(choices)), max_size=2, unique=True), "param names")
    ps = {n: draw(st.sampled_from(choices[n]), n) for n in names}
    ratio = 0.0 if method == "full" else draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]), "ratio")
    budget = 0 if method == "full" else draw(st.sampled_from([0, 0, 1, 4, 64, UINT32]), "budget")
    return common_pb2.Recipe(
        method=method,
        ratio=ratio,
        budget=budget,
        params=ps,
        quant=draw(st.sampled_from(["", "none", "int8", "int4", "mixed"]), "quant"),
        chunked=draw(st.booleans(), "chunked"),
        chunk_size=draw(st.sampled_from(chunk_sizes), "chunk_size"),
    )


def hostile_recipes(small_chunks: bool = True) -> st.SearchStrategy:
    """``dkv.v1.Recipe`` messages with hostile values in any field."""
    chunk = st.one_of(
        st.sampled_from([0, 8, 16, 256, 65536, 65537, UINT32]), st.integers(8, 70000), st.integers(65537, UINT32)
    )
    if small_chunks:
        chunk = st.one_of(chunk, st.integers(1, 7))
    return st.builds(
        lambda method, ratio, budget, quant, chunk_size, chunked, ps: common_pb2.Recipe(
            method=method, ratio=ratio, budget=budget, quant=quant, chunk_size=chunk_size, chunked=chunked, params=ps
        ),
        st.one_of(st.sampled_from(METHODS + ["", "nope", "a" * 129, "snap kv", "full/x"]), short_text),
        st.one_of(st.floats(0, 0.95), any_floats),
        uint32s,
        st.one_of(st.sampled_from(["", "none", "int8", "int4", "mixed", "int2", "NONE"]), short_text),
        chunk,
        st.booleans(),
        params(),
    )


class Plan:
    """Draws each field of a request from its valid strategy, except a few (0-2) drawn from their
    hostile one, so that most examples get past the first check and exercise the code behind it."""

    def __init__(self, draw, fields: list[str], max_hostile: int = 2):
        self.draw = draw
        n = draw(st.sampled_from([0, 1, 1, 2][: max_hostile + 2]), "n hostile")
        self.hostile = set(draw(st.permutations(fields), "fields")[:n])

    def __call__(self, name: str, valid, hostile):
        return self.draw(hostile if name in self.hostile else valid, name)


def token_ids(valid_max: int = 40, vocab: int = 49152) -> st.SearchStrategy[list[int]]:
    """Token id lists: valid and short, empty, out of the vocabulary, longer than the workers take."""
    valid = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=valid_max)
    return st.one_of(
        valid,
        valid,
        st.just([]),
        st.lists(st.integers(0, UINT32), min_size=1, max_size=8).filter(lambda ids: max(ids) >= vocab),
        st.builds(
            lambda ids, bad, at: ids[:at] + [bad] + ids[at:], valid, st.integers(vocab, UINT32), st.integers(0, 40)
        ),
        st.integers(PREFILL_MAX_TOKENS + 1, 5000).map(lambda n: [7] * n),
    )


def temperatures() -> st.SearchStrategy[float]:
    """Sampling temperatures, hostile ones included: negative, NaN, infinite, tiny, huge."""
    return st.one_of(
        st.just(0.0),
        st.floats(1e-3, 10.0),
        st.floats(max_value=-1e-300, allow_infinity=True),
        st.sampled_from([float("inf"), float("nan"), 1e308, 1e-45, -0.0]),
    )


def max_new_tokens() -> st.SearchStrategy[int]:
    """At most 2 new tokens when accepted; otherwise too many for the model (rejected before any work).

    0 (= the default 64) is left out: 64 tokens per example is too slow here.
    """
    return st.one_of(st.sampled_from([1, 2]), st.sampled_from([8192, 8193, UINT32]), st.integers(8193, UINT32))


@st.composite
def json_values(draw):
    """Hostile JSON values: numbers of every size, NaN, strings, null, nested containers."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 70000),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["NaN", "Infinity", "1e400", "-1", "float32", "int4"]),
    )
    return draw(
        st.recursive(
            scalars,
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
            max_leaves=6,
        )
    )


def print_summary(config, elapsed_s: float) -> None:
    """The tally, on the terminal even when pytest captures output."""
    reporter = config.pluginmanager.getplugin("terminalreporter") if config is not None else None
    capture = config.pluginmanager.getplugin("capturemanager") if config is not None else None
    if reporter is None or capture is None:
        print("\n".join(TALLY.lines(elapsed_s)), file=sys.__stdout__)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in TALLY.lines(elapsed_s):
            reporter.write_line(line)
