"""Python client of one KV store server (used by the CLI, the tests, the benchmarks and the load
test, and by ``services.shards.ShardedStoreClient`` for each shard: that is what the workers are
handed, through ``open_store``). ``lookup`` is the one-call Lookup RPC, for thin clients: the store
hashes the tokens; the workers probe keys they made instead (``ShardedStoreClient.lookup_keys``).

Every call carries a deadline: ``timeout_s`` for Put and Get, which move entries, and the shorter
``control_timeout_s`` for the small calls (Lookup, Probe, Summaries, Select, Delete, Stats). A
store that lets a small call run past its deadline is taken as hung: for ``retry_after_s`` every
call fails at once with ``StoreUnavailable`` (UNAVAILABLE), so callers that can do without the
store (it is a cache) pay one deadline, not one per call. A Put or Get past its deadline fails
alone: a slow link, not a hung store, is the likelier cause for a call that moves megabytes. A miss is ``None``, and so is an entry that
failed its checksum on the server (DATA_LOSS: the server deleted it) or on the way here, an entry
whose key is not the one asked for (a proxy or a bug swapped replies), and Summaries or Select
replies that fail their checksum (which covers the key asked for): callers recompute. Other
failures raise ``grpc.RpcError`` with the server's status and message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV, EntryKey, LayerKV, Recipe
from dkv.kvstore.errors import CorruptEntry
from dkv.kvstore.remote import LookupReply, PutReply
from dkv.services.pb import store_pb2
from dkv.services.transport import Security, call_metadata, open_channel
from dkv.services.wire import (
    frame_message,
    pages_checksum,
    parse_frame_message,
    recipe_to_proto,
    summary_checksum,
    tensor_from_proto,
)

log = logging.getLogger("dkv.store.client")
SERVICE = store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
MISS_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS)


@dataclass
class LayerSummary:
    layer: int
    head_counts: torch.Tensor  # int32 [H_kv]
    page_min: torch.Tensor  # [pages, D]
    page_max: torch.Tensor  # [pages, D]
    seq_len: int
    num_kv_heads: int
    head_dim: int
    page_size: int


class StoreUnavailable(grpc.RpcError):
    """A call not made: the store let an earlier one run past its deadline moments ago (UNAVAILABLE)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class StoreClient:
    """``StoreClient("127.0.0.1:50052")``; use as a context manager or call ``close()``.

    ``security`` carries the bearer token and TLS files when the store asks for them.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        security: Security | None = None,
        control_timeout_s: float = 5.0,
        retry_after_s: float = 2.0,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.control_timeout_s = min(control_timeout_s, timeout_s)
        self.retry_after_s = retry_after_s
        self._hung_until = 0.0
        self.security = security
        self.channel = open_channel(address, security)
        pb = store_pb2
        self._put = self.channel.stream_unary(
            f"/{SERVICE}/Put", request_serializer=frame_message, response_deserializer=pb.PutResponse.FromString
        )
        self._get = self.channel.unary_stream(
            f"/{SERVICE}/Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=parse_frame_message,
        )
        self._lookup = self.channel.unary_unary(
            f"/{SERVICE}/Lookup",
            request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=pb.LookupResponse.FromString,
        )
        self._probe = self.channel.unary_unary(
            f"/{SERVICE}/Probe",
            request_serializer=pb.ProbeRequest.SerializeToString,
            response_deserializer=pb.ProbeResponse.FromString,
        )
        self._delete = self.channel.unary_unary(
            f"/{SERVICE}/Delete",
            request_serializer=pb.DeleteRequest.SerializeToString,
            response_deserializer=pb.DeleteResponse.FromString,
        )
        self._summaries = self.channel.unary_stream(
            f"/{SERVICE}/Summaries",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=pb.LayerSummary.FromString,
        )
        self._select = self.channel.unary_stream(
            f"/{SERVICE}/Select",
            request_serializer=pb.SelectRequest.SerializeToString,
            response_deserializer=pb.LayerPages.FromString,
        )
        self._stats = self.channel.unary_unary(
            f"/{SERVICE}/Stats",
            request_serializer=pb.StatsRequest.SerializeToString,
            response_deserializer=pb.StatsResponse.FromString,
        )

    def __enter__(self) -> StoreClient:
        return self

    @property
    def hung(self) -> bool:
        """True for ``retry_after_s`` after a call ran past its deadline (calls fail at once meanwhile)."""
        return time.monotonic() < self._hung_until

    def _call(self, rpc, request, control: bool = True):
        """``rpc(request)`` with its deadline (the control one for a small call) and this client's
        metadata; see the module docstring."""
        if self.hung:
            raise StoreUnavailable(
                f"store {self.address} did not answer within its deadline moments ago; "
                f"not called again for {self._hung_until - time.monotonic():.1f} s"
            )
        try:
            return rpc(
                request,
                timeout=self.control_timeout_s if control else self.timeout_s,
                metadata=call_metadata(self.security),
            )
        except grpc.RpcError as e:
            if control:
                self._noticed(e)
            raise

    def _noticed(self, error: grpc.RpcError) -> None:
        """Takes the store as hung after a small call ran past its deadline."""
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._hung_until = time.monotonic() + self.retry_after_s
            log.warning("store %s ran past a deadline: calls fail at once for %.0f s", self.address, self.retry_after_s)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def put(self, entry: CompressedKV) -> PutReply:
        return self.put_frames(codec.encode(entry))

    def put_frames(self, frames: Iterable[bytes]) -> PutReply:
        r = self._call(self._put, iter(frames), control=False)
        return PutReply(EntryKey.parse(r.key), r.stored_bytes, r.tier, r.replaced)

    def get_frames(self, key: EntryKey | str) -> list[memoryview] | None:
        """The entry's frames as sent by the server (not yet verified), or None on a miss."""
        fetched = self._get_frames(key)
        return None if fetched is None else fetched[0]

    def _get_frames(self, key: EntryKey | str) -> tuple[list[memoryview], str] | None:
        call = self._call(self._get, store_pb2.GetRequest(key=str(key)), control=False)
        try:
            frames = list(call)
        except grpc.RpcError as e:
            if e.code() in MISS_CODES:
                if e.code() == grpc.StatusCode.DATA_LOSS:
                    log.warning("store reported %s corrupted: %s", key, e.details())
                return None
            raise
        tier = dict(call.trailing_metadata() or ()).get("dkv-tier", "")
        return frames, tier

    def get(self, key: EntryKey | str) -> CompressedKV | None:
        """The decoded, verified entry, or None on a miss (including a failed check)."""
        fetched = self.get_with_tier(key)
        return None if fetched is None else fetched[0]

    def get_with_tier(self, key: EntryKey | str) -> tuple[CompressedKV, str, int] | None:
        """(entry, the tier it was read from, bytes received), or None on a miss or a failed check."""
        fetched = self._get_frames(key)
        if fetched is None:
            return None
        frames, tier = fetched
        try:
            entry = codec.decode(frames)
        except CorruptEntry as e:
            log.warning("entry %s failed its check on arrival: %s", key, e)
            return None
        if str(entry.key) != str(key):
            log.warning("asked the store for entry %s and received %s: treated as a miss", key, entry.key)
            return None
        return entry, tier, sum(len(f) for f in frames)

    def lookup(
        self, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int], tenant: str = "default"
    ) -> LookupReply | None:
        r = self._call(
            self._lookup,
            store_pb2.LookupRequest(
                tenant=tenant,
                model_fingerprint=model_fingerprint,
                recipe=recipe_to_proto(recipe),
                token_ids=list(token_ids),
            ),
        )
        if not r.hit:
            return None
        return LookupReply(
            [EntryKey.parse(k) for k in r.keys],
            r.cached_tokens,
            list(r.tiers),
            list(r.stored_bytes),
            list(r.importance),
            list(r.kept_tokens_per_layer),
        )

    def probe(self, keys: Sequence[EntryKey | str]) -> list[store_pb2.ProbedEntry]:
        """Whether the store holds each of ``keys`` (and where each one starts), in order."""
        r = self._call(self._probe, store_pb2.ProbeRequest(keys=[str(k) for k in keys]))
        return list(r.entries)

    def delete(self, key: EntryKey | str) -> bool:
        return self._call(self._delete, store_pb2.DeleteRequest(key=str(key))).deleted

    def summaries(self, key: EntryKey | str) -> list[LayerSummary] | None:
        """Per layer: kept tokens per KV head and the page min/max of K; None on a miss."""
        try:
            replies = list(self._call(self._summaries, store_pb2.GetRequest(key=str(key))))
        except grpc.RpcError as e:
            self._noticed(e)
            if e.code() in MISS_CODES:
                return None
            raise
        if any(r.checksum != summary_checksum(str(key), r) for r in replies):
            log.warning("summaries of %s failed their checksum on arrival: treated as a miss", key)
            return None
        return [
            LayerSummary(
                r.layer,
                tensor_from_proto(r.head_counts),
                tensor_from_proto(r.page_min),
                tensor_from_proto(r.page_max),
                r.seq_len,
                r.num_kv_heads,
                r.head_dim,
                r.page_size,
            )
            for r in replies
        ]

    def select(self, key: EntryKey | str, layer: int, pages: Sequence[int]) -> tuple[list[LayerKV], int, str] | None:
        """The rows of ``pages`` of ``layer``, as layers of the entry holding some of those pages each
        (in page order), the bytes received and the tier they came from; None on a miss."""
        try:
            replies = list(
                self._call(self._select, store_pb2.SelectRequest(key=str(key), layer=layer, pages=list(pages)))
            )
        except grpc.RpcError as e:
            self._noticed(e)
            if e.code() in MISS_CODES:
                return None
            raise
        if any(r.checksum != pages_checksum(str(key), r) for r in replies):
            log.warning("pages of %s failed their checksum on arrival: treated as a miss", key)
            return None
        parts = [LayerKV(**{n: tensor_from_proto(t) for n, t in r.tensors.items()}) for r in replies]
        nbytes = sum(r.ByteSize() for r in replies)
        return parts, nbytes, replies[0].tier if replies else ""

    def stats(self) -> store_pb2.StatsResponse:
        return self._call(self._stats, store_pb2.StatsRequest())
