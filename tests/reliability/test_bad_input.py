"""Property-based bad-input tests over every RPC of every service (hypothesis).

The store, a prefill worker, a decode worker and the gateway run in-process on loopback, wired
together with the real SmolLM2, authentication on (a service token and the tenant tokens of
``acme`` and ``beta``; the workers call each other with the service token). Requests go through a
generic channel (bytes in, bytes out), so the tests send random bytes, truncated messages, forged
and corrupted codec frames, NaN/Inf, negative and huge numbers, empty and enormous repeated fields,
unknown methods, keys of other tenants, missing and wrong tokens.

Properties of every example:
- the status code is OK or a clean rejection (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
  UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...), never UNKNOWN or INTERNAL, and where the right code is
  known (auth, key syntax, tenants, corrupted frames, NaN) exactly that one;
- every rejection has a message that says what was wrong (a few targeted cases: that it names the
  offending field);
- the servers stay up (health SERVING), a rejected Put stores nothing (entries and bytes unchanged),
  an accepted one reads back bit-exact and deletes cleanly;
- the known-good entry put at the start reads back bit-exact after every test.

Bugs these tests found in product code (fixed) are pinned by the regression tests at the end; the
property tests keep clear of their inputs, except the random-bytes test, which tolerates (and
counts) the one bug every protobuf RPC has (undecodable request -> UNKNOWN).

``DKV_BAD_INPUT_SCALE=4`` multiplies the example counts for a longer fuzzing run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import grpc
import pytest
import torch
from bad_input_fixtures import (
    DECODE,
    GATEWAY,
    GOOD_AUTH,
    GOOD_ENTRY,
    GOOD_FRAMES,
    GOOD_KEY,
    GOOD_PAGES,
    KEY_PART,
    KVSTORE,
    MAX_MESSAGE,
    MODEL_RPCS,
    OK,
    PREFILL,
    PREFILL_MAX_TOKENS,
    RPCS,
    SERVICE_TOKEN,
    SERVING,
    TEMPLATES,
    TENANT_OF,
    TENANT_TOKENS,
    UINT32,
    UINT64,
    Outcome,
    Plan,
    any_floats,
    assert_sane,
    auths,
    bad_parts,
    decodes,
    health,
    hostile_recipes,
    json_values,
    key_parts,
    keys,
    leaf_paths,
    make_frame,
    max_new_tokens,
    messages,
    payload_of,
    print_summary,
    raw_call,
    reencode,
    set_path,
    short_text,
    temperatures,
    token_ids,
    uint32s,
    valid_recipes,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from in_process import InProcessServer

from dkv.kvstore import codec
from dkv.kvstore.codec import DTYPES, FRAME_HEAD_BYTES, FRAME_LIMIT, KIND_DATA, KIND_HEADER, READABLE_VERSIONS
from dkv.kvstore.errors import InvalidEntry, KVStoreError
from dkv.services.decode_server import DecodeServer
from dkv.services.gateway_server import GatewayServer
from dkv.services.pb import common_pb2, decode_pb2, gateway_pb2, prefill_pb2, store_pb2
from dkv.services.prefill_client import PrefillClient
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import DecodeSettings, GatewaySettings, PrefillSettings, StoreSettings
from dkv.services.shards import open_store
from dkv.services.store_server import StoreServer
from dkv.services.transport import Security
from dkv.services.wire import parse_frame_message, recipe_from_proto
from dkv.testing import synthetic_entry
from dkv.workers.decode_worker import DecodeWorker
from dkv.workers.prefill import PrefillWorker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCALE = float(os.environ.get("DKV_BAD_INPUT_SCALE", "1"))
C = grpc.StatusCode
MIN_CHUNK_SIZE = 8  # the system's (below the default of 16): small chunks keep the model's work small
UNAUTH = {C.UNAUTHENTICATED}
STORE_TIMEOUT, MODEL_TIMEOUT = 30.0, 120.0
CONTEXT = "The pass key is 71432. Remember it. The grass is green and the sky is blue."


def examples(n: int, **kwargs):
    return settings(
        max_examples=max(1, round(n * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        **kwargs,
    )


# ------------------------------------------------------------------------------------- the system


class System:
    """The four servers, a raw channel to each, the entries the tests rely on."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.servers, self.channels = [], {}
        auth = dict(auth_token=SERVICE_TOKEN, tenant_tokens=TENANT_TOKENS)
        security = Security(SERVICE_TOKEN)
        self.store = self._start(
            StoreServer(
                StoreSettings(
                    port=0, cpu_bytes=1 << 30, max_entry_bytes=64 << 20, min_chunk_size=MIN_CHUNK_SIZE, **auth
                )
            )
        )
        self.prefill = self._start(
            PrefillServer(
                PrefillSettings(port=0, **auth),
                PrefillWorker(
                    model,
                    tokenizer,
                    open_store(self.store.address, timeout_s=60, security=security),
                    max_tokens=PREFILL_MAX_TOKENS,
                    min_chunk_size=MIN_CHUNK_SIZE,
                ),
            )
        )
        self.prefill_client = PrefillClient(self.prefill.address, 120, security)
        self.decode = self._start(
            DecodeServer(
                DecodeSettings(port=0, **auth),
                DecodeWorker(
                    model,
                    tokenizer,
                    open_store(self.store.address, timeout_s=60, security=security),
                    self.prefill_client,
                ),
            )
        )
        self.gateway = self._start(
            GatewayServer(
                GatewaySettings(
                    port=0, prefill=self.prefill.address, decode=self.decode.address, timeout_s=MODEL_TIMEOUT, **auth
                )
            )
        )
        # client side: no send limit (so a message over the servers' 8 MiB limit reaches them), large replies
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channels = {
            s: grpc.insecure_channel(srv.address, options=options)
            for s, srv in (
                (KVSTORE, self.store),
                (PREFILL, self.prefill),
                (DECODE, self.decode),
                (GATEWAY, self.gateway),
            )
        }
        self.fingerprint = model.dkv_fingerprint
        self.vocab = len(tokenizer)
        self._setup_entries()

    def _start(self, server) -> InProcessServer:
        running = InProcessServer(server)
        self.servers.append(running)
        return running

    def call(self, rpc: str, payload, auth: str = "service", timeout: float | None = None) -> Outcome:
        service = RPCS[rpc][0]
        timeout = timeout or (MODEL_TIMEOUT if rpc in MODEL_RPCS else STORE_TIMEOUT)
        return raw_call(self.channels[service], rpc, payload, auth, timeout)

    def _setup_entries(self) -> None:
        put = self.call("Put", messages(GOOD_FRAMES), "acme")
        assert put.code == OK, str(put)
        assert store_pb2.PutResponse.FromString(put.replies[0]).key == GOOD_KEY
        self.context_ids = self.tokenizer(CONTEXT).input_ids
        assert len(self.context_ids) <= 40
        self.keys = {}  # (tenant, recipe name) -> keys
        for tenant in ("acme", "beta"):
            for name, recipe in (
                ("full", common_pb2.Recipe(method="full")),
                ("chunked", common_pb2.Recipe(method="snapkv", ratio=0.5, chunked=True, chunk_size=8)),
            ):
                request = prefill_pb2.PrefillRequest(recipe=recipe)
                request.token_ids.ids.extend(self.context_ids)
                reply = self.call("Prefill", request.SerializeToString(), tenant)
                assert reply.code == OK, str(reply)
                self.keys[tenant, name] = list(prefill_pb2.PrefillResponse.FromString(reply.replies[0]).keys)
        assert len(self.keys["acme", "chunked"]) == -(-len(self.context_ids) // 8)
        self.real_frames = self.get_frames(self.keys["acme", "full"][0])

    def keys_of(self, tenant: str | None) -> list[list[str]]:
        """The real key lists a caller acting for ``tenant`` (None: any) may read."""
        return [k for (t, _), k in sorted(self.keys.items()) if tenant is None or t == tenant]

    def get_frames(self, key: str) -> list[bytes]:
        got = self.call("Get", store_pb2.GetRequest(key=key).SerializeToString())
        assert got.code == OK, str(got)
        return [bytes(store_pb2.Frame.FromString(r).data) for r in got.replies]

    def stats(self) -> store_pb2.StatsResponse:
        got = self.call("Stats", b"")
        assert got.code == OK, str(got)
        return store_pb2.StatsResponse.FromString(got.replies[0])

    def check_alive(self) -> None:
        """Every server SERVING; the known-good entries read back bit-exact."""
        for service, channel in self.channels.items():
            assert health(channel) == SERVING, f"{service} is not SERVING"
        assert self.get_frames(GOOD_KEY) == GOOD_FRAMES, "the known-good entry changed"
        assert self.get_frames(self.keys["acme", "full"][0]) == self.real_frames, "a prefilled entry changed"

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        if getattr(self, "prefill_client", None) is not None:
            self.prefill_client.close()
        for running in reversed(self.servers):
            running.stop()


@pytest.fixture(scope="module")
def system(smollm2, request):
    started = time.perf_counter()
    running = System.__new__(System)  # so that the servers started so far stop if a later one fails
    try:
        running.__init__(*smollm2)
    except BaseException:
        running.stop()
        raise
    yield running
    try:
        running.check_alive()
    finally:
        running.stop()
        print_summary(request.config, time.perf_counter() - started)


@pytest.fixture(autouse=True)
def alive_after_each_test(system):
    """After each test (each batch of examples): servers up, known-good entries intact."""
    yield
    system.check_alive()


def tenant_allows(auth: str, tenant: str) -> bool:
    return auth == "service" or TENANT_OF.get(auth) == (tenant or TENANT_OF.get(auth))


def key_expectation(key: str, auth: str, exists: bool, rpc: str) -> set:
    """The one status a key-addressed request must end with."""
    if auth not in GOOD_AUTH:
        return UNAUTH
    parts = key.split("/")
    if len(parts) != 4 or not all(KEY_PART.fullmatch(p) for p in parts):
        return {C.INVALID_ARGUMENT}
    if auth in TENANT_OF and parts[0] != TENANT_OF[auth]:
        return {C.PERMISSION_DENIED}
    if rpc == "Delete":
        return {OK}
    return {OK} if exists else {C.NOT_FOUND}


forged_keys = keys()


# ------------------------------------------------------------------------------ raw bytes, all RPCs


def wire_messages(max_fields: int = 6) -> st.SearchStrategy[bytes]:
    """Well-formed protobuf wire format with random fields, wire types and values."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def encode(fields) -> bytes:
        out = b""
        for number, wire, value in fields:
            out += varint(number << 3 | wire)
            if wire == 0:
                out += varint(value % (1 << 64))
            elif wire == 1:
                out += (value % (1 << 64)).to_bytes(8, "little")
            elif wire == 5:
                out += (value % (1 << 32)).to_bytes(4, "little")
            else:
                blob = (
                    value.to_bytes(max(1, (value.bit_length() + 7) // 8), "little") if isinstance(value, int) else value
                )
                out += varint(len(blob)) + blob
        return out

    value = st.one_of(st.integers(0, UINT64), st.binary(max_size=40), st.text(max_size=20).map(str.encode))
    field_ = st.tuples(st.integers(1, 20), st.sampled_from([0, 1, 2, 5]), value).map(
        lambda f: (f[0], f[1], f[2] if f[1] == 2 else (f[2] if isinstance(f[2], int) else len(f[2])))
    )
    return st.lists(field_, max_size=max_fields).map(encode)


def valid_requests(system) -> dict:
    """One valid request per RPC. Decode's and Generate's start with max_new_tokens=1 (protobuf merges
    concatenated messages), so that a truncated copy keeps it."""
    ids = system.context_ids
    one = decode_pb2.DecodeRequest(max_new_tokens=1).SerializeToString()
    return {
        "Put": messages(TEMPLATES[0].frames),
        "Get": store_pb2.GetRequest(key=GOOD_KEY).SerializeToString(),
        "Lookup": store_pb2.LookupRequest(
            model_fingerprint=system.fingerprint, token_ids=ids, recipe=common_pb2.Recipe(method="full")
        ).SerializeToString(),
        "Probe": store_pb2.ProbeRequest(keys=[GOOD_KEY, GOOD_KEY[:-1] + "0"]).SerializeToString(),
        "Delete": store_pb2.DeleteRequest(key=GOOD_KEY).SerializeToString(),
        "Summaries": store_pb2.GetRequest(key=GOOD_KEY).SerializeToString(),
        "Select": store_pb2.SelectRequest(key=GOOD_KEY, layer=1, pages=[0, 2, 3]).SerializeToString(),
        "Stats": b"",
        "Prefill": prefill_pb2.PrefillRequest(
            token_ids=prefill_pb2.TokenIds(ids=ids), tenant="acme", recipe=common_pb2.Recipe(method="full")
        ).SerializeToString(),
        "Entries": prefill_pb2.PrefillRequest(
            token_ids=prefill_pb2.TokenIds(ids=ids), tenant="acme", recipe=common_pb2.Recipe(method="full")
        ).SerializeToString(),
        "Decode": one
        + decode_pb2.DecodeRequest(
            keys=system.keys["acme", "full"], query_text="Hi", selection="topk", budget=8, tenant="acme"
        ).SerializeToString(),
        "Generate": gateway_pb2.GenerateRequest(max_new_tokens=1).SerializeToString()
        + gateway_pb2.GenerateRequest(context_text=CONTEXT, query_text="Hi", tenant="acme").SerializeToString(),
    }


@pytest.mark.parametrize("rpc", list(RPCS))
@examples(40)
@given(data=st.data())
def test_random_bytes_are_refused_cleanly(system, rpc, data):
    """Random bytes, random wire-format messages and truncated valid requests, with every kind of token."""
    auth = data.draw(auths(), "auth")
    valid = valid_requests(system)[rpc]
    structured = rpc not in MODEL_RPCS  # random but well-formed fields could ask a model for 64 tokens
    random = st.one_of(st.binary(max_size=300), wire_messages()) if structured else st.binary(max_size=300)
    if rpc == "Put":
        last = data.draw(st.integers(0, len(valid) - 1), "cut frame")
        truncated = st.integers(0, len(valid[last]) - 1).map(lambda cut: valid[:last] + [valid[last][:cut]])
        msgs = data.draw(st.one_of(st.lists(random, min_size=1, max_size=4), truncated), "messages")
        outcome = system.call(rpc, msgs, auth)
        # the header's tenant is checked before any data frame is read: a whole header of another
        # tenant's entry is PERMISSION_DENIED, however the stream goes on
        tenant = header_tenant(msgs)
        foreign = auth in GOOD_AUTH and tenant is not None and not tenant_allows(auth, tenant)
        expected = {C.PERMISSION_DENIED} if foreign else {C.INVALID_ARGUMENT}
        assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else expected)
        return
    truncated = st.integers(0, max(0, len(valid) - 1)).map(lambda cut: valid[:cut])
    payload = data.draw(st.one_of(random, truncated), "payload")
    outcome = system.call(rpc, payload, auth)
    assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else None)


@pytest.mark.parametrize("service", [KVSTORE, PREFILL, DECODE, GATEWAY])
@pytest.mark.parametrize("method", ["Nope", "get", "Put/", ""])
@pytest.mark.parametrize("auth", ["service", "none"])
def test_unknown_methods_are_unimplemented(system, service, method, auth):
    for path in (f"/{service}/{method}", f"/dkv.v1.Nope/{method or 'Get'}", f"/{service}"):
        outcome = raw_call(system.channels[service], "unknown", b"\x0a\x01x", auth, path=path)
        assert_sane(outcome, expected={C.UNIMPLEMENTED})


@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize("auth", ["none", "wrong", "malformed", "empty"])
def test_requests_without_a_valid_token_are_unauthenticated(system, rpc, auth):
    """A perfectly valid request, but no token, a wrong one or a malformed header."""
    valid = valid_requests(system)[rpc]
    if rpc not in ("Put", "Delete"):  # it is valid indeed (those two would change the store)
        assert system.call(rpc, valid, "acme").code == OK
    before = system.stats()
    outcome = system.call(rpc, valid, auth)
    assert_sane(outcome, expected=UNAUTH)
    assert (
        ("authorization: Bearer" in outcome.details)
        if auth in ("none", "malformed", "empty")
        else ("invalid bearer token" in outcome.details)
    )
    after = system.stats()
    assert (after.entries, after.puts) == (before.entries, before.puts)


# ------------------------------------------------------------------------------------- store: Put


def frame_ops(frames: list[bytes], draw) -> list[bytes]:
    """1-3 byte-level changes to the frame list: drop, duplicate, swap, truncate, flip, pad, replace."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 3), "n ops")):
        op = draw(
            st.sampled_from(["drop", "dup", "swap", "truncate", "flip", "pad", "random", "insert", "foreign"]), "op"
        )
        if not frames:
            frames.append(draw(st.binary(max_size=100), "new"))
            continue
        i = draw(st.integers(0, len(frames) - 1), "i")
        if op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(draw(st.integers(0, len(frames)), "at"), frames[i])
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1), "j")
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)), "cut")]
        elif op == "flip" and frames[i]:
            at = draw(st.integers(0, len(frames[i]) - 1), "at")
            frames[i] = frames[i][:at] + bytes([frames[i][at] ^ draw(st.integers(1, 255), "xor")]) + frames[i][at + 1 :]
        elif op == "pad":
            frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=64), "pad")
        elif op == "random":
            frames[i] = draw(st.binary(max_size=200), "random")
        elif op == "insert":
            frames.insert(i, draw(st.binary(max_size=200), "random"))
        else:
            other = draw(st.sampled_from(TEMPLATES), "other")
            frames[i] = other.frames[min(i, len(other.frames) - 1)]
    return frames


