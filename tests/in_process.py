"""gRPC server objects running on their own event loops in threads, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class InProcessServer:
    """A gRPC server object (e.g. ``StoreServer``) running on an event loop in a thread."""

    def __init__(self, server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(server.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if not self.thread.is_alive():
            return
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def serving(model: str, store_address: str):
    """Prefill, decode and gateway servers that load ``model`` themselves from their settings (CPU,
    float32, entries stored in float32: the full recipe is then exact), as ``dkv <component> serve
    --model`` does, over the store at ``store_address``. Yields the gateway's address."""
    from dkv.services.decode_server import DecodeServer
    from dkv.services.gateway_server import GatewayServer
    from dkv.services.prefill_server import PrefillServer
    from dkv.services.settings import DecodeSettings, GatewaySettings, PrefillSettings

    where = {"model": model, "device": "cpu", "dtype": "float32"}
    servers = [
        InProcessServer(PrefillServer(PrefillSettings(port=0, store=store_address, storage_dtype="float32", **where)))
    ]
    try:
        servers.append(
            InProcessServer(
                DecodeServer(DecodeSettings(port=0, store=store_address, prefill=servers[0].address, **where))
            )
        )
        servers.append(
            InProcessServer(
                GatewayServer(
                    GatewaySettings(port=0, prefill=servers[0].address, decode=servers[1].address, model=model)
                )
            )
        )
        yield servers[-1].address
    finally:
        for server in reversed(servers):
            server.stop()
