"""The Gateway gRPC service: a thin servicer over ``services.gateway.Gateway``; with ``http_port``,
the OpenAI-compatible HTTP API beside it (``services.http_api``), on the same event loop."""

from __future__ import annotations

import asyncio
import logging

import grpc

from dkv.services.pb import decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc
from dkv.services.server import GrpcServer, abort_with, check_port_free, serve_until_signal
from dkv.services.settings import GatewaySettings
from dkv.services.shards import open_store
from dkv.services.transport import Security, call_metadata, open_channel, tenant_for

log = logging.getLogger("dkv.gateway.server")
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
STATUS = {ValueError: grpc.StatusCode.INVALID_ARGUMENT}


class GrpcBackend:
    """Prefill and Decode workers over gRPC (``grpc.aio``), with deadlines."""

    def __init__(
        self,
        prefill_address: str | None,
        decode_address: str | None,
        timeout_s: float,
        security: Security | None = None,
    ):
        self.timeout_s, self.security = timeout_s, security
        self.channels = []
        if prefill_address:
            self.prefill_stub = prefill_pb2_grpc.PrefillStub(self._channel(prefill_address))
        if decode_address:
            self.decode_stub = decode_pb2_grpc.DecodeStub(self._channel(decode_address))

    def _channel(self, address: str):
        channel = open_channel(address, self.security, aio=True, balanced=True)
        self.channels.append(channel)
        return channel

    async def prefill(self, request):
        return await self.prefill_stub.Prefill(request, timeout=self.timeout_s, metadata=call_metadata(self.security))

    async def decode(self, request):
        call = self.decode_stub.Decode(request, timeout=self.timeout_s, metadata=call_metadata(self.security))
        try:
            async for reply in call:
                yield reply
        finally:
            call.cancel()  # the gateway stopped reading (stop string): stop the worker too

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway, metrics):
        self.gateway = gateway
        self.ttft = metrics.histogram(
            "dkv_gateway_ttft_seconds",
            "Time to first token, by how much of the context was cached (hit: all, partial: a prefix, miss: none).",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ("cache",),
        )
        self.tokens = metrics.counter(
            "dkv_gateway_tokens", "Tokens of requests, by kind (context, generated).", ("kind",)
        )
        self.not_stored = metrics.counter(
            "dkv_gateway_not_cached",
            "Requests answered without their context being stored (the store was down, full or refusing).",
        )
        metrics.gauge(
            "dkv_gateway_degraded",
            "1 while the gateway's store lookups fail (requests go through "
            "prefill, answered all the same); the log says why.",
            lambda: float(self.gateway.degraded.active),
        )

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            request.tenant = tenant_for(request.tenant)
            async for reply in self.gateway.generate(request):
                if reply.HasField("stats"):
                    self.observe(reply.stats)
                yield reply
        except grpc.aio.AioRpcError as e:  # a worker failed: pass its status on
            await context.abort(e.code(), f"{e.details()}")
        except Exception as e:
            await abort_with(context, e, STATUS)

    def observe(self, stats) -> None:
        """Record one finished generation (gRPC or HTTP)."""
        cache = "hit" if stats.cache_hit else "partial" if stats.cached_prefix_tokens else "miss"
        self.ttft.labels(cache).observe(stats.ttft_ms / 1e3)
        self.tokens.labels("context").inc(stats.context_tokens)
        self.tokens.labels("generated").inc(stats.new_tokens)
        if not stats.cache_stored:
            self.not_stored.inc()


class GatewayServer(GrpcServer):
    service_name = SERVICE
    stateless = True

    def __init__(self, settings: GatewaySettings, gateway=None):
        super().__init__(settings)
        self.gateway = gateway
        self.backends = []
        self.store = None
        self.http = None

    async def start(self) -> int:
        s = self.settings
        check_port_free(s.host, s.http_port, "--http-port")  # before anything listens
        if self.gateway is None:
            self.gateway = self._build()
        self.servicer = GatewayServicer(self.gateway, self.metrics)
        port = await super().start()
        if s.http_port:
            from dkv.services.http_api import HttpServer, OpenAIApi

            api = OpenAIApi(self.gateway, s, self.metrics, self.servicer.observe, lambda: not self.draining)
            self.http = HttpServer(api.app, s)
            await self.http.start()
        return port

    def _build(self):
        from dkv.services.gateway import Gateway, Router, Worker
        from dkv.workers.model import load_tokenizer

        s = self.settings
        security = Security.of(s)
        prefill = GrpcBackend(s.prefill, None, s.timeout_s, security)
        decoders = [GrpcBackend(None, address, s.timeout_s, security) for address in s.decode.split(",") if address]
        self.backends = [prefill, *decoders]
        tokenizer = load_tokenizer(s.model)
        self.store = open_store(s.store, timeout_s=s.store_timeout_s, security=security) if s.store else None
        return Gateway(
            tokenizer,
            prefill,
            Router([Worker(a, b) for a, b in zip(s.decode.split(","), decoders)]),
            max_positions=s.max_positions,
            store=self.store,
            max_text_bytes=s.max_text_bytes,
        )

    def add_service(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.servicer, server)

    def describe(self) -> str:
        return f"gateway (prefill {self.settings.prefill}, decode {self.settings.decode})"

    async def stop_serving(self, grace_s: float) -> None:
        await asyncio.gather(super().stop_serving(grace_s), *([self.http.stop(grace_s)] if self.http else []))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    async def stop(self, grace_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        await super().stop(grace_s, drain_delay_s)
        for backend in self.backends:
            await backend.close()


async def serve(settings: GatewaySettings) -> None:
    await serve_until_signal(GatewayServer(settings))