@st.composite
def put_streams(draw):
    """(kind, template, Put messages, the exact status expected with a good token or None)."""
    t = draw(st.sampled_from(TEMPLATES), "template")
    header, data = t.header, t.data
    kind = draw(
        st.sampled_from(
            [
                "intact",
                "resplit",
                "frame_ops",
                "frame_ops",
                "header_edit",
                "header_edit",
                "header_delete",
                "header_whole",
                "tensor_nan",
                "tensor_bytes",
                "table_edit",
                "raw",
                "empty",
                "mixed",
                "version",
            ]
        ),
        "kind",
    )
    exact = None
    if kind == "intact":
        frames, exact = t.frames, OK
    elif kind == "resplit":  # the same entry cut into other frame sizes: still valid
        piece = draw(st.sampled_from([64, 1000, 4096, FRAME_LIMIT - FRAME_HEAD_BYTES]), "piece")
        frames, exact = reencode(header, data, piece), OK
    elif kind == "frame_ops":
        frames = frame_ops(t.frames, draw)
        exact = C.INVALID_ARGUMENT
        for other in TEMPLATES:  # the ops may have rebuilt a whole valid entry (rarely)
            if frames == other.frames:
                t, exact = other, OK
    elif kind == "header_edit":
        path = draw(st.sampled_from(leaf_paths(header)), "path")
        value = draw(json_values(), "value")
        frames = reencode(
            set_path(header, path, value),
            data,
            draw(st.sampled_from([64, 1024, 4096]), "piece"),
            recompute_hash=path != ("data_xxh3",),
        )
    elif kind == "header_delete":
        path = draw(st.sampled_from(leaf_paths(header)), "path")
        frames = reencode(set_path(header, path, None, delete=True), data)
        exact = C.INVALID_ARGUMENT if len(path) <= 2 else None
    elif kind == "header_whole":
        frames, exact = reencode(draw(json_values(), "header"), data), C.INVALID_ARGUMENT
    elif kind in ("tensor_nan", "tensor_bytes"):
        floats = [s for s in header["tensors"] if s[2] in ("float16", "bfloat16", "float32") and s[5]]
        spec = draw(st.sampled_from(floats if kind == "tensor_nan" else [s for s in header["tensors"] if s[5]]), "spec")
        _, name, dtype, _, offset, nbytes = spec
        size = DTYPES[dtype].itemsize
        at = offset + size * draw(st.integers(0, nbytes // size - 1), "element")
        if kind == "tensor_nan":
            value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), "value")
            patch = torch.tensor([value], dtype=DTYPES[dtype]).view(torch.uint8).numpy().tobytes()
            exact = C.INVALID_ARGUMENT
        else:
            patch = draw(st.binary(min_size=size, max_size=size), "bytes")
        data = data[:at] + patch + data[at + len(patch) :]
        frames = reencode(header, data)
    elif kind == "table_edit":
        i = draw(st.integers(0, len(header["tensors"]) - 1), "spec")
        layer, name, dtype, shape, offset, nbytes = header["tensors"][i]
        new_dtype = draw(st.sampled_from(sorted(DTYPES) + ["float64", "int8", "", "x" * 100]), "dtype")
        size = DTYPES.get(new_dtype, DTYPES[dtype]).itemsize
        new_shape = draw(
            st.one_of(
                st.just([nbytes // size] if nbytes % size == 0 else shape),
                st.lists(st.integers(-2, 64), max_size=3),
                st.just(list(reversed(shape))),
            ),
            "shape",
        )
        new_layer = draw(st.sampled_from([layer, layer + 1, -1, 4096]), "layer")
        new_name = draw(st.sampled_from([name, "keys", "positions", "key_bits", "bogus"]), "name")
        tensors = [list(s) for s in header["tensors"]]
        tensors[i] = [new_layer, new_name, new_dtype, new_shape, offset, nbytes]
        frames = reencode({**header, "tensors": tensors}, data)
    elif kind == "raw":
        return kind, t, draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4), "raw"), C.INVALID_ARGUMENT
    elif kind == "empty":
        return kind, t, [], C.INVALID_ARGUMENT
    elif kind == "version":
        entry_id = t.frames[0][8:16]
        frames = [
            make_frame(
                KIND_HEADER if n == 0 else KIND_DATA,
                entry_id,
                n,
                len(t.frames),
                payload_of(f),
                version=draw(st.sampled_from([0, max(READABLE_VERSIONS) + 1, 65535]), "version"),  # unreadable
            )
            for n, f in enumerate(t.frames)
        ]
        exact = C.INVALID_ARGUMENT
    else:  # the header of one entry, the data frames of another
        other = draw(st.sampled_from([o for o in TEMPLATES if o is not t]), "other")
        frames, exact = [t.frames[0], *other.frames[1:]], C.INVALID_ARGUMENT
    return kind, t, messages(frames), exact


