"""A gRPC server object running on its own event loop in a thread, for tests."""

from __future__ import annotations

import asyncio
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
