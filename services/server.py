"""What every dkv gRPC server shares: one service, health and reflection on one port, graceful stop.

A server binds, serves its service with ``grpc.health.v1`` (SERVING for "" and the service) and
reflection beside it, and on SIGTERM/SIGINT turns health NOT_SERVING at once, keeps serving for
``drain_delay_s`` so load balancers notice, then gives in-flight calls ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("dkv.server")

MAX_MESSAGE_BYTES = 8 << 20  # a 4 MiB frame, or ~1M token ids, with room to spare
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class GrpcServer:
    """Subclasses set ``service_name`` and implement ``handlers()``; ``close()`` frees resources.

    ``settings`` needs ``host``, ``port``, ``grace_s`` and ``drain_delay_s``.
    """

    service_name = ""

    def __init__(self, settings):
        self.settings = settings
        self.port = 0

    def handlers(self) -> grpc.GenericRpcHandler:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.service_name

    def close(self) -> None:
        """Called once the server has stopped."""

    async def start(self) -> int:
        """Bind and serve (inside the event loop that will run the server); returns the port."""
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.server.add_generic_rpc_handlers((self.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([self.service_name, health_name, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port}: is the port in use?")
        await self.server.start()
        for name in ("", self.service_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s:%d", self.describe(), self.settings.host, self.port)
        return self.port

    async def stop(self, grace_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        """Health NOT_SERVING now; keep serving ``drain_delay_s``; then give calls ``grace_s`` to finish."""
        await self.health.enter_graceful_shutdown()
        if drain_delay_s:
            await asyncio.sleep(drain_delay_s)
        await self.server.stop(self.settings.grace_s if grace_s is None else grace_s)
        self.close()
        log.info("%s stopped", self.service_name)


async def serve_until_signal(server: GrpcServer) -> None:
    """Run ``server`` until SIGTERM or SIGINT, then stop it gracefully."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    settings = server.settings
    log.info("signal received: NOT_SERVING; draining after %.1fs, for up to %.1fs",
             settings.drain_delay_s, settings.grace_s)
    await server.stop(drain_delay_s=settings.drain_delay_s)


async def abort_with(context: grpc.aio.ServicerContext, error: Exception, status: dict) -> None:
    """End the call with the status code ``status`` maps ``error``'s type to; otherwise INTERNAL."""
    for kind, code in status.items():
        if isinstance(error, kind):
            await context.abort(code, str(error))
    log.error("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


async def iterate_in_thread(iterator):
    """Run a blocking iterator in a worker thread; yield its items here as they come.

    Exceptions raised by the iterator are re-raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, (item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, (done, e))
            return
        loop.call_soon_threadsafe(queue.put_nowait, (done, None))

    task = loop.run_in_executor(None, pump)
    while True:
        item, error = await queue.get()
        if item is done:
            await task
            if error is not None:
                raise error
            return
        yield item