def header_tenant(msgs: list[bytes]) -> str | None:
    """The tenant of the stream's first frame when it is a valid header (what the store checks first)."""
    first = parse_frame_message(msgs[0]) if msgs else None
    try:
        return codec.parse_header(first).identity.tenant if first is not None else None
    except KVStoreError:
        return None


@examples(160)
@given(stream=put_streams(), auth=auths())
def test_put_of_hostile_frames(system, stream, auth):
    """Corrupted, forged, inconsistent or foreign frames: refused with nothing stored; what is accepted
    reads back bit-exact and deletes cleanly."""
    kind, template, msgs, exact = stream
    before = system.stats()
    outcome = system.call("Put", msgs, auth)
    tenant = header_tenant(msgs)
    if auth not in GOOD_AUTH:
        expected = UNAUTH
    elif tenant is not None and not tenant_allows(auth, tenant):
        # the header's tenant is checked as soon as the header arrives, before any data frame
        expected = {C.PERMISSION_DENIED}
    elif exact is not None:
        expected = {exact}
    else:
        expected = {OK, C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.RESOURCE_EXHAUSTED}
    assert_sane(outcome, expected=expected)
    if kind == "tensor_nan" and outcome.code == C.INVALID_ARGUMENT:
        assert "NaN or Inf" in outcome.details
    after = system.stats()
    if outcome.code != OK:
        assert after.entries == before.entries and after.puts == before.puts, f"{kind}: a refused Put was stored"
        assert [t.used_bytes for t in after.tiers] == [t.used_bytes for t in before.tiers]
        return
    key = store_pb2.PutResponse.FromString(outcome.replies[0]).key
    assert key != GOOD_KEY and after.entries == before.entries + 1
    sent = [bytes(store_pb2.Frame.FromString(m).data) for m in msgs]
    assert system.get_frames(key) == sent, "an accepted entry does not read back bit-exact"
    assert_sane(system.call("Summaries", store_pb2.GetRequest(key=key).SerializeToString()), expected={OK})
    assert_sane(system.call("Select", store_pb2.SelectRequest(key=key, layer=0).SerializeToString()), expected={OK})
    deleted = system.call("Delete", store_pb2.DeleteRequest(key=key).SerializeToString())
    assert deleted.code == OK and store_pb2.DeleteResponse.FromString(deleted.replies[0]).deleted
    final = system.stats()
    assert final.entries == before.entries
    assert [t.used_bytes for t in final.tiers] == [t.used_bytes for t in before.tiers]


