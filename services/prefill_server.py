"""The Prefill gRPC service: a thin servicer over ``workers.prefill.PrefillWorker``."""

from __future__ import annotations

import asyncio
import logging

import grpc

from dkv.kvstore import codec
from dkv.kvstore.errors import EntryNotFound, InvalidEntry
from dkv.services.pb import prefill_pb2, prefill_pb2_grpc
from dkv.services.server import GrpcServer, abort_with, serve_until_signal
from dkv.services.settings import PrefillSettings
from dkv.services.shards import open_store
from dkv.services.transport import Security, tenant_for
from dkv.services.wire import frame_message, recipe_from_proto

log = logging.getLogger("dkv.prefill.server")
SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
STATUS = {
    EntryNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidEntry: grpc.StatusCode.INVALID_ARGUMENT,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


def prefill_ids(request: prefill_pb2.PrefillRequest, worker) -> list[int]:
    kind = request.WhichOneof("context")
    if kind is None:
        raise ValueError("no context: set text or token_ids")
    return worker.tokenize(request.text) if kind == "text" else list(request.token_ids.ids)


def prefill_response(result) -> prefill_pb2.PrefillResponse:
    tm = result.timings_ms
    return prefill_pb2.PrefillResponse(
        keys=result.keys,
        model_fingerprint=result.model_fingerprint,
        context_tokens=result.context_tokens,
        cached_tokens=result.cached_tokens,
        prefilled_tokens=result.prefilled_tokens,
        stored_bytes=result.stored_bytes,
        full_bytes=result.full_bytes,
        kept_tokens_per_layer=result.kept_tokens_per_layer,
        importance=result.importance,
        cache_stored=result.cache_stored,
        not_stored_reason=result.not_stored_reason,
        timings=prefill_pb2.PrefillTimings(
            lookup_ms=tm["lookup"],
            fetch_ms=tm["fetch"],
            prefill_ms=tm["prefill"],
            compress_ms=tm["compress"],
            store_ms=tm["store"],
            total_ms=tm["total"],
        ),
    )


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker, metrics):
        self.worker = worker
        self.tokens = metrics.counter(
            "dkv_prefill_tokens",
            "Context tokens of prefill requests, by whether they were computed or found in the store.",
            ("source",),
        )
        self.ratio = metrics.histogram(
            "dkv_prefill_compression_ratio",
            "Uncompressed K/V bytes (model dtype) over stored bytes, per prefill.",
            (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64),
        )
        self.not_stored = metrics.counter(
            "dkv_prefill_not_stored",
            "Entries the store did not take (the request was answered without caching them), by the store's status.",
            ("reason",),
        )
        metrics.gauge(
            "dkv_prefill_degraded",
            "1 while the store is being done without (unreachable or refusing "
            "entries): requests are answered, not cached; the log says why.",
            lambda: float(worker.degraded.active),
        )

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        try:
            recipe = recipe_from_proto(request.recipe)
            ids = prefill_ids(request, self.worker)
            result = await asyncio.to_thread(self.worker.prefill, ids, recipe, tenant_for(request.tenant))
        except grpc.RpcError as e:  # the store failed: pass its status on
            await context.abort(e.code(), f"store: {e.details()}")
        except Exception as e:
            await abort_with(context, e, STATUS)
        self._observe(result)
        return prefill_response(result)

    async def Entries(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        try:
            recipe = recipe_from_proto(request.recipe)
            ids = prefill_ids(request, self.worker)
            entries = await asyncio.to_thread(self.worker.entries, ids, recipe, tenant_for(request.tenant))
            frames = await asyncio.to_thread(lambda: [f for e in entries for f in codec.encode(e)])
        except Exception as e:
            await abort_with(context, e, STATUS)
        for frame in frames:
            yield frame

    def _observe(self, result) -> None:
        self.tokens.labels("computed").inc(result.prefilled_tokens)
        self.tokens.labels("cached").inc(result.cached_tokens)
        if result.prefilled_tokens and result.stored_bytes:
            self.ratio.observe(result.full_bytes / result.stored_bytes)
        if not result.cache_stored:
            self.not_stored.labels(result.not_stored_reason.split(":", 1)[0]).inc()


class PrefillServer(GrpcServer):
    service_name = SERVICE
    stateless = True

    def __init__(self, settings: PrefillSettings, worker=None):
        super().__init__(settings)
        if worker is None:
            from dkv.workers.model import load_model, use_threads
            from dkv.workers.prefill import PrefillWorker

            use_threads(settings.threads)
            model, tokenizer = load_model(settings.model, settings.dtype, settings.device)
            store = open_store(settings.store, timeout_s=settings.store_timeout_s, security=Security.of(settings))
            worker = PrefillWorker(
                model,
                tokenizer,
                store,
                max_tokens=settings.max_tokens,
                storage_dtype=settings.storage_dtype,
                min_chunk_size=settings.min_chunk_size,
                held_bytes=settings.held_bytes,
                held_ttl_s=settings.held_ttl_s,
            )
        self.worker = worker

    def add_service(self, server: grpc.aio.Server) -> None:
        """The generated table, but Entries sends its frames without a protobuf copy (``frame_message``)."""
        servicer = PrefillServicer(self.worker, self.metrics)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Prefill": grpc.unary_unary_rpc_method_handler(
                            servicer.Prefill,
                            request_deserializer=prefill_pb2.PrefillRequest.FromString,
                            response_serializer=prefill_pb2.PrefillResponse.SerializeToString,
                        ),
                        "Entries": grpc.unary_stream_rpc_method_handler(
                            servicer.Entries,
                            request_deserializer=prefill_pb2.PrefillRequest.FromString,
                            response_serializer=frame_message,
                        ),
                    },
                ),
            )
        )

    def describe(self) -> str:
        return f"prefill (model {self.worker.fingerprint}, store {self.worker.store.address})"

    def close(self) -> None:
        self.worker.store.close()


async def serve(settings: PrefillSettings) -> None:
    await serve_until_signal(PrefillServer(settings))
