"""The KV store gRPC server: a thin servicer over ``kvstore.store.TieredStore``.

The servicer validates requests, runs the store call off the event loop, and maps domain errors
to status codes (``STATUS``). Health (``grpc.health.v1``) and reflection are served beside it.
On SIGTERM health turns NOT_SERVING at once and in-flight calls get ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from dkv.kvstore.codec import FrameAssembler
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, EntryTooLarge, InvalidEntry, KVStoreError, TierUnavailable
from dkv.kvstore.memory_tier import MemoryTier
from dkv.kvstore.policy import make_policy
from dkv.kvstore.redis_tier import RedisTier
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.store import TieredStore, TierSpec
from dkv.services.pb import store_pb2, store_pb2_grpc
from dkv.services.server import GRPC_OPTIONS, GrpcServer, abort_with, serve_until_signal
from dkv.services.metrics import StoreCollector
from dkv.services.settings import StoreSettings
from dkv.services.transport import tenant_for
from dkv.services.wire import frame_message, parse_frame_message, recipe_from_proto, tensor_to_proto

log = logging.getLogger("dkv.store.server")

SERVICE = "dkv.v1.KVStore"
MAX_PROBE_KEYS = 1 << 16  # a 16M-token prompt in 256-token chunks
STATUS = {
    InvalidEntry: grpc.StatusCode.INVALID_ARGUMENT,
    EntryTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EntryNotFound: grpc.StatusCode.NOT_FOUND,
    CorruptEntry: grpc.StatusCode.DATA_LOSS,
    TierUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def build_store(settings: StoreSettings) -> TieredStore:
    """The tiers the settings ask for, fastest first."""
    tiers = []
    if settings.device_bytes:
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tiers.append(TierSpec(MemoryTier("device", settings.device_bytes, device=device)))
    if settings.cpu_bytes:
        tiers.append(TierSpec(MemoryTier("cpu", settings.cpu_bytes, device="cpu", pin=True),
                              ShrinkRule(settings.cpu_keep_fraction, settings.cpu_quant)))
    if settings.redis_url:
        tiers.append(TierSpec(RedisTier("redis", settings.redis_bytes, settings.redis_url, prefix=settings.redis_prefix),
                              ShrinkRule(settings.redis_keep_fraction, settings.redis_quant)))
    return TieredStore(tiers, make_policy(settings.policy), settings.max_entry_bytes)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, put: bool = False) -> None:
    """End the call with the status code of ``error``."""
    if put and isinstance(error, CorruptEntry):
        # the caller sent broken frames: nothing stored was lost, so this is not DATA_LOSS
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    await abort_with(context, error, STATUS)


def _parse_key(text: str) -> EntryKey:
    """The key, if the caller may act for its tenant (``PermissionDenied`` otherwise)."""
    if not text:
        raise InvalidEntry("key is empty; pass tenant/model_fingerprint/recipe_id/prefix_hash as returned by Put")
    key = EntryKey.parse(text)
    tenant_for(key.tenant)
    return key


class KVStoreServicer(store_pb2_grpc.KVStoreServicer):
    def __init__(self, store: TieredStore, lookups):
        self.store = store
        self.lookups = lookups  # Counter by the tier of the longest cached prefix ("miss" when none)

    async def Put(self, request_iterator, context):
        outcome = await self._put(request_iterator)
        if isinstance(outcome, Exception):
            await _abort(context, outcome, put=True)
        return outcome

    async def _put(self, request_iterator) -> store_pb2.PutResponse | Exception:
        """The reply, or the error to answer with, stripped of its traceback: grpc keeps an aborted
        call's exception in a reference cycle, and a traceback would keep the refused frames (MBs)
        alive with it until a full garbage collection."""
        try:
            assembler = FrameAssembler(self.store.max_entry_bytes)
            try:
                async for frame in request_iterator:
                    if frame is None:
                        raise InvalidEntry("a Put message is not a dkv.v1.Frame; send Frame{data=<codec frame>}")
                    assembler.add(frame)
                header, frames = assembler.finish()
                tenant_for(header.identity.tenant)
            except KVStoreError:
                self.store.count_rejected()
                raise
            result = await asyncio.to_thread(self.store.put, frames, header)
            return store_pb2.PutResponse(key=str(result.key), stored_bytes=result.stored_bytes, tier=result.tier,
                                         replaced=result.replaced)
        except Exception as e:  # noqa: BLE001 - every error becomes a status code
            e.__cause__ = e.__context__ = None
            return e.with_traceback(None)

    async def Get(self, request, context):
        try:
            key = _parse_key(request.key)
            result = await asyncio.to_thread(self.store.get, key)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        context.set_trailing_metadata((("dkv-tier", result.tier),))
        for frame in result.frames:
            yield frame

    async def Lookup(self, request, context):
        try:
            recipe = recipe_from_proto(request.recipe)
            if not request.token_ids:
                raise InvalidEntry("token_ids is empty; send the prompt's token ids")
            found = self.store.lookup(tenant_for(request.tenant), request.model_fingerprint, recipe,
                                      list(request.token_ids))
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        self.lookups.labels(found.tiers[-1] if found else "miss").inc()
        if found is None:
            return store_pb2.LookupResponse(hit=False)
        kept = [sum(layer) for layer in zip(*(h.kept_tokens_per_layer() for h in found.headers))]
        return store_pb2.LookupResponse(hit=True, keys=[str(k) for k in found.keys], cached_tokens=found.cached_tokens,
                                        tiers=found.tiers, stored_bytes=found.stored_bytes,
                                        importance=[h.importance for h in found.headers], kept_tokens_per_layer=kept)

    async def Probe(self, request, context):
        try:
            if len(request.keys) > MAX_PROBE_KEYS:
                raise InvalidEntry(f"{len(request.keys)} keys in one Probe; send at most {MAX_PROBE_KEYS}")
            keys = [_parse_key(k) for k in request.keys]
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        reply = store_pb2.ProbeResponse()
        for key in keys:
            found = self.store.probe(key)
            if found is None:
                reply.entries.add(key=str(key), present=False)
                continue
            header, tier, nbytes = found
            reply.entries.add(key=str(key), present=True, start=header.identity.start, tier=tier, stored_bytes=nbytes,
                              importance=header.importance, kept_tokens_per_layer=header.kept_tokens_per_layer())
        return reply

    async def Delete(self, request, context):
        try:
            deleted = await asyncio.to_thread(self.store.delete, _parse_key(request.key))
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        return store_pb2.DeleteResponse(deleted=deleted)

    async def Summaries(self, request, context):
        try:
            entry = await asyncio.to_thread(self.store.entry, _parse_key(request.key))
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        for i, layer in enumerate(entry.layers):
            yield store_pb2.LayerSummary(
                layer=i, head_counts=tensor_to_proto(layer.head_counts().to(torch.int32)),
                page_min=tensor_to_proto(layer.page_min), page_max=tensor_to_proto(layer.page_max),
                seq_len=entry.seq_len, num_layers=entry.num_layers, num_kv_heads=entry.num_kv_heads,
                head_dim=entry.head_dim, page_size=entry.page_size)

    async def Select(self, request, context):
        try:
            entry = await asyncio.to_thread(self.store.entry, _parse_key(request.key))
            if request.layer >= entry.num_layers:
                raise InvalidEntry(f"layer {request.layer} does not exist; the entry has {entry.num_layers} layers")
            layer = entry.layers[request.layer]
            pages = torch.tensor(list(request.pages), dtype=torch.long)
            n_pages = layer.page_min.shape[0]
            if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= n_pages or bool((pages[1:] <= pages[:-1]).any())):
                raise InvalidEntry(f"pages must be ascending indices in [0, {n_pages}) for layer {request.layer}")
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        tier = self.store.tier_of(entry.key) or ""
        for group in _page_groups(pages, layer, entry):
            part = layer.select_pages(group, entry.page_size)
            yield store_pb2.LayerPages(layer=request.layer, pages=group.tolist(), tier=tier,
                                       tensors={n: tensor_to_proto(t) for n, t in part.tensors().items()})

    async def Stats(self, request, context):
        s = await asyncio.to_thread(self.store.stats)
        return store_pb2.StatsResponse(
            tiers=[store_pb2.TierStats(name=t.name, entries=t.entries, used_bytes=t.used_bytes,
                                       capacity_bytes=t.capacity_bytes, healthy=t.healthy, hits=t.hits,
                                       errors=t.errors) for t in s.tiers],
            entries=s.entries, hits=s.hits, misses=s.misses, evictions=s.evictions, demotions=s.demotions,
            promotions=s.promotions, checksum_failures=s.checksum_failures, puts=s.puts,
            rejected_puts=s.rejected_puts,
        )


def _page_groups(pages: torch.Tensor, layer, entry, limit: int = 4 << 20) -> list[torch.Tensor]:
    """Split ``pages`` into groups whose rows take at most ``limit`` bytes (one message each)."""
    per_page = max(1, layer.nbytes // max(1, layer.page_min.shape[0]))
    size = max(1, limit // per_page)
    return [pages[i:i + size] for i in range(0, len(pages), size)] or [pages]


def _handlers(servicer: KVStoreServicer) -> grpc.GenericRpcHandler:
    """The generated handler table, with Put/Get moving frames without protobuf copies."""
    pb = store_pb2
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, request_deserializer=parse_frame_message, response_serializer=pb.PutResponse.SerializeToString),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=frame_message),
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, request_deserializer=pb.LookupRequest.FromString,
            response_serializer=pb.LookupResponse.SerializeToString),
        "Probe": grpc.unary_unary_rpc_method_handler(
            servicer.Probe, request_deserializer=pb.ProbeRequest.FromString,
            response_serializer=pb.ProbeResponse.SerializeToString),
        "Delete": grpc.unary_unary_rpc_method_handler(
            servicer.Delete, request_deserializer=pb.DeleteRequest.FromString,
            response_serializer=pb.DeleteResponse.SerializeToString),
        "Summaries": grpc.unary_stream_rpc_method_handler(
            servicer.Summaries, request_deserializer=pb.GetRequest.FromString,
            response_serializer=pb.LayerSummary.SerializeToString),
        "Select": grpc.unary_stream_rpc_method_handler(
            servicer.Select, request_deserializer=pb.SelectRequest.FromString,
            response_serializer=pb.LayerPages.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString),
    })


class StoreServer(GrpcServer):
    """The store server: ``await start()`` returns the bound port, ``await stop()`` drains it."""

    service_name = SERVICE

    def __init__(self, settings: StoreSettings, store: TieredStore | None = None):
        super().__init__(settings)
        self.store = store or build_store(settings)
        self.metrics.registry.register(StoreCollector(self.store))
        self.lookups = self.metrics.counter("dkv_store_lookups", "Prefix lookups, by the tier holding the last "
                                            "entry of the longest cached prefix (miss: none cached).", ("tier",))

    def handlers(self) -> grpc.GenericRpcHandler:
        return _handlers(KVStoreServicer(self.store, self.lookups))

    def describe(self) -> str:
        tiers = ", ".join(f"{s.tier.name}={s.tier.capacity_bytes}B" for s in self.store.tiers)
        return f"store (tiers {tiers}, policy {self.store.policy.name})"

    def close(self) -> None:
        self.store.close()


async def serve(settings: StoreSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    # The store's tensor work (validation, shrinking) is small per call; torch's OpenMP workers
    # spinning beside gRPC's threads made Put 1.6x slower on 2 cores (docs/benchmarks.md).
    torch.set_num_threads(1)
    await serve_until_signal(StoreServer(settings))
