"""The Decode gRPC service: a thin servicer over ``workers.decode_worker.DecodeWorker``."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import EntryNotFound, InvalidEntry
from dkv.services.pb import decode_pb2, decode_pb2_grpc
from dkv.services.prefill_client import PrefillClient
from dkv.services.server import GrpcServer, abort_with, serve_until_signal
from dkv.services.settings import DecodeSettings
from dkv.services.shards import open_store
from dkv.services.transport import Security, tenant_for
from dkv.services.wire import recipe_from_proto
from dkv.workers.engine import QueueFull

log = logging.getLogger("dkv.decode.server")
SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
STATUS = {
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EntryNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidEntry: grpc.StatusCode.INVALID_ARGUMENT,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


def decode_job(request: decode_pb2.DecodeRequest, tokenizer):
    """The worker's job for a request (texts tokenized)."""
    from dkv.workers.decode_worker import DecodeJob

    context = request.WhichOneof("context")
    context_ids = None
    if context == "context_text":
        context_ids = tokenizer(request.context_text).input_ids
    elif context == "context_ids":
        context_ids = list(request.context_ids.ids)
    query = request.WhichOneof("query")
    query_ids = (
        tokenizer(request.query_text, add_special_tokens=False).input_ids
        if query == "query_text"
        else list(request.query_ids.ids)
        if query == "query_ids"
        else []
    )
    return DecodeJob(
        query_ids=query_ids,
        keys=list(request.keys),
        context_ids=context_ids,
        recipe=recipe_from_proto(request.recipe) if request.HasField("recipe") else None,
        selection=request.selection or "dense",
        budget=request.budget,
        budget_fraction=request.budget_fraction,
        selection_cache=request.selection_cache,
        paged=request.paged,
        max_new_tokens=request.max_new_tokens or 64,
        temperature=request.temperature,
        top_p=request.top_p or 1.0,
        seed=request.seed if request.seed else None,
        tenant=request.tenant or "default",
        ignore_eos=request.ignore_eos,
    )


class Replies:
    """The worker's results as ``DecodeResponse`` messages: a token with the text it completes, then the stats."""

    def __init__(self, tokenizer):
        self.tokenizer, self.produced, self.text = tokenizer, [], ""

    def __call__(self, item) -> decode_pb2.DecodeResponse:
        from dkv.workers.decode_worker import DecodeResult

        if isinstance(item, DecodeResult):
            return decode_pb2.DecodeResponse(stats=_stats(item, len(self.produced)))
        self.produced.append(item)
        full = self.tokenizer.decode(self.produced, skip_special_tokens=True)
        piece = ""
        if not full.endswith("\ufffd"):  # wait until a multi-byte character is complete
            piece, self.text = full[len(self.text) :], full
        return decode_pb2.DecodeResponse(token=decode_pb2.GeneratedToken(id=item, text=piece))


