"""The KV store gRPC server: a thin servicer over ``kvstore.store.TieredStore``.

The servicer validates requests, runs the store call off the event loop, and maps domain errors
to status codes (``STATUS``). Health (``grpc.health.v1``) and reflection are served beside it.
On SIGTERM health turns NOT_SERVING at once and in-flight calls get ``grace_s`` to finish.

What one caller can cost the others is bounded by the settings: a Lookup's tokens and chunk size
(and so a Probe's keys), a Select's pages (at most the layer's); Put streams received at once,
the bytes they may hold (each reserved at its header's full size before any data is read, after
the header's tenant and quota were checked), and how long one may stay silent. The event loop
only parses and dispatches: hashing, probing, encoding replies and the store's own work run on
the store's threads, enough of them that calls waiting for a stalled Redis leave room for the rest.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from dkv.kvstore import codec
from dkv.kvstore.codec import FrameAssembler
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import (
    CorruptEntry,
    EntryNotFound,
    EntryTooLarge,
    InvalidEntry,
    KVStoreError,
    OverQuota,
    TierUnavailable,
)
from dkv.kvstore.mac import EntryMac
from dkv.kvstore.memory_tier import MemoryTier
from dkv.kvstore.policy import make_policy
from dkv.kvstore.redis_tier import RedisTier
from dkv.kvstore.shrink import ShrinkRule
from dkv.kvstore.store import StoreStats, TieredStore, TierSpec
from dkv.services.metrics import StoreCollector
from dkv.services.pb import store_pb2, store_pb2_grpc
from dkv.services.server import GrpcServer, abort_with, serve_until_signal
from dkv.services.settings import StoreSettings
from dkv.services.transport import DEFAULT_TENANT, PermissionDenied, allowed_tenant, tenant_for
from dkv.services.wire import (
    frame_message,
    pages_checksum,
    parse_frame_message,
    recipe_from_proto,
    summary_checksum,
    tensor_to_proto,
)

log = logging.getLogger("dkv.store.server")

SERVICE = store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
# Threads of the store's calls: one blocked for a Redis timeout (2 s) must not hold up a read
# from host memory, so there are many more than cores (they wait, they do not compute).
STORE_THREADS = 64


class Busy(Exception):
    """The store is receiving as many Puts, or bytes, as it takes at once: RESOURCE_EXHAUSTED."""


class IdleStream(Exception):
    """A Put stream sent nothing for ``put_idle_timeout_s``: DEADLINE_EXCEEDED."""


class Oversized:
    """A request too large to be within the bounds, left unparsed: parsing 4M token ids takes ~16 MB
    and tens of ms on the event loop before any check could run."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


# Besides the token ids (at most 5 bytes each) or keys, a request holds a tenant, a model
# fingerprint and a recipe: well under this.
REQUEST_OVERHEAD_BYTES = 64 << 10
MAX_KEY_BYTES = 4 * 129 + 8  # four key parts of at most 128 characters, separators, field tags