def test_put_over_the_message_limit_is_resource_exhausted(system):
    """One message over gRPC's 8 MiB limit: refused by gRPC itself, nothing stored."""
    before = system.stats()
    frame = make_frame(KIND_HEADER, b"\0" * 8, 0, 1, b"{" + b" " * MAX_MESSAGE + b"}")
    outcome = system.call("Put", messages([frame]))
    assert_sane(outcome, expected={C.RESOURCE_EXHAUSTED})
    assert "larger than max" in outcome.details
    assert system.stats().entries == before.entries


def entry_id_of(header_payload: bytes) -> bytes:
    return hashlib.blake2b(header_payload, digest_size=8).digest()


def test_put_claiming_more_than_the_entry_limit_is_resource_exhausted(system):
    """A consistent header announcing 100 MiB of data (over the store's 64 MiB limit), no data sent."""
    header = TEMPLATES[0].header
    n = 100 << 20
    header = {**header, "num_layers": 1, "tensors": [[0, "keys", "uint8", [n], 0, n]], "data_bytes": n}
    payload = json.dumps(header).encode()
    frames = [make_frame(KIND_HEADER, entry_id_of(payload), 0, 1 + -(-n // (FRAME_LIMIT - FRAME_HEAD_BYTES)), payload)]
    before = system.stats()
    outcome = system.call("Put", messages(frames), "acme")
    assert_sane(outcome, expected={C.RESOURCE_EXHAUSTED})
    assert "over the limit" in outcome.details
    assert system.stats().entries == before.entries


def test_put_of_a_large_valid_entry_near_the_message_limit_is_accepted(system):
    """Frames of 4 MiB (the largest allowed): accepted, bit-exact, deleted."""
    entry = synthetic_entry(
        seq_len=1024, num_layers=3, num_kv_heads=4, head_dim=256, seed=5, tenant="beta", dtype=torch.float32
    )
    frames = codec.encode(entry, max_frame_bytes=FRAME_LIMIT)
    assert len(frames) >= 3 and max(len(f) for f in frames) > (4 << 20) - 4096
    outcome = system.call("Put", messages(frames), "beta")
    assert_sane(outcome, expected={OK})
    key = store_pb2.PutResponse.FromString(outcome.replies[0]).key
    assert system.get_frames(key) == [bytes(f) for f in frames]
    assert system.call("Delete", store_pb2.DeleteRequest(key=key).SerializeToString(), "beta").code == OK


# --------------------------------------------------------------------------- store: key-addressed RPCs


@pytest.mark.parametrize("rpc", ["Get", "Summaries", "Delete"])
@examples(90)
@given(key=st.one_of(forged_keys, st.just(GOOD_KEY)), auth=auths())
def test_key_rpcs_with_forged_and_malformed_keys(system, rpc, key, auth):
    if rpc == "Delete" and key == GOOD_KEY:
        assume(auth not in ("service", "acme"))  # that one would really delete it
    message = (store_pb2.DeleteRequest if rpc == "Delete" else store_pb2.GetRequest)(key=key)
    before = system.stats().entries
    outcome = system.call(rpc, message.SerializeToString(), auth)
    assert_sane(outcome, expected=key_expectation(key, auth, key == GOOD_KEY, rpc))
    if outcome.code == OK and rpc == "Delete":
        assert not store_pb2.DeleteResponse.FromString(outcome.replies[0]).deleted
    if outcome.code == OK and rpc == "Get":
        assert [bytes(store_pb2.Frame.FromString(r).data) for r in outcome.replies] == GOOD_FRAMES
    if outcome.code == OK and rpc == "Summaries":
        assert len(outcome.replies) == GOOD_ENTRY.num_layers
    assert system.stats().entries == before


@examples(120)
@given(
    key=st.one_of(st.just(GOOD_KEY), st.just(GOOD_KEY), forged_keys),
    auth=auths(),
    layer=st.one_of(st.integers(0, 3), uint32s),
    pages=st.one_of(
        st.lists(st.integers(0, 24), max_size=12),
        st.lists(uint32s, max_size=6),
        st.sets(st.integers(0, 19), max_size=20).map(sorted),
    ),
)
def test_select_with_hostile_layers_and_pages(system, key, auth, layer, pages):
    request = store_pb2.SelectRequest(key=key, layer=layer, pages=pages)
    expected = key_expectation(key, auth, key == GOOD_KEY, "Select")
    if expected == {OK}:
        n_pages = GOOD_PAGES[layer] if layer < len(GOOD_PAGES) else 0
        good_pages = all(0 <= p < n_pages for p in pages) and all(a < b for a, b in zip(pages, pages[1:]))
        expected = {OK} if layer < len(GOOD_PAGES) and good_pages else {C.INVALID_ARGUMENT}
    outcome = system.call("Select", request.SerializeToString(), auth)
    assert_sane(outcome, expected=expected)
    if outcome.code == C.INVALID_ARGUMENT and expected == {C.INVALID_ARGUMENT} and key == GOOD_KEY:
        assert ("layer" in outcome.details) if layer >= len(GOOD_PAGES) else ("pages" in outcome.details)
    if outcome.code == OK:
        replies = [store_pb2.LayerPages.FromString(r) for r in outcome.replies]
        assert sum(len(r.pages) for r in replies) == len(pages)


def lookup_expectation(request: store_pb2.LookupRequest, auth: str) -> set:
    if auth not in GOOD_AUTH:
        return UNAUTH
    try:
        recipe = recipe_from_proto(request.recipe)
    except InvalidEntry:
        return {C.INVALID_ARGUMENT}
    if not request.token_ids or recipe.chunk_size < MIN_CHUNK_SIZE:
        return {C.INVALID_ARGUMENT}
    if auth in TENANT_OF and request.tenant and request.tenant != TENANT_OF[auth]:
        return {C.PERMISSION_DENIED}
    tenant = request.tenant or TENANT_OF.get(auth, "default")
    if not KEY_PART.fullmatch(tenant) or not KEY_PART.fullmatch(request.model_fingerprint):
        return {C.INVALID_ARGUMENT}
    return {OK}


@examples(120)
@given(data=st.data())
def test_lookup_with_hostile_requests(system, data):
    auth = data.draw(auths(), "auth")
    pick = Plan(data.draw, ["tenant", "fingerprint", "recipe", "ids"])
    tenant = pick(
        "tenant",
        st.sampled_from(["", TENANT_OF.get(auth, "acme")]),
        st.one_of(st.sampled_from(["acme", "beta", "default"]), short_text, bad_parts),
    )
    fingerprint = pick(
        "fingerprint",
        st.sampled_from([system.fingerprint, GOOD_ENTRY.identity.model_fingerprint]),
        st.one_of(st.just(""), key_parts, short_text, bad_parts),
    )
    recipe = pick(
        "recipe",
        st.one_of(st.just(common_pb2.Recipe(method="full")), valid_recipes()),
        st.one_of(hostile_recipes(), st.just(None)),
    )
    ids = pick(
        "ids",
        st.one_of(
            st.lists(st.integers(0, 49151), min_size=1, max_size=40),
            st.just(list(range(1000, 1040))),
            st.just(system.context_ids),
        ),
        st.one_of(st.lists(uint32s, max_size=30), st.just([]), st.integers(0, 3000).map(lambda n: list(range(n)))),
    )
    request = store_pb2.LookupRequest(tenant=tenant, model_fingerprint=fingerprint, token_ids=ids)
    if recipe is not None:
        request.recipe.CopyFrom(recipe)
    outcome = system.call("Lookup", request.SerializeToString(), auth)
    assert_sane(outcome, expected=lookup_expectation(request, auth))
    if outcome.code == OK:
        reply = store_pb2.LookupResponse.FromString(outcome.replies[0])
        assert reply.cached_tokens <= len(ids) and len(reply.keys) == len(reply.tiers)


def test_lookup_finds_the_good_entry_only_in_its_tenant(system):
    request = store_pb2.LookupRequest(
        model_fingerprint=GOOD_ENTRY.identity.model_fingerprint, token_ids=list(range(1000, 1040))
    )
    request.recipe.CopyFrom(common_pb2.Recipe(method="full"))
    for auth, tenant, hit in (
        ("acme", "", True),
        ("service", "acme", True),
        ("beta", "", False),
        ("service", "", False),
    ):
        request.tenant = tenant
        outcome = system.call("Lookup", request.SerializeToString(), auth)
        assert_sane(outcome, expected={OK})
        reply = store_pb2.LookupResponse.FromString(outcome.replies[0])
        assert reply.hit == hit and (list(reply.keys) == [GOOD_KEY]) == hit
    request.tenant = "acme"
    outcome = system.call("Lookup", request.SerializeToString(), "beta")
    assert_sane(outcome, expected={C.PERMISSION_DENIED})
    assert "'beta'" in outcome.details and "'acme'" in outcome.details


@examples(30)
@given(payload=wire_messages(), auth=auths())
def test_stats_ignores_unknown_fields(system, payload, auth):
    outcome = system.call("Stats", payload, auth)
    if not decodes(store_pb2.StatsRequest, payload):
        return  # the undecodable-request bug; test_random_bytes_are_refused_cleanly counts it
    assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else {OK})


# ------------------------------------------------------------------------------------ model RPCs


def model_outcome_ok(rpc: str, outcome: Outcome) -> None:
    """An accepted Decode / Generate streamed at most 2 tokens, then its stats."""
    response = decode_pb2.DecodeResponse if rpc == "Decode" else gateway_pb2.GenerateResponse
    replies = [response.FromString(r) for r in outcome.replies]
    assert replies and replies[-1].HasField("stats") and all(r.HasField("token") for r in replies[:-1])
    assert len(replies) - 1 <= 2


def tenants(auth: str):
    """(valid, hostile) tenant fields for a caller."""
    own = TENANT_OF.get(auth)
    valid = st.sampled_from(["", own] if own else ["", "acme", "beta", "default"])
    hostile = st.one_of(st.sampled_from(["acme", "beta", "default", "a" * 129, "a/b"]), short_text)
    return valid, hostile


@examples(35)
@given(data=st.data())
def test_prefill_with_hostile_requests(system, data):
    auth = data.draw(auths(good_weight=12), "auth")
    pick = Plan(data.draw, ["context", "recipe", "tenant"])
    context = pick(
        "context",
        st.one_of(
            st.lists(st.integers(0, system.vocab - 1), min_size=1, max_size=40).map(lambda i: ("ids", i)),
            st.text(st.characters(codec="ascii"), min_size=1, max_size=60).map(lambda t: ("text", t)),
        ),
        st.one_of(token_ids().map(lambda i: ("ids", i)), st.text(max_size=200).map(lambda t: ("text", t)), st.none()),
    )
    recipe = pick("recipe", st.one_of(st.none(), valid_recipes()), hostile_recipes(small_chunks=False))
    request = prefill_pb2.PrefillRequest(tenant=pick("tenant", *tenants(auth)))
    if context is not None and context[0] == "ids":
        request.token_ids.ids.extend(context[1])
    elif context is not None:
        request.text = context[1]
    if recipe is not None:
        request.recipe.CopyFrom(recipe)
    outcome = system.call("Prefill", request.SerializeToString(), auth)
    assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else None)
    if outcome.code == OK:
        reply = prefill_pb2.PrefillResponse.FromString(outcome.replies[0])
        assert reply.keys and reply.model_fingerprint == system.fingerprint
        assert reply.cached_tokens + reply.prefilled_tokens == reply.context_tokens
        if context[0] == "ids":
            assert reply.context_tokens == len(request.token_ids.ids)


SAMPLING = ["selection", "budget", "budget_fraction", "max_new_tokens", "temperature", "top_p"]


def sampling_fields(pick) -> dict:
    return dict(
        selection=pick(
            "selection",
            st.sampled_from(["", "dense", "topk", "pages"]),
            st.one_of(st.sampled_from(["nope", "PAGES", "dense "]), short_text),
        ),
        budget=pick("budget", st.one_of(st.just(0), st.integers(1, 64)), st.one_of(uint32s, st.integers(8193, UINT32))),
        budget_fraction=pick("budget_fraction", st.one_of(st.just(0.0), st.floats(0, 1)), any_floats),
        max_new_tokens=pick("max_new_tokens", st.sampled_from([1, 2]), max_new_tokens()),
        temperature=pick("temperature", st.one_of(st.just(0.0), st.floats(0.1, 2.0)), temperatures()),
        top_p=pick("top_p", st.one_of(st.just(0.0), st.floats(0.05, 1.0)), any_floats),
        seed=pick("seed", st.integers(0, UINT64), st.integers(0, UINT64)),
    )


def queries(vocab: int):
    """(valid, hostile) queries: ("text", str) or ("ids", list) or None."""
    valid = st.one_of(
        st.sampled_from([("text", "\nWhat is the pass key?"), ("text", " Hi")]),
        st.text(st.characters(codec="ascii"), min_size=1, max_size=12).map(lambda t: ("text", t)),
        st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6).map(lambda i: ("ids", i)),
    )
    hostile = st.one_of(
        st.none(),
        st.just(("text", "")),
        st.just(("ids", [])),
        st.lists(st.integers(vocab, UINT32), min_size=1, max_size=4).map(lambda i: ("ids", i)),
        st.integers(8200, 9000).map(lambda n: ("ids", [13] * n)),
    )
    return valid, hostile


