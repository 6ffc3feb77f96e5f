"""A TCP fault proxy on loopback, for fault tests (this kernel has no netem).

    with FaultProxy(target="127.0.0.1:50052") as proxy:
        client = StoreClient(proxy.address)
        proxy.down.bandwidth_bps = 2e6     # target -> client capped at 2 MB/s
        proxy.up.stalled = True            # client -> target: hold every byte, keep the connection open
        proxy.up.reset_after_bytes = 4096  # one-shot: 4 KiB more client bytes, then RST both sides
        proxy.clear()                      # no faults

Each direction (``up``: client -> target, ``down``: target -> client) has its own ``Faults``,
read for every piece forwarded, so a test can change them while calls are running:

* ``latency_s`` + uniform(0, ``jitter_s``): a sleep before each chunk read from the socket (so it
  also lowers throughput: per-chunk delay, not a delay line);
* ``bandwidth_bps``: bytes per second of each connection in that direction (None: no cap);
* ``stalled``: stop forwarding (the bytes wait in the proxy and in socket buffers; the
  connection stays open) until it is cleared;
* ``reset_after_bytes``: after that many more bytes in that direction (over all connections),
  close both sides of the connection carrying them with SO_LINGER 0, which sends RST; it fires
  once and clears itself, so the client's reconnection works again.

An end that closes (FIN) is passed on as a half-close; an end that breaks (RST) resets the other
end too. The proxy runs an asyncio loop in a daemon thread; ``close()`` resets the connections
still open and joins the thread. It counts connections, bytes forwarded each way and resets.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None
    stalled: bool = False
    reset_after_bytes: int | None = None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter):
        self.writers = (client, target)

    def reset(self) -> None:
        for w in self.writers:
            if not w.transport.is_closing():
                _reset(w)


class FaultProxy:
    def __init__(self, target: str, host: str = "127.0.0.1", chunk_bytes: int = 64 << 10):
        target_host, _, port = target.rpartition(":")
        self.target = (target_host, int(port))
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.up, self.down = Faults(), Faults()
        self.connections = 0  # accepted, in all
        self.bytes_up = self.bytes_down = 0  # forwarded
        self.resets = 0  # done by reset_after_bytes
        self.port = 0
        self._open: set[_Connection] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def set(self, direction: str = "both", **faults) -> None:
        """Change faults of ``up``, ``down`` or ``both`` directions, e.g. ``set(latency_s=0.01)``."""
        for d in (self.up, self.down) if direction == "both" else (getattr(self, direction),):
            for name, value in faults.items():
                if not hasattr(d, name):
                    raise AttributeError(f"no fault named {name!r}; see Faults")
                setattr(d, name, value)

    def clear(self) -> None:
        self.up.__init__()
        self.down.__init__()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._serve, self.host, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        self._closing = True

        async def shut() -> None:
            self._server.close()
            for conn in list(self._open):
                conn.reset()
            await asyncio.sleep(0.05)  # let the pumps see their sockets go
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- forwarding -------------------------------------------------------------------------

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)  # as if the target refused the connection
            return
        conn = _Connection(client_w, target_w)
        self._open.add(conn)
        try:
            await asyncio.gather(
                self._pump(client_r, target_w, self.up, conn, "up"),
                self._pump(target_r, client_w, self.down, conn, "down"),
            )
        finally:
            self._open.discard(conn)
            for w in conn.writers:
                w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: Faults,
        conn: _Connection,
        direction: str,
    ) -> None:
        try:
            while True:
                data = await reader.read(self.chunk_bytes)
                if not data:  # FIN: pass the half-close on
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                if faults.latency_s or faults.jitter_s:
                    await asyncio.sleep(faults.latency_s + random.uniform(0, faults.jitter_s))
                while data:
                    while faults.stalled and not self._closing:
                        await asyncio.sleep(0.005)
                    bandwidth = faults.bandwidth_bps
                    # pieces of ~10 ms at the capped rate, so a cap set or lifted takes effect at once
                    piece = data[: max(1024, int(bandwidth / 100))] if bandwidth else data
                    budget = faults.reset_after_bytes
                    if budget is not None and len(piece) >= budget:
                        faults.reset_after_bytes = None
                        await self._send(writer, piece[:budget], direction)
                        self.resets += 1
                        conn.reset()
                        return
                    if budget is not None:
                        faults.reset_after_bytes = budget - len(piece)
                    await self._send(writer, piece, direction)
                    data = data[len(piece) :]
                    if bandwidth:
                        await asyncio.sleep(len(piece) / bandwidth)
        except (ConnectionError, OSError):
            conn.reset()  # one end broke: break the other as well

    async def _send(self, writer: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        if not data:
            return
        writer.write(data)
        await writer.drain()
        if direction == "up":
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)


__all__ = ["FaultProxy", "Faults"]