def decode_responses(worker, request: decode_pb2.DecodeRequest):
    """Run a request on ``worker``, blocking: its ``DecodeResponse`` messages (Ray actors use this)."""
    replies = Replies(worker.tokenizer)
    for item in worker.run(decode_job(request, worker.tokenizer)):
        yield replies(item)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker, metrics):
        self.worker = worker
        self.tokens = metrics.counter("dkv_decode_tokens", "Tokens generated.")
        self.speed = metrics.histogram(
            "dkv_decode_tokens_per_second",
            "Decode speed of each request, after its first token.",
            (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        )
        self.inter_token = metrics.histogram(
            "dkv_decode_inter_token_seconds",
            "Time between consecutive tokens of a stream (one batched step, plus any streams joining in between).",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        # requests being prepared (store reads, recompute through prefill): blocking, one thread each
        self._prepare = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dkv-decode-prepare")
        engine = worker.engine
        metrics.gauge("dkv_decode_active_streams", "Streams decoding now (rows of the batch).", lambda: engine.active)
        metrics.gauge(
            "dkv_decode_degraded",
            "1 while the store cannot give this worker entries (it asks the "
            "prefill worker for them instead); the log says why.",
            lambda: float(worker.degraded.active),
        )
        metrics.gauge(
            "dkv_decode_queued_requests",
            "Requests admitted and waiting: being prepared (store reads, recompute) or waiting for a free row.",
            lambda: engine.queued,
        )

    async def Decode(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # called from the model loop's thread
            try:
                loop.call_soon_threadsafe(results.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server stopped
                pass

        handle = None
        try:
            request.tenant = tenant_for(request.tenant)
            for key in request.keys:  # a tenant token reads only its tenant's entries
                tenant_for(EntryKey.parse(key).tenant)
            opening = self._prepare.submit(contextvars.copy_context().run, self._open, request, sink)
            try:
                handle = await asyncio.wrap_future(opening)
            except asyncio.CancelledError:  # gone while its entries were read: cancel it once it starts
                opening.add_done_callback(lambda f: f.exception() is None and f.result().cancel())
                raise
            replies, last = Replies(self.worker.tokenizer), None
            while True:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                reply = (
                    await loop.run_in_executor(None, replies, item) if len(replies.produced) > 256 else replies(item)
                )  # long texts are re-decoded off the event loop
                if reply.HasField("stats"):
                    if reply.stats.ms_per_token:
                        self.speed.observe(1e3 / reply.stats.ms_per_token)
                    yield reply
                    return
                now = time.perf_counter()
                if last is not None:
                    self.inter_token.observe(now - last)
                last = now
                self.tokens.inc()
                yield reply
        except grpc.RpcError as e:  # store or prefill failed: pass its status on
            await context.abort(e.code(), f"upstream: {e.details()}")
        except Exception as e:
            await abort_with(context, e, STATUS)
        finally:
            if handle is not None:  # the client went away, its deadline passed, or it finished: free the row
                handle.cancel()

    def _open(self, request: decode_pb2.DecodeRequest, sink):
        return self.worker.open(decode_job(request, self.worker.tokenizer), sink)


def _stats(result, new_tokens: int) -> decode_pb2.DecodeStats:
    s = result.stats
    per_token = sum(s.seconds_per_token) / len(s.seconds_per_token) if s.seconds_per_token else 0.0
    return decode_pb2.DecodeStats(
        new_tokens=new_tokens,
        mean_selected_per_step=sum(s.selected_per_step) / len(s.selected_per_step) if s.selected_per_step else 0.0,
        cached_slots=s.cached_slots,
        selected_per_step=s.selected_per_step,
        bytes_fetched_by_tier=result.bytes_by_tier,
        fetch_ms=result.fetch_ms,
        query_ms=s.query_seconds * 1e3,
        ms_per_token=per_token * 1e3,
        prefilled=result.prefilled,
        context_tokens=result.context_tokens,
    )


class DecodeServer(GrpcServer):
    service_name = SERVICE
    stateless = True

    def __init__(self, settings: DecodeSettings, worker=None):
        super().__init__(settings)
        if worker is None:
            from dkv.workers.decode_worker import DecodeWorker
            from dkv.workers.model import load_model, use_threads

            use_threads(settings.threads)
            model, tokenizer = load_model(settings.model, settings.dtype, settings.device)
            security = Security.of(settings)
            prefill = (
                PrefillClient(settings.prefill, settings.prefill_timeout_s, security) if settings.prefill else None
            )
            store = open_store(settings.store, timeout_s=settings.store_timeout_s, security=security)
            worker = DecodeWorker(
                model,
                tokenizer,
                store,
                prefill,
                page_cache_bytes=settings.page_cache_bytes,
                max_active=settings.max_active_streams,
                max_queued=settings.max_queued_requests,
                entry_cache_bytes=settings.entry_cache_bytes,
                entry_cache_ttl_s=settings.entry_cache_ttl_s,
            )
        self.worker = worker

    def add_service(self, server: grpc.aio.Server) -> None:
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.worker, self.metrics), server)

    def describe(self) -> str:
        return f"decode (model {self.worker.model.dkv_fingerprint}, store {self.worker.store.address})"

    def close(self) -> None:
        self.worker.close()
        self.worker.store.close()


async def serve(settings: DecodeSettings) -> None:
    await serve_until_signal(DecodeServer(settings))