def set_query(request, query) -> None:
    if query is None:
        return
    if query[0] == "text":
        request.query_text = query[1]
    else:
        request.query_ids.ids.extend(query[1])


@examples(40)
@given(data=st.data())
def test_decode_with_hostile_requests(system, data):
    auth = data.draw(auths(good_weight=12), "auth")
    own = TENANT_OF.get(auth)  # keys of other tenants: test_decode_keys_of_another_tenant_are_permission_denied
    real = system.keys_of(own)
    pick = Plan(data.draw, ["keys", "context", "query", "tenant", "selection_cache", "paged", *SAMPLING])
    own_keys = keys(tenants=(own,) if own else ("acme", "beta", "default"))
    key_list = pick(
        "keys",
        st.sampled_from(real),
        st.one_of(
            st.just([]),
            st.sampled_from(real).flatmap(st.permutations),
            st.sampled_from(real).flatmap(lambda ks: st.lists(st.sampled_from(ks), min_size=1, max_size=4)),
            st.lists(own_keys, min_size=1, max_size=3),
            st.integers(1, 2000).map(lambda n: [f"{own or 'acme'}/{system.fingerprint}/r/h{i}" for i in range(n)]),
            st.lists(key_parts, min_size=1, max_size=3).map(
                lambda hs: [f"{own or 'beta'}/{system.fingerprint}/{h}/{h}" for h in hs]
            ),
        ),
    )
    fields = sampling_fields(pick)
    paged = fields["selection"] == "pages" and fields["budget"] > 0 and len(key_list) == 1
    request = decode_pb2.DecodeRequest(
        keys=key_list,
        **fields,
        selection_cache=pick("selection_cache", st.one_of(st.just(0.0), st.floats(0, 1)), any_floats),
        paged=pick("paged", st.sampled_from([False, paged]), st.just(not paged)),
        tenant=pick("tenant", *tenants(auth)),
    )
    recipe = None
    context = pick(
        "context",
        st.sampled_from([None, "ids", "text"]),
        st.one_of(
            token_ids().map(lambda i: ("bad ids", i)),
            st.text(max_size=200).map(lambda t: ("bad text", t)),
            st.just(("no recipe", None)),
        ),
    )
    if context is not None:
        kind = context if isinstance(context, str) else context[0]
        if kind == "ids":
            request.context_ids.ids.extend(system.context_ids)
        elif kind == "text":
            request.context_text = CONTEXT
        elif kind == "bad ids":
            request.context_ids.ids.extend(context[1])
        elif kind == "bad text":
            request.context_text = context[1]
        if kind != "no recipe":
            recipe = pick(
                "recipe",
                st.sampled_from(
                    [
                        common_pb2.Recipe(method="full"),
                        common_pb2.Recipe(method="snapkv", ratio=0.5, chunked=True, chunk_size=8),
                    ]
                ),
                hostile_recipes(False),
            )
        else:
            request.context_ids.ids.extend(system.context_ids)
    if recipe is not None:
        request.recipe.CopyFrom(recipe)
    set_query(request, pick("query", *queries(system.vocab)))
    outcome = system.call("Decode", request.SerializeToString(), auth)
    assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else None)
    if outcome.code == OK:
        model_outcome_ok("Decode", outcome)