STATUS = {
    InvalidEntry: grpc.StatusCode.INVALID_ARGUMENT,
    EntryTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OverQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Busy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdleStream: grpc.StatusCode.DEADLINE_EXCEEDED,
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
        tiers.append(
            TierSpec(
                MemoryTier("device", settings.device_bytes, device=device), tenant_quota=settings.tenant_device_bytes
            )
        )
    if settings.cpu_bytes:
        tiers.append(
            TierSpec(
                MemoryTier("cpu", settings.cpu_bytes, device="cpu", pin=True),
                ShrinkRule(settings.cpu_keep_fraction, settings.cpu_quant),
                settings.tenant_cpu_bytes,
            )
        )
    if settings.redis_url:
        mac = EntryMac(settings.cluster_secret) if settings.cluster_secret else None
        tiers.append(
            TierSpec(
                RedisTier(
                    "redis",
                    settings.redis_bytes,
                    settings.redis_url,
                    prefix=settings.redis_prefix,
                    namespace=settings.redis_namespace,
                    cluster=settings.redis_cluster,
                    mac=mac,
                ),
                ShrinkRule(settings.redis_keep_fraction, settings.redis_quant),
                settings.tenant_redis_bytes,
            )
        )
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
    def __init__(self, store: TieredStore, settings: StoreSettings, lookups, probed_keys):
        self.store = store
        self.settings = settings
        self.lookups = lookups  # Counter of Lookup RPCs by the tier of the longest cached prefix ("miss": none)
        self.probed_keys = probed_keys  # Counter of keys asked by Probe, by the tier holding each ("miss": none)
        # Puts being received and the bytes they reserved (touched only on the event loop)
        self.put_streams = 0
        self.put_bytes = 0

    @property
    def max_probe_keys(self) -> int:
        """A Probe asks for a prompt's chunk keys: as many as a Lookup may hash."""
        return -(-self.settings.max_lookup_tokens // self.settings.min_chunk_size)

    def lookup_request(self, data: bytes) -> store_pb2.LookupRequest | Oversized:
        if len(data) > 5 * self.settings.max_lookup_tokens + REQUEST_OVERHEAD_BYTES:
            return Oversized(len(data))
        return store_pb2.LookupRequest.FromString(data)

    def probe_request(self, data: bytes) -> store_pb2.ProbeRequest | Oversized:
        if len(data) > MAX_KEY_BYTES * self.max_probe_keys + REQUEST_OVERHEAD_BYTES:
            return Oversized(len(data))
        return store_pb2.ProbeRequest.FromString(data)

    async def Put(self, request_iterator: AsyncIterator[memoryview | None], context: grpc.aio.ServicerContext):
        outcome = await self._put(request_iterator)
        if isinstance(outcome, Exception):
            await _abort(context, outcome, put=True)
        return outcome

    async def _put(self, request_iterator) -> store_pb2.PutResponse | Exception:
        """The reply, or the error to answer with, stripped of its traceback: grpc keeps an aborted
        call's exception in a reference cycle, and a traceback would keep the refused frames (MBs)
        alive with it until a full garbage collection."""
        reserved, tenant = 0, allowed_tenant.get() or DEFAULT_TENANT
        if self.put_streams >= self.settings.max_put_streams:
            error = Busy(
                f"the store is receiving {self.put_streams} Puts, as many as it takes at once "
                "(max_put_streams); retry later"
            )
            self.store.count_rejected(tenant, error)
            return error
        self.put_streams += 1
        try:
            try:

                def admit(header, frame) -> None:
                    """Before any data frame: the caller's tenant, the entry's size and quota, memory."""
                    nonlocal reserved, tenant
                    tenant = tenant_for(header.identity.tenant)
                    size = codec.stored_nbytes(header, frame)
                    self.store.check_admissible(header, size)
                    budget = self.settings.put_bytes_in_flight
                    if self.put_bytes + size > budget:
                        raise Busy(
                            f"the store is receiving {self.put_bytes} bytes of Puts; this entry's {size} "
                            f"more would pass put_bytes_in_flight ({budget}); retry later"
                        )
                    self.put_bytes += size
                    reserved = size

                assembler = FrameAssembler(self.store.max_entry_bytes, on_header=admit)
                frames = request_iterator.__aiter__()
                while True:
                    try:
                        frame = await asyncio.wait_for(frames.__anext__(), self.settings.put_idle_timeout_s)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise IdleStream(
                            f"no frame for {self.settings.put_idle_timeout_s:g} s: a Put must send its "
                            "next frame within put_idle_timeout_s"
                        ) from None
                    if frame is None:
                        raise InvalidEntry("a Put message is not a dkv.v1.Frame; send Frame{data=<codec frame>}")
                    assembler.add(frame)
                header, frames = assembler.finish()
            except (KVStoreError, PermissionDenied, Busy, IdleStream) as e:
                self.store.count_rejected(tenant, e)
                raise
            result = await asyncio.to_thread(self.store.put, frames, header)
            return store_pb2.PutResponse(
                key=str(result.key), stored_bytes=result.stored_bytes, tier=result.tier, replaced=result.replaced
            )
        except Exception as e:
            e.__cause__ = e.__context__ = None
            return e.with_traceback(None)
        finally:
            self.put_streams -= 1
            self.put_bytes -= reserved

    async def Get(self, request: store_pb2.GetRequest, context: grpc.aio.ServicerContext):
        try:
            key = _parse_key(request.key)
            result = await asyncio.to_thread(self.store.get, key)
        except Exception as e:
            await _abort(context, e)
        context.set_trailing_metadata((("dkv-tier", result.tier),))
        for frame in result.frames:
            yield frame

    async def Lookup(self, request: store_pb2.LookupRequest | Oversized, context: grpc.aio.ServicerContext):
        try:
            if isinstance(request, Oversized):
                raise InvalidEntry(
                    f"a Lookup of {request.nbytes} bytes holds more token ids than this store takes "
                    f"({self.settings.max_lookup_tokens}, max_lookup_tokens): send a shorter prefix"
                )
            recipe = recipe_from_proto(request.recipe)
            tokens = len(request.token_ids)
            if not tokens:
                raise InvalidEntry("token_ids is empty; send the prompt's token ids")
            if tokens > self.settings.max_lookup_tokens:
                raise InvalidEntry(
                    f"{tokens} token ids in one Lookup; this store takes at most "
                    f"{self.settings.max_lookup_tokens} (max_lookup_tokens): send a shorter prefix"
                )
            if recipe.chunk_size < self.settings.min_chunk_size:
                raise InvalidEntry(
                    f"recipe chunk_size {recipe.chunk_size} is below this store's min_chunk_size "
                    f"{self.settings.min_chunk_size}: use larger chunks"
                )
            reply, tier = await asyncio.to_thread(self._lookup, tenant_for(request.tenant), request)
        except Exception as e:
            await _abort(context, e)
        self.lookups.labels(tier).inc()
        return reply

    def _lookup(self, tenant: str, request) -> tuple[store_pb2.LookupResponse, str]:
        """(the reply, the tier of its last entry or "miss"), off the event loop."""
        found = self.store.lookup(
            tenant, request.model_fingerprint, recipe_from_proto(request.recipe), request.token_ids
        )
        if found is None:
            return store_pb2.LookupResponse(hit=False), "miss"
        kept = [sum(layer) for layer in zip(*(h.kept_tokens_per_layer() for h in found.headers))]
        return store_pb2.LookupResponse(
            hit=True,
            keys=[str(k) for k in found.keys],
            cached_tokens=found.cached_tokens,
            tiers=found.tiers,
            stored_bytes=found.stored_bytes,
            importance=[h.importance for h in found.headers],
            kept_tokens_per_layer=kept,
        ), found.tiers[-1]

    async def Probe(self, request: store_pb2.ProbeRequest | Oversized, context: grpc.aio.ServicerContext):
        try:
            if isinstance(request, Oversized) or len(request.keys) > self.max_probe_keys:
                keys = "more" if isinstance(request, Oversized) else len(request.keys)
                raise InvalidEntry(
                    f"{keys} keys in one Probe; send at most {self.max_probe_keys} (a prompt of "
                    "max_lookup_tokens in chunks of min_chunk_size)"
                )
            reply = await asyncio.to_thread(self._probe, request.keys)
        except Exception as e:
            await _abort(context, e)
        for tier, keys in Counter(entry.tier if entry.present else "miss" for entry in reply.entries).items():
            self.probed_keys.labels(tier).inc(keys)
        return reply

    def _probe(self, texts) -> store_pb2.ProbeResponse:
        reply = store_pb2.ProbeResponse()
        keys = [_parse_key(k) for k in texts]
        for key, found in zip(keys, self.store.probe(keys)):
            if found is None:
                reply.entries.add(key=str(key), present=False)
                continue
            header, tier, nbytes = found
            reply.entries.add(
                key=str(key),
                present=True,
                start=header.identity.start,
                tier=tier,
                stored_bytes=nbytes,
                importance=header.importance,
                kept_tokens_per_layer=header.kept_tokens_per_layer(),
            )
        return reply

    async def Delete(self, request: store_pb2.DeleteRequest, context: grpc.aio.ServicerContext):
        try:
            deleted = await asyncio.to_thread(self.store.delete, _parse_key(request.key))
        except Exception as e:
            await _abort(context, e)
        return store_pb2.DeleteResponse(deleted=deleted)

    async def Summaries(self, request: store_pb2.GetRequest, context: grpc.aio.ServicerContext):
        try:
            replies = await asyncio.to_thread(self._summaries, _parse_key(request.key))
        except Exception as e:
            await _abort(context, e)
        for reply in replies:
            yield reply

    def _summaries(self, key: EntryKey) -> list[store_pb2.LayerSummary]:
        entry = self.store.entry(key)
        replies = []
        for i, layer in enumerate(entry.layers):
            reply = store_pb2.LayerSummary(
                layer=i,
                head_counts=tensor_to_proto(layer.head_counts().to(torch.int32)),
                page_min=tensor_to_proto(layer.page_min),
                page_max=tensor_to_proto(layer.page_max),
                seq_len=entry.seq_len,
                num_layers=entry.num_layers,
                num_kv_heads=entry.num_kv_heads,
                head_dim=entry.head_dim,
                page_size=entry.page_size,
            )
            reply.checksum = summary_checksum(str(key), reply)
            replies.append(reply)
        return replies

    async def Select(self, request: store_pb2.SelectRequest, context: grpc.aio.ServicerContext):
        try:
            replies = await asyncio.to_thread(self._select, _parse_key(request.key), request.layer, request.pages)
        except Exception as e:
            await _abort(context, e)
        for reply in replies:
            yield reply

    def _select(self, key: EntryKey, layer_index: int, requested) -> list[store_pb2.LayerPages]:
        entry = self.store.entry(key)
        if layer_index >= entry.num_layers:
            raise InvalidEntry(f"layer {layer_index} does not exist; the entry has {entry.num_layers} layers")
        layer = entry.layers[layer_index]
        n_pages = layer.page_min.shape[0]
        if len(requested) > n_pages:
            raise InvalidEntry(f"{len(requested)} pages asked for; layer {layer_index} has {n_pages}")
        pages = torch.tensor(list(requested), dtype=torch.long)
        if len(pages) and (
            int(pages.min()) < 0 or int(pages.max()) >= n_pages or bool((pages[1:] <= pages[:-1]).any())
        ):
            raise InvalidEntry(f"pages must be ascending indices in [0, {n_pages}) for layer {layer_index}")
        tier = self.store.tier_of(entry.key) or ""
        replies = []
        for group in _page_groups(pages, layer, entry):
            part = layer.select_pages(group, entry.page_size)
            reply = store_pb2.LayerPages(
                layer=layer_index,
                pages=group.tolist(),
                tier=tier,
                tensors={n: tensor_to_proto(t) for n, t in part.tensors().items()},
            )
            reply.checksum = pages_checksum(str(key), reply)
            replies.append(reply)
        return replies

    async def Stats(self, request: store_pb2.StatsRequest, context: grpc.aio.ServicerContext):
        # a tenant's token sees its own numbers; the service token (or no auth) the whole store's
        return _stats_message(await asyncio.to_thread(self.store.stats, allowed_tenant.get()))


def _stats_message(s: StoreStats) -> store_pb2.StatsResponse:
    return store_pb2.StatsResponse(
        tiers=[
            store_pb2.TierStats(
                name=t.name,
                entries=t.entries,
                used_bytes=t.used_bytes,
                capacity_bytes=t.capacity_bytes,
                healthy=t.healthy,
                hits=t.hits,
                errors=t.errors,
                quota_bytes=t.quota_bytes,
            )
            for t in s.tiers
        ],
        entries=s.entries,
        hits=s.hits,
        misses=s.misses,
        evictions=s.evictions,
        demotions=s.demotions,
        promotions=s.promotions,
        checksum_failures=s.checksum_failures,
        puts=s.puts,
        rejected_puts=s.rejected_puts,
        over_quota=s.over_quota,
        lost=s.lost,
        tenant=s.tenant or "",
        tenants=[_stats_message(t) for t in s.tenants],
    )


def _page_groups(pages: torch.Tensor, layer, entry, limit: int = 4 << 20) -> list[torch.Tensor]:
    """Split ``pages`` into groups whose rows take at most ``limit`` bytes (one message each)."""
    per_page = max(1, layer.nbytes // max(1, layer.page_min.shape[0]))
    size = max(1, limit // per_page)
    return [pages[i : i + size] for i in range(0, len(pages), size)] or [pages]


def _handlers(servicer: KVStoreServicer) -> grpc.GenericRpcHandler:
    """The generated handler table, but Put/Get move frames without protobuf copies and Lookup/Probe
    refuse an oversized request before parsing it (so it is written out, not ``add_KVStoreServicer_to_server``)."""
    pb = store_pb2
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Put": grpc.stream_unary_rpc_method_handler(
                servicer.Put,
                request_deserializer=parse_frame_message,
                response_serializer=pb.PutResponse.SerializeToString,
            ),
            "Get": grpc.unary_stream_rpc_method_handler(
                servicer.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=frame_message
            ),
            "Lookup": grpc.unary_unary_rpc_method_handler(
                servicer.Lookup,
                request_deserializer=servicer.lookup_request,
                response_serializer=pb.LookupResponse.SerializeToString,
            ),
            "Probe": grpc.unary_unary_rpc_method_handler(
                servicer.Probe,
                request_deserializer=servicer.probe_request,
                response_serializer=pb.ProbeResponse.SerializeToString,
            ),
            "Delete": grpc.unary_unary_rpc_method_handler(
                servicer.Delete,
                request_deserializer=pb.DeleteRequest.FromString,
                response_serializer=pb.DeleteResponse.SerializeToString,
            ),
            "Summaries": grpc.unary_stream_rpc_method_handler(
                servicer.Summaries,
                request_deserializer=pb.GetRequest.FromString,
                response_serializer=pb.LayerSummary.SerializeToString,
            ),
            "Select": grpc.unary_stream_rpc_method_handler(
                servicer.Select,
                request_deserializer=pb.SelectRequest.FromString,
                response_serializer=pb.LayerPages.SerializeToString,
            ),
            "Stats": grpc.unary_unary_rpc_method_handler(
                servicer.Stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString,
            ),
        },
    )


class StoreServer(GrpcServer):
    """The store server: ``await start()`` returns the bound port, ``await stop()`` drains it."""

    service_name = SERVICE

    def __init__(self, settings: StoreSettings, store: TieredStore | None = None):
        super().__init__(settings)
        self.store = store or build_store(settings)
        self.metrics.registry.register(StoreCollector(self.store))
        self.lookups = self.metrics.counter(
            "dkv_store_lookups",
            "Lookup RPCs (a prefix found by the store; thin clients), by the tier holding the last entry of the "
            "longest cached prefix (miss: none cached). The workers' lookups arrive as Probe: dkv_store_probed_keys.",
            ("tier",),
        )
        self.probed_keys = self.metrics.counter(
            "dkv_store_probed_keys",
            "Chunk keys asked by Probe (the workers' prefix lookups, one Probe per shard), by the tier holding "
            "each (miss: not held).",
            ("tier",),
        )
        self._audits: asyncio.Task | None = None
        if any(spec.tier.remote for spec in self.store.tiers):
            if settings.cluster_secret:
                log.info("entries in Redis carry a keyed MAC (cluster_secret); reads check it")
            else:
                log.warning(
                    "no cluster_secret: entries in Redis carry no keyed MAC, so anyone who can write to "
                    "Redis can forge entries this store will serve; set cluster_secret "
                    "(DKV_STORE_CLUSTER_SECRET) to the same secret on every store"
                )

    def add_service(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (_handlers(KVStoreServicer(self.store, self.settings, self.lookups, self.probed_keys)),)
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """Keepalive pings drop clients that vanished without closing (and their half-sent Puts)."""
        s = self.settings
        options = []
        if s.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
                # a silent Put stream sends no data: keep pinging it all the same
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if s.max_connection_age_s:
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.grace_s * 1000)),
            ]
        return options

    async def start(self) -> int:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="dkv-store")
        )
        port = await super().start()
        self._audits = asyncio.create_task(self._audit_every(self.settings.audit_interval_s))
        return port

    async def _audit_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.store.audit)
            except Exception:
                log.exception("store audit failed")

    async def stop(self, grace_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        if self._audits is not None:
            self._audits.cancel()
        await super().stop(grace_s, drain_delay_s)

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
    # A store thread hashing a long prompt holds the GIL; the event loop (health checks, every
    # other call) takes it back within 1 ms instead of Python's default 5 ms, each time it needs it.
    sys.setswitchinterval(0.001)
    await serve_until_signal(StoreServer(settings))
