"""What every dkv gRPC server shares: one service, health and reflection on one port, graceful stop.

A server binds (TLS when its settings have a certificate), serves its service with
``grpc.health.v1`` (SERVING for "" and the service) and reflection beside it, and on
SIGTERM/SIGINT turns health NOT_SERVING at once, keeps serving for ``drain_delay_s`` so load
balancers notice, then gives in-flight calls ``grace_s`` to finish.

Every call passes ``CallInterceptor``: bearer-token check (``services.transport``), a request id
for the logs, and the ``dkv_rpc_duration_seconds`` histogram by method and status code, served
with the component's other metrics on ``metrics_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import signal
import socket
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dkv.services.metrics import Metrics
from dkv.services.transport import (
    GRPC_OPTIONS,
    OPEN_SERVICES,
    WORKER_CONNECTION_AGE,
    Authenticator,
    PermissionDenied,
    allowed_tenant,
    new_request_id,
    request_id,
    server_credentials,
)

log = logging.getLogger("dkv.server")

# how loudly a finished call is logged, by status code (OK and the codes of normal misses: debug)
_LOUD = {
    "INTERNAL": logging.ERROR,
    "UNKNOWN": logging.ERROR,
    "DATA_LOSS": logging.WARNING,
    "UNAVAILABLE": logging.WARNING,
    "UNAUTHENTICATED": logging.INFO,
    "PERMISSION_DENIED": logging.INFO,
    "INVALID_ARGUMENT": logging.INFO,
    "RESOURCE_EXHAUSTED": logging.INFO,
    "FAILED_PRECONDITION": logging.INFO,
    "DEADLINE_EXCEEDED": logging.INFO,
    "OUT_OF_RANGE": logging.INFO,
}


class _Call:
    """One RPC as the interceptor sees it: who may do what, since when, how it ended."""

    def __init__(self, interceptor: CallInterceptor, method: str, metadata):
        self.interceptor, self.method = interceptor, method
        self.allowed, self.code, self.why = interceptor.auth.check(method, metadata)
        self.request_id = new_request_id(metadata)
        self.start = time.perf_counter()

    async def begin(self, context) -> None:
        request_id.set(self.request_id)
        allowed_tenant.set(self.allowed)
        if self.code is not None:
            await context.abort(self.code, self.why)

    def end(self, context, error: BaseException | None) -> None:
        if error is None or isinstance(error, grpc.aio.AbortError):
            code = _code_name(context.code() or grpc.StatusCode.OK)
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)) or context.done():
            # the client went away, or gRPC itself ended the call (a message over the size limit)
            code = _code_name(context.code()) if context.code() else "CANCELLED"
        else:
            code = "UNKNOWN"
        seconds = time.perf_counter() - self.start
        name = self.method.rsplit("/", 1)[-1]
        if not self.method.startswith(OPEN_SERVICES):
            self.interceptor.metrics.observe_rpc(name, code, seconds)
        log.log(
            _LOUD.get(code, logging.DEBUG),
            "%s %s in %.1f ms",
            name,
            code,
            seconds * 1e3,
            extra={"rpc": name, "code": code, "ms": round(seconds * 1e3, 2)},
        )


def _code_name(code) -> str:
    """``grpc.StatusCode`` or its number -> its name."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, names and times every call (see the module docstring)."""

    def __init__(self, auth: Authenticator, metrics: Metrics):
        self.auth, self.metrics = auth, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        return _wrap(handler, lambda: _Call(self, details.method, details.invocation_metadata))


class _Undecodable:
    """A request message that did not parse (answered INVALID_ARGUMENT once the caller is authenticated)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    """``deserializer`` returning ``_Undecodable`` instead of raising (gRPC would answer UNKNOWN)."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:
            return _Undecodable(e)

    return parse


async def _refuse_undecodable(request, context) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request is not a valid message of this "
            f"method ({type(request.error).__name__}); check the method and the message type",
        )


@contextlib.asynccontextmanager
async def _observed(new_call, request, context):
    """Run the body between ``_Call.begin`` (and the check of the request) and ``_Call.end``."""
    call, error = new_call(), None
    try:
        await call.begin(context)
        await _refuse_undecodable(request, context)
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        call.end(context, error)