@examples(30)
@given(data=st.data())
def test_generate_with_hostile_requests(system, data):
    auth = data.draw(auths(good_weight=12), "auth")
    pick = Plan(data.draw, ["context", "query", "chat_template", "recipe", "stop", "tenant", *SAMPLING])
    context = pick(
        "context",
        st.one_of(
            st.sampled_from([("text", CONTEXT), ("text", "Hello there."), ("ids", system.context_ids)]),
            st.text(st.characters(codec="ascii"), min_size=1, max_size=40).map(lambda t: ("text", t)),
        ),
        st.one_of(
            st.none(),
            st.just(("text", "")),
            token_ids().map(lambda i: ("ids", i)),
            st.text(max_size=300).map(lambda t: ("text", t)),
        ),
    )
    query = pick("query", *queries(system.vocab))
    texts = context is not None and context[0] == "text" and query is not None and query[0] == "text"
    request = gateway_pb2.GenerateRequest(
        **sampling_fields(pick),
        chat_template=pick("chat_template", st.just(False) if not texts else st.booleans(), st.just(not texts)),
        stop=pick("stop", st.lists(st.text(max_size=4), max_size=4), st.integers(0, 5000).map(lambda n: ["x"] * n)),
        tenant=pick("tenant", *tenants(auth)),
    )
    if context is not None and context[0] == "ids":
        request.context_ids.ids.extend(context[1])
    elif context is not None:
        request.context_text = context[1]
    recipe = pick(
        "recipe", st.one_of(st.none(), valid_recipes(chunk_sizes=(0, 16, 256))), hostile_recipes(small_chunks=False)
    )
    if recipe is not None:
        request.recipe.CopyFrom(recipe)
    set_query(request, query)
    outcome = system.call("Generate", request.SerializeToString(), auth)
    assert_sane(outcome, expected=UNAUTH if auth not in GOOD_AUTH else None)
    if outcome.code == OK:
        model_outcome_ok("Generate", outcome)


# ------------------------------------------------------------------ targeted: the field is named


def _decode(**fields):
    return decode_pb2.DecodeRequest(**fields).SerializeToString()


