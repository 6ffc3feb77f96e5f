"""A real ``redis-server`` process managed from Python: for tests, benchmarks and ``dkv up``.

Tests run the Redis tier against the real server (not a fake) so that what they check
(eviction, OOM, connection loss, restart) is what production sees. ``dkv up`` uses the same
class to start a Redis next to the store on one host.

The server is a pure cache: no RDB snapshots, no AOF (``--save "" --appendonly no``), its
working directory a private temp dir, listening on loopback only by default. A restart on the
same port therefore comes back empty, which is exactly what a crashed cache looks like.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

DEFAULT_EXECUTABLE = "redis-server"


class RedisServerError(RuntimeError):
    """redis-server could not be started; the message names its log file."""


class _PortTaken(RedisServerError):
    """Another process holds the port (a picked port can be taken before redis binds it)."""


def redis_server_available(executable: str = DEFAULT_EXECUTABLE) -> bool:
    """True if ``redis-server`` is on PATH (tests skip, ``dkv up`` explains, when it is not)."""
    return shutil.which(executable) is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it); callers retry if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kill_quietly(proc: subprocess.Popen) -> None:
    """Last-resort cleanup at garbage collection / interpreter exit: never leave an orphan server."""
    if proc.poll() is None:
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass


class RedisServer:
    """One ``redis-server`` on ``host:port``; a context manager (``with RedisServer() as r: r.url``).

    ``port=None`` picks a free port at the first start and keeps it, so ``stop()``/``kill()``
    followed by ``start()`` brings the server back at the same URL (how clients see a restart).
    ``maxmemory`` (bytes) and ``maxmemory_policy`` (e.g. ``noeviction``, ``allkeys-lru``) bound
    its memory; ``extra_args`` are passed through (``["--requirepass", "x"]``).
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        maxmemory: int | None = None,
        maxmemory_policy: str | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        executable: str = DEFAULT_EXECUTABLE,
        startup_timeout_s: float = 10.0,
        workdir: str | os.PathLike | None = None,
    ):
        if maxmemory is not None and maxmemory < 0:
            raise ValueError(f"maxmemory {maxmemory} must be >= 0 bytes (0 = unlimited)")
        self.host = host
        self._port = port
        self._fixed_port = port is not None
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.extra_args = list(extra_args)
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._proc: subprocess.Popen | None = None
        self._log_start = 0
        self._finalizer: weakref.finalize | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("redis-server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "redis.log" if self._workdir is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "RedisServer":
        """Start the server (again, on the same port after a stop/kill) and wait until PING answers."""
        if self.running:
            return self
        if not redis_server_available(self.executable):
            raise RedisServerError(
                f"{self.executable!r} is not on PATH: install it (apt-get install -y redis-server)"
            )
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="dkv-redis-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        # A port picked by the OS can be taken by someone else before redis binds it: retry then.
        attempts = 1 if (self._fixed_port or self._port is not None) else 5
        for attempt in range(attempts):
            if self._port is None:
                self._port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError as e:
                if attempt + 1 < attempts and (isinstance(e, _PortTaken) or self._address_in_use()):
                    self._port = None
                    continue
                raise
        raise AssertionError("unreachable")

    def _command(self) -> list[str]:
        cmd = [
            self.executable,
            "--port", str(self._port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--daemonize", "no",
            "--logfile", "",  # log to stdout, which goes to the log file (startup errors too)
        ]
        if self.maxmemory is not None:
            cmd += ["--maxmemory", str(self.maxmemory)]
        if self.maxmemory_policy is not None:
            cmd += ["--maxmemory-policy", self.maxmemory_policy]
        return cmd + self.extra_args

    def _spawn_and_wait(self) -> None:
        log = open(self.log_path, "ab")
        self._log_start = log.tell()  # where this attempt's output begins
        try:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._workdir, start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
            )
        finally:
            log.close()
        self._finalizer = weakref.finalize(self, _kill_quietly, self._proc)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget_process()
                raise RedisServerError(
                    f"redis-server on {self.host}:{self._port} exited with code {code} while starting; "
                    f"see {self.log_path}:\n{self._log_tail()}"
                )
            answering = self._answering_pid(timeout_s=0.5)
            if answering == self._proc.pid:
                return
            if answering is not None:  # someone else holds the port; ours will fail to bind
                self.kill()
                raise _PortTaken(
                    f"port {self.host}:{self._port} is already served by another redis-server "
                    f"(pid {answering}); see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(
                    f"redis-server on {self.host}:{self._port} did not answer PING within "
                    f"{self.startup_timeout_s:.0f} s; see {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def ping(self, timeout_s: float = 1.0) -> bool:
        """True if the server answers PING (a raw RESP exchange, so no client library is needed)."""
        if self._port is None:
            return False
        try:
            with socket.create_connection((self.host, self._port), timeout=timeout_s) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _answering_pid(self, timeout_s: float) -> int | None:
        """The ``process_id`` of whatever redis answers on our port (INFO server), or None."""
        try:
            with socket.create_connection((self.host, self._port), timeout=timeout_s) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        return None
                    data += chunk
                head, _, body = data.partition(b"\r\n")
                if not head.startswith(b"$"):
                    return None  # e.g. -LOADING or -NOAUTH: not ready (or not ours to inspect)
                need = int(head[1:]) + 2
                while len(body) < need:
                    chunk = s.recv(65536)
                    if not chunk:
                        return None
                    body += chunk
        except (OSError, ValueError):
            return None
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Idempotent; keeps the port and workdir."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        self._forget_process()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (for fault tests). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        self._forget_process()

    def close(self) -> None:
        """Stop the server and delete its temp dir (if this object created it)."""
        self.stop()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    # -- helpers ----------------------------------------------------------------------------

    def _log_tail(self, max_bytes: int = 4000, since: int = 0) -> str:
        try:
            data = self.log_path.read_bytes()[since:]
        except (OSError, AttributeError):
            return "(no log)"
        return data[-max_bytes:].decode(errors="replace")

    def _address_in_use(self) -> bool:
        return "Address already in use" in self._log_tail(since=self._log_start)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.host}:{self._port}, {state})"


__all__ = ["RedisServer", "RedisServerError", "redis_server_available", "free_port"]