def _wrap(handler: grpc.RpcMethodHandler, new_call) -> grpc.RpcMethodHandler:
    """``handler`` with every call run between ``_Call.begin`` and ``_Call.end``."""
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }

    def single(behavior):
        async def run(request, context):
            async with _observed(new_call, request, context):
                return await behavior(request, context)

        return run

    def streaming(behavior):
        async def run(request, context):
            async with _observed(new_call, request, context):
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(single(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(single(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """``OSError`` (EADDRINUSE, EADDRNOTAVAIL) saying what to do when ``host:port`` cannot be listened on.

    grpc would log its own multi-line error first, and a second dkv server with SO_REUSEPORT would
    share the port silently; a plain bind refuses both cases up front."""
    if not port:
        return
    bare = host.strip("[]")  # grpc writes IPv6 addresses in brackets
    with socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(
                    e.errno,
                    f"cannot listen on {host}:{port} ({e.strerror}); stop what holds the port or "
                    f"choose another ({flag})",
                ) from None
            raise OSError(
                errno.EADDRNOTAVAIL,
                f"cannot listen on {host}:{port} ({e.strerror}); listen on an address of this machine (--host)",
            ) from None


class GrpcServer:
    """Subclasses set ``service_name`` and implement ``add_service()``; ``close()`` frees resources.

    ``settings`` needs ``host``, ``port``, ``grace_s`` and ``drain_delay_s``.
    """

    service_name = ""
    stateless = False  # a worker any replica can serve: connections are aged so clients rebalance

    def __init__(self, settings):
        self.settings = settings
        self.port = 0
        self.metrics_port = 0
        self.metrics = Metrics(self.service_name.rsplit(".", 1)[-1].lower())
        self.draining = False  # stop() has begun: health answers NOT_SERVING

    def add_service(self, server: grpc.aio.Server) -> None:
        """Add the component's servicer to ``server`` (the generated ``add_*Servicer_to_server``)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.service_name

    def grpc_options(self) -> list[tuple[str, int]]:
        """Server options beside ``GRPC_OPTIONS``: stateless workers age their connections."""
        return WORKER_CONNECTION_AGE if self.stateless else []

    def close(self) -> None:
        """Called once the server has stopped."""

    async def start(self) -> int:
        """Bind and serve (inside the event loop that will run the server); returns the port."""
        self.health = health.aio.HealthServicer()
        # No SO_REUSEPORT: a second server on a taken port must fail, not share it with the first.
        options = GRPC_OPTIONS + [("grpc.so_reuseport", 0)] + self.grpc_options()
        self.server = grpc.aio.server(
            options=options, interceptors=[CallInterceptor(Authenticator.of(self.settings), self.metrics)]
        )
        self.add_service(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([self.service_name, health_name, reflection.SERVICE_NAME], self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        check_port_free(self.settings.host, self.settings.port)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind": taken since check_port_free
            self.port = 0
        if not self.port:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {address}; stop what holds the port or choose another")
        await self.server.start()
        for name in ("", self.service_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        log.info(
            "%s listening on %s:%d%s%s",
            self.describe(),
            self.settings.host,
            self.port,
            " (TLS)" if credentials else "",
            f", metrics on :{self.metrics_port}/metrics" if self.metrics_port else "",
        )
        return self.port

    async def stop(self, grace_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        """Health NOT_SERVING now; keep serving ``drain_delay_s``; then give calls ``grace_s`` to finish."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if drain_delay_s:
            await asyncio.sleep(drain_delay_s)
        await self.stop_serving(self.settings.grace_s if grace_s is None else grace_s)
        self.metrics.close()
        self.close()
        log.info("%s stopped", self.service_name)

    async def stop_serving(self, grace_s: float) -> None:
        """Refuse new calls and give those in flight ``grace_s`` to finish; a server that listens on
        more than its gRPC port stops those listeners here too."""
        await self.server.stop(grace_s)


async def serve_until_signal(server: GrpcServer) -> None:
    """Run ``server`` until SIGTERM or SIGINT, then stop it gracefully."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    settings = server.settings
    log.info(
        "signal received: NOT_SERVING; draining after %.1fs, for up to %.1fs", settings.drain_delay_s, settings.grace_s
    )
    await server.stop(drain_delay_s=settings.drain_delay_s)


async def abort_with(context: grpc.aio.ServicerContext, error: Exception, status: dict) -> None:
    """End the call with the status code ``status`` maps ``error``'s type to; otherwise INTERNAL."""
    for kind, code in ((PermissionDenied, grpc.StatusCode.PERMISSION_DENIED), *status.items()):
        if isinstance(error, kind):
            await context.abort(code, _short(str(error)))
    log.error("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, _short(f"internal error: {type(error).__name__}: {error}"))


def _short(message: str, limit: int = 1000) -> str:
    """A status message that fits gRPC's metadata limit (16 KiB) even when it quotes a huge value."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message) - limit} more characters)"