TARGETED = [
    ("Get", lambda s: store_pb2.GetRequest(key="").SerializeToString(), "acme", C.INVALID_ARGUMENT, "key is empty"),
    (
        "Get",
        lambda s: store_pb2.GetRequest(key="a/b").SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "tenant/model_fingerprint/recipe_id/prefix_hash",
    ),
    (
        "Get",
        lambda s: store_pb2.GetRequest(key="acme/m!/r/h").SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "model_fingerprint",
    ),
    ("Get", lambda s: store_pb2.GetRequest(key=GOOD_KEY).SerializeToString(), "beta", C.PERMISSION_DENIED, "'acme'"),
    (
        "Get",
        lambda s: store_pb2.GetRequest(key=GOOD_KEY[:-1] + "x").SerializeToString(),
        "acme",
        C.NOT_FOUND,
        "no entry",
    ),
    (
        "Delete",
        lambda s: store_pb2.DeleteRequest(key=GOOD_KEY).SerializeToString(),
        "beta",
        C.PERMISSION_DENIED,
        "tenant",
    ),
    (
        "Select",
        lambda s: store_pb2.SelectRequest(key=GOOD_KEY, layer=99).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "layer 99",
    ),
    (
        "Select",
        lambda s: store_pb2.SelectRequest(key=GOOD_KEY, pages=[3, 1]).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "pages must be ascending",
    ),
    (
        "Lookup",
        lambda s: store_pb2.LookupRequest(
            model_fingerprint="m", token_ids=[1], recipe=common_pb2.Recipe(ratio=1.5)
        ).SerializeToString(),
        "service",
        C.INVALID_ARGUMENT,
        "ratio 1.5",
    ),
    (
        "Lookup",
        lambda s: store_pb2.LookupRequest(
            model_fingerprint="m", token_ids=[1], recipe=common_pb2.Recipe(ratio=float("nan"))
        ).SerializeToString(),
        "service",
        C.INVALID_ARGUMENT,
        "ratio nan",
    ),
    (
        "Lookup",
        lambda s: store_pb2.LookupRequest(model_fingerprint="m").SerializeToString(),
        "service",
        C.INVALID_ARGUMENT,
        "token_ids is empty",
    ),
    (
        "Lookup",
        lambda s: store_pb2.LookupRequest(
            model_fingerprint="m", token_ids=[1], recipe=common_pb2.Recipe(quant="int3")
        ).SerializeToString(),
        "service",
        C.INVALID_ARGUMENT,
        "quant 'int3'",
    ),
    (
        "Probe",
        lambda s: store_pb2.ProbeRequest(keys=[GOOD_KEY]).SerializeToString(),
        "beta",
        C.PERMISSION_DENIED,
        "'acme'",
    ),
    (
        "Probe",
        lambda s: store_pb2.ProbeRequest(keys=[GOOD_KEY, "a/b"]).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "tenant/model_fingerprint/recipe_id/prefix_hash",
    ),
    # max_lookup_tokens (131072) in chunks of this system's min_chunk_size (8)
    (
        "Probe",
        lambda s: store_pb2.ProbeRequest(keys=[GOOD_KEY] * 16385).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "at most 16384",
    ),
    ("Put", lambda s: [b"\x12\x03abc"], "acme", C.INVALID_ARGUMENT, "shorter than the 40-byte frame head"),
    ("Put", lambda s: [b"\xff"], "acme", C.INVALID_ARGUMENT, "not a dkv.v1.Frame"),
    ("Put", lambda s: [], "acme", C.INVALID_ARGUMENT, "no frames received"),
    ("Put", lambda s: messages(TEMPLATES[0].frames[:-1]), "acme", C.INVALID_ARGUMENT, "truncated"),
    ("Put", lambda s: messages(TEMPLATES[0].frames), "beta", C.PERMISSION_DENIED, "'acme'"),
    (
        "Put",
        lambda s: messages(reencode({**TEMPLATES[0].header, "num_kv_heads": 0}, TEMPLATES[0].data)),
        "acme",
        C.INVALID_ARGUMENT,
        "num_kv_heads=0",
    ),
    (
        "Put",
        lambda s: messages(
            reencode(
                {
                    **TEMPLATES[0].header,
                    "tensors": [
                        [*t[:2], "float64", *t[3:]] if t[1] == "keys" else t for t in TEMPLATES[0].header["tensors"]
                    ],
                },
                TEMPLATES[0].data,
            )
        ),
        "acme",
        C.INVALID_ARGUMENT,
        "dtype 'float64'",
    ),
    (
        "Prefill",
        lambda s: prefill_pb2.PrefillRequest(recipe=common_pb2.Recipe(method="nope"), text="hi").SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "unknown compression method 'nope'",
    ),
    (
        "Prefill",
        lambda s: prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[1, UINT32])).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        f"token id {UINT32} is outside the vocabulary",
    ),
    (
        "Prefill",
        lambda s: prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[1] * 100)).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        f"at most {PREFILL_MAX_TOKENS}",
    ),
    (
        "Prefill",
        lambda s: prefill_pb2.PrefillRequest(text="hi", tenant="beta").SerializeToString(),
        "acme",
        C.PERMISSION_DENIED,
        "'beta'",
    ),
    (
        "Prefill",
        lambda s: prefill_pb2.PrefillRequest(
            recipe=common_pb2.Recipe(method="snapkv", params={"window_size": 2.5}), text="hi"
        ).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "window_size",
    ),
    (
        "Decode",
        lambda s: _decode(keys=s.keys["acme", "full"], query_text="hi", budget_fraction=float("nan")),
        "acme",
        C.INVALID_ARGUMENT,
        "budget_fraction nan",
    ),
    (
        "Decode",
        lambda s: _decode(keys=s.keys["acme", "full"], query_text="hi", max_new_tokens=UINT32),
        "acme",
        C.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    (
        "Decode",
        lambda s: _decode(keys=s.keys["acme", "full"], query_text="hi", top_p=float("inf")),
        "acme",
        C.INVALID_ARGUMENT,
        "top_p",
    ),
    (
        "Decode",
        lambda s: _decode(keys=s.keys["acme", "full"], query_ids=prefill_pb2.TokenIds(ids=[UINT32])),
        "acme",
        C.INVALID_ARGUMENT,
        "query token id",
    ),
    (
        "Decode",
        lambda s: _decode(
            keys=s.keys["acme", "full"], query_ids=prefill_pb2.TokenIds(ids=[5] * 8200), max_new_tokens=1
        ),
        "acme",
        C.INVALID_ARGUMENT,
        "query 8200",
    ),
    ("Decode", lambda s: _decode(keys=[f"acme/{s.fingerprint}/r/h"], query_text="hi"), "acme", C.NOT_FOUND, "/r/h"),
    (
        "Decode",
        lambda s: _decode(keys=[GOOD_KEY], query_text="hi"),
        "acme",
        C.INVALID_ARGUMENT,
        "computed by model synthetic-model",
    ),
    ("Decode", lambda s: _decode(keys=["acme/m/r"], query_text="hi"), "acme", C.INVALID_ARGUMENT, "entry key"),
    (
        "Decode",
        lambda s: _decode(keys=s.keys["acme", "full"], query_text="hi", tenant="beta"),
        "acme",
        C.PERMISSION_DENIED,
        "'beta'",
    ),
    (
        "Generate",
        lambda s: gateway_pb2.GenerateRequest(context_text="hi", query_text="x", temperature=-1).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "temperature -1",
    ),
    (
        "Generate",
        lambda s: gateway_pb2.GenerateRequest(context_text="hi").SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "needs a context",
    ),
    (
        "Generate",
        lambda s: gateway_pb2.GenerateRequest(
            context_text="hi", query_text="x", max_new_tokens=9000
        ).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "max_new_tokens 9000",
    ),
    (
        "Generate",
        lambda s: gateway_pb2.GenerateRequest(
            context_ids=prefill_pb2.TokenIds(ids=[UINT32]), query_text="x", max_new_tokens=1
        ).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "outside the vocabulary",
    ),
    (
        "Generate",
        lambda s: gateway_pb2.GenerateRequest(
            context_text="hi", query_text="x", max_new_tokens=1, recipe=common_pb2.Recipe(method="snapkv", ratio=-0.5)
        ).SerializeToString(),
        "acme",
        C.INVALID_ARGUMENT,
        "ratio -0.5",
    ),
]


@pytest.mark.parametrize("rpc, build, auth, code, says", TARGETED, ids=[f"{t[0]}-{t[4][:24]}" for t in TARGETED])
def test_rejections_name_what_is_wrong(system, rpc, build, auth, code, says):
    before = system.stats()
    outcome = system.call(rpc, build(system), auth)
    assert_sane(outcome, expected={code})
    assert says in outcome.details, str(outcome)
    if rpc == "Put":
        assert system.stats().entries == before.entries


@pytest.mark.parametrize("rpc", ["Lookup", "Select", "Prefill", "Decode", "Generate", "Get"])
def test_enormous_repeated_fields_under_the_limit(system, rpc):
    """Repeated fields of a few MiB (under the 8 MiB limit): a clean answer, quickly enough."""
    big = {
        "Lookup": lambda: store_pb2.LookupRequest(model_fingerprint="m", token_ids=list(range(1_200_000))),
        "Select": lambda: store_pb2.SelectRequest(key=GOOD_KEY, pages=list(range(1_000_000))),
        "Prefill": lambda: prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[3] * 1_500_000)),
        "Decode": lambda: decode_pb2.DecodeRequest(
            keys=[f"acme/{system.fingerprint}/r/h{i}" for i in range(100_000)], query_text="hi", max_new_tokens=1
        ),
        "Generate": lambda: gateway_pb2.GenerateRequest(
            context_text=CONTEXT, query_text="hi", max_new_tokens=1, stop=["zq"] * 600_000
        ),
        "Get": lambda: store_pb2.GetRequest(key="acme/" + "/".join(["m"] * 1_000_000)),
    }[rpc]().SerializeToString()
    assert 1 << 20 < len(big) < MAX_MESSAGE
    # Lookup: over max_lookup_tokens (131072), refused before any hashing
    expected = {
        "Lookup": C.INVALID_ARGUMENT,
        "Select": C.INVALID_ARGUMENT,
        "Prefill": C.INVALID_ARGUMENT,
        "Decode": C.NOT_FOUND,
        "Generate": OK,
        "Get": C.INVALID_ARGUMENT,
    }[rpc]
    outcome = system.call(rpc, big, "acme")
    assert_sane(outcome, expected={expected})
    assert outcome.seconds < 60 and len(outcome.details) < 1000


@pytest.mark.parametrize("rpc", [r for r in RPCS if r != "Put"])
def test_a_request_over_the_message_limit_is_resource_exhausted(system, rpc):
    payload = b"\xfa\x3f" + bytes([0x80, 0x80, 0x80, 0x05]) + b"\0" * (10 << 20)  # field 1023, 10 MiB
    outcome = system.call(rpc, payload, "acme")
    assert_sane(outcome, expected={C.RESOURCE_EXHAUSTED})


# ------------------------------------- regressions: the bugs these tests found, fixed since

UNDECODABLE = [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28", b"\x08"]  # bad tag, truncated, invalid UTF-8, no value


@pytest.mark.parametrize("rpc", [r for r in RPCS if r != "Put"])
def test_undecodable_request_is_invalid_argument(system, rpc):
    for payload in UNDECODABLE:
        if decodes(RPCS[rpc][2], payload):
            continue
        for auth in ("acme", "none"):
            outcome = system.call(rpc, payload, auth)
            assert outcome.code == (C.INVALID_ARGUMENT if auth == "acme" else C.UNAUTHENTICATED), str(outcome)


def _good_header_with(path: tuple, value) -> list[bytes]:
    t = TEMPLATES[0]
    return messages(reencode(set_path(t.header, path, value), t.data))


@pytest.mark.parametrize(
    "path",
    [
        ("num_layers",),
        ("identity", "seq_len"),
        ("identity", "recipe", "budget"),
        ("tensors", 0, 4),
        ("format_version",),
    ],
)
def test_put_header_with_an_infinite_integer_is_invalid_argument(system, path):
    before = system.stats()
    outcome = system.call("Put", _good_header_with(path, float("inf")), "acme")
    assert system.stats().entries == before.entries
    assert outcome.code == C.INVALID_ARGUMENT, str(outcome)


def test_put_header_of_deeply_nested_json_is_invalid_argument(system):
    payload = b"[" * 100_000 + b"]" * 100_000
    frames = [make_frame(KIND_HEADER, entry_id_of(payload), 0, 1, payload)]
    outcome = system.call("Put", messages(frames), "acme")
    assert outcome.code == C.INVALID_ARGUMENT and "RecursionError" in outcome.details, str(outcome)


def test_put_header_whose_entry_id_is_not_its_hash_is_refused(system):
    t = TEMPLATES[0]
    forged = json.dumps(set_path(t.header, ("identity", "tenant"), "acme2"), separators=(",", ":")).encode()
    entry_id = t.frames[0][8:16]
    frames = [make_frame(KIND_HEADER, entry_id, 0, len(t.frames), forged), *t.frames[1:]]
    outcome = system.call("Put", messages(frames), "service")
    if outcome.code == OK:  # clean up before failing
        system.call(
            "Delete",
            store_pb2.DeleteRequest(key=store_pb2.PutResponse.FromString(outcome.replies[0]).key).SerializeToString(),
        )
    assert outcome.code == C.INVALID_ARGUMENT, str(outcome)


@pytest.mark.parametrize("where", ["Get", "Lookup", "Put"])
def test_key_part_with_a_trailing_newline_is_invalid_argument(system, where):
    if where == "Get":
        outcome = system.call("Get", store_pb2.GetRequest(key=GOOD_KEY + "\n").SerializeToString(), "acme")
    elif where == "Lookup":
        outcome = system.call(
            "Lookup", store_pb2.LookupRequest(model_fingerprint="m\n", token_ids=[1]).SerializeToString(), "service"
        )
    else:
        outcome = system.call("Put", _good_header_with(("identity", "tenant"), "acme\n"), "service")
        if outcome.code == OK:
            system.call(
                "Delete",
                store_pb2.DeleteRequest(
                    key=store_pb2.PutResponse.FromString(outcome.replies[0]).key
                ).SerializeToString(),
            )
    assert outcome.code == C.INVALID_ARGUMENT, str(outcome)


@pytest.mark.parametrize("name", ["window_size", "sink"])
def test_prefill_infinite_integer_parameter_is_invalid_argument(system, name):
    method = "snapkv" if name == "window_size" else "streaming_llm"
    request = prefill_pb2.PrefillRequest(
        recipe=common_pb2.Recipe(method=method, params={name: float("inf")}), text="hello"
    )
    outcome = system.call("Prefill", request.SerializeToString(), "acme")
    assert outcome.code == C.INVALID_ARGUMENT, str(outcome)


@pytest.mark.parametrize("rpc", ["Decode", "Generate"])
@pytest.mark.parametrize("temperature", [float("nan"), 1e-45])
def test_sampling_temperature_nan_or_tiny_is_invalid_argument(system, rpc, temperature):
    if rpc == "Decode":
        payload = _decode(keys=system.keys["acme", "full"], query_text="Hi", max_new_tokens=1, temperature=temperature)
    else:
        payload = gateway_pb2.GenerateRequest(
            context_text=CONTEXT, query_text="Hi", max_new_tokens=1, temperature=temperature
        ).SerializeToString()
    outcome = system.call(rpc, payload, "acme")
    assert outcome.code in (OK, C.INVALID_ARGUMENT), str(outcome)


@pytest.mark.parametrize(
    "field, value", [("temperature", -1.0), ("top_p", 2.0), ("selection", "nope"), ("budget_fraction", 5.0)]
)
def test_a_refused_generate_stores_nothing(system, field, value):
    context = f"A context no other test uses, for {field}: the river is long and the hill is steep."
    request = gateway_pb2.GenerateRequest(context_text=context, query_text="Why?", max_new_tokens=1, **{field: value})
    before = system.stats()
    outcome = system.call("Generate", request.SerializeToString(), "acme")
    assert outcome.code == C.INVALID_ARGUMENT and field in outcome.details, str(outcome)
    assert system.stats().entries == before.entries, "a refused Generate stored entries"


HUGE = "x" * 100_000


@pytest.mark.parametrize(
    "rpc, build, code",
    [
        ("Get", lambda s: store_pb2.GetRequest(key=f"acme/{HUGE}/r/h"), C.INVALID_ARGUMENT),
        (
            "Lookup",
            lambda s: store_pb2.LookupRequest(
                model_fingerprint="m", token_ids=[1], recipe=common_pb2.Recipe(method=HUGE)
            ),
            C.INVALID_ARGUMENT,
        ),
        ("Prefill", lambda s: prefill_pb2.PrefillRequest(text="hi", tenant=HUGE), C.PERMISSION_DENIED),
        (
            "Decode",
            lambda s: decode_pb2.DecodeRequest(keys=s.keys["acme", "full"], query_text="hi", selection=HUGE),
            C.INVALID_ARGUMENT,
        ),
        (
            "Generate",
            lambda s: gateway_pb2.GenerateRequest(
                context_text="hi", query_text="x", max_new_tokens=1, recipe=common_pb2.Recipe(method=HUGE)
            ),
            C.INVALID_ARGUMENT,
        ),
    ],
    ids=["Get-key", "Lookup-method", "Prefill-tenant", "Decode-selection", "Generate-method"],
)
def test_a_long_bad_value_is_rejected_with_a_short_message(system, rpc, build, code):
    outcome = system.call(rpc, build(system).SerializeToString(), "acme")
    assert outcome.code == code and 10 < len(outcome.details) < 2000, str(outcome)


def test_decode_keys_of_another_tenant_are_permission_denied(system):
    payload = _decode(keys=system.keys["acme", "full"], query_text="Hi", max_new_tokens=1)
    outcome = system.call("Decode", payload, "beta")
    assert outcome.code == C.PERMISSION_DENIED, str(outcome)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_of_an_entry_shaped_for_another_model_is_refused(system, paged):
    entry = synthetic_entry(
        seq_len=16,
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        page_size=4,
        seed=3,
        tenant="acme",
        model_fingerprint=system.fingerprint,
    )
    put = system.call("Put", messages(codec.encode(entry)), "acme")
    assert put.code == OK, str(put)
    try:
        payload = _decode(
            keys=[str(entry.key)],
            query_text="Hi",
            max_new_tokens=1,
            paged=paged,
            selection="pages" if paged else "dense",
            budget=8 if paged else 0,
        )
        outcome = system.call("Decode", payload, "acme")
    finally:
        system.call("Delete", store_pb2.DeleteRequest(key=str(entry.key)).SerializeToString(), "acme")
    assert outcome.code in (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION), str(outcome)
