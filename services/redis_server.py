"""Real ``redis-server`` processes managed from Python: for tests, benchmarks and ``dkv up``.

Tests run the Redis tier against the real server (not a fake) so that what they check
(eviction, OOM, connection loss, restart) is what production sees. ``dkv up`` uses the same
class to start a Redis next to the store on one host.

The server is a pure cache: no RDB snapshots, no AOF (``--save "" --appendonly no``), its
working directory a private temp dir, listening on loopback only by default. A restart on the
same port therefore comes back empty, which is exactly what a crashed cache looks like.

``LocalRedisCluster`` runs a Redis Cluster of such servers on one host (masters and replicas,
joined by ``redis-cli --cluster create``), so the Redis tier's tests run against a real cluster:
slot redirections, a master killed and its replica promoted.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from dkv.services.transport import free_port

DEFAULT_EXECUTABLE = "redis-server"
CLI = "redis-cli"
CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000 (the cluster bus)


class RedisServerError(RuntimeError):
    """redis-server could not be started; the message names its log file."""


class _PortTaken(RedisServerError):
    """Another process holds the port (a picked port can be taken before redis binds it)."""


def redis_server_available(executable: str = DEFAULT_EXECUTABLE) -> bool:
    """True if ``redis-server`` is on PATH (tests skip, ``dkv up`` explains, when it is not)."""
    return shutil.which(executable) is not None


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

    def start(self) -> RedisServer:
        """Start the server (again, on the same port after a stop/kill) and wait until PING answers."""
        if self.running:
            return self
        if not redis_server_available(self.executable):
            raise RedisServerError(f"{self.executable!r} is not on PATH: install it (apt-get install -y redis-server)")
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
            "--port",
            str(self._port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            "--daemonize",
            "no",
            "--logfile",
            "",  # log to stdout, which goes to the log file (startup errors too)
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
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
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

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.host}:{self._port}, {state})"


def _free_cluster_port(host: str, taken: set[int]) -> int:
    """A port that is free, and whose cluster bus port (+10000) is free too, a moment ago."""
    for _ in range(1000):
        port = random.randrange(20000, 65535 - CLUSTER_BUS_OFFSET)
        if port in taken or port + CLUSTER_BUS_OFFSET in taken:
            continue
        try:
            for p in (port, port + CLUSTER_BUS_OFFSET):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, p))
        except OSError:
            continue
        return port
    raise RedisServerError(f"found no free pair of ports (port and port + {CLUSTER_BUS_OFFSET}) on {host}")


class LocalRedisCluster:
    """A Redis Cluster on ``host``: ``masters`` masters with ``replicas`` replicas each, every node a
    ``RedisServer`` with ``--cluster-enabled yes``; a context manager (``with LocalRedisCluster() as c:
    c.url``).

    ``node_timeout_ms`` is how long a master may be unreachable before a replica takes its slots over
    (the failover takes about two to three times that). The slots of a failed master stop alone
    (``cluster-require-full-coverage no``); the others keep serving.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 1000,
        maxmemory: int | None = None,
        maxmemory_policy: str | None = None,
        startup_timeout_s: float = 30.0,
    ):
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        if replicas < 0:
            raise ValueError(f"replicas {replicas} must be >= 0")
        self.masters, self.replicas, self.host = masters, replicas, host
        self.node_timeout_ms = node_timeout_ms
        self.maxmemory, self.maxmemory_policy = maxmemory, maxmemory_policy
        self.startup_timeout_s = startup_timeout_s
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The URL of a running node (a cluster client learns the others from it)."""
        node = next((n for n in self.nodes if n.running), None)
        if node is None:
            raise RedisServerError("no node of the cluster is running: call start() first")
        return f"redis://{self.host}:{node.port}/0"

    def start(self) -> LocalRedisCluster:
        if shutil.which(CLI) is None:
            raise RedisServerError(
                f"{CLI!r} is not on PATH: install it with redis-server (apt-get install -y redis-server)"
            )
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-require-full-coverage",
            "no",
            "--repl-diskless-sync-delay",
            "0",
        ]  # replicas sync at once, not after the default 5 s
        taken: set[int] = set()
        for _ in range(self.masters * (1 + self.replicas)):
            for attempt in range(5):  # a port picked here can be taken before redis binds it
                port = _free_cluster_port(self.host, taken)
                node = RedisServer(
                    port=port,
                    host=self.host,
                    maxmemory=self.maxmemory,
                    maxmemory_policy=self.maxmemory_policy,
                    extra_args=args,
                )
                try:
                    node.start()
                    break
                except RedisServerError:
                    node.close()
                    if attempt == 4:
                        raise
            taken.add(port)
            self.nodes.append(node)
        created = subprocess.run(
            [
                CLI,
                "--cluster",
                "create",
                *(f"{self.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.startup_timeout_s,
        )
        if created.returncode != 0:
            raise RedisServerError(
                f"redis-cli --cluster create failed (code {created.returncode}):\n"
                f"{created.stdout[-2000:]}{created.stderr[-2000:]}"
            )
        self.wait_ready(self.startup_timeout_s)
        return self

    def cli(self, node: RedisServer, *args: str) -> str:
        """The output of ``redis-cli`` run against ``node`` with ``args``."""
        done = subprocess.run(
            [CLI, "-h", self.host, "-p", str(node.port), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every running node says the cluster is ok, every slot has a master, and every master
        has its replicas in sync (so that a killed master can fail over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [n for n in self.nodes if n.running]
            states = [self.cli(n, "cluster", "info") for n in running]
            synced = 0
            for node in running:
                info = self.cli(node, "info", "replication")
                synced += "role:slave" in info and "master_link_status:up" in info
            masters = self.master_nodes()
            if (
                all("cluster_state:ok" in s for s in states)
                and len(masters) == self.masters
                and synced >= min(len(running) - self.masters, self.masters * self.replicas)
            ):
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"the cluster was not ready within {timeout_s:.0f} s: "
                    f"{self.cli(running[0], 'cluster', 'nodes') if running else 'no node running'}"
                )
            time.sleep(0.1)

    def _cluster_nodes(self) -> list[dict]:
        """CLUSTER NODES of a running node: id, port, flags, master id and slot ranges of every node."""
        node = next(n for n in self.nodes if n.running)
        out = []
        for line in self.cli(node, "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            slots = []
            for r in parts[8:]:
                if r.startswith("["):
                    continue  # a slot being migrated or imported
                lo, _, hi = r.partition("-")
                slots.append((int(lo), int(hi or lo)))
            out.append(
                {
                    "id": parts[0],
                    "port": int(parts[1].split("@")[0].rsplit(":", 1)[1]),
                    "flags": parts[2].split(","),
                    "master": parts[3],
                    "slots": slots,
                }
            )
        return out

    def _node_at(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def master_nodes(self) -> list[RedisServer]:
        """The masters that serve slots, as the cluster sees them now."""
        return [
            self._node_at(n["port"])
            for n in self._cluster_nodes()
            if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
        ]

    def slots(self, node: RedisServer) -> list[tuple[int, int]]:
        """The slot ranges (first, last) ``node`` serves now; none for a replica or a failed master."""
        for n in self._cluster_nodes():
            if n["port"] == node.port and "master" in n["flags"] and "fail" not in n["flags"]:
                return n["slots"]
        return []

    def slot_of(self, key: str) -> int:
        node = next(n for n in self.nodes if n.running)
        return int(self.cli(node, "cluster", "keyslot", key).strip())

    def master_of(self, key: str) -> RedisServer:
        """The master that serves ``key``'s slot now."""
        return self.master_of_slot(self.slot_of(key))

    def master_of_slot(self, slot: int, missing_ok: bool = False) -> RedisServer | None:
        """The master that serves ``slot`` now (None while none does, with ``missing_ok``)."""
        for n in self._cluster_nodes():
            if "master" in n["flags"] and "fail" not in n["flags"] and any(lo <= slot <= hi for lo, hi in n["slots"]):
                return self._node_at(n["port"])
        if missing_ok:
            return None
        raise RedisServerError(f"no master serves slot {slot} now")

    def move_slot(self, slot: int, target: RedisServer, midway=None) -> None:
        """Migrate ``slot`` and its keys to the master ``target`` as ``redis-cli --cluster reshard`` does
        (IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE). ``midway(moved)`` is called after half of its
        keys moved (``moved`` 0.5: a call on keys split over both masters gets TRYAGAIN) and after all
        of them (1.0: calls get ASK redirections to ``target``), while the slot is still migrating."""
        nodes = self._cluster_nodes()
        ids = {n["port"]: n["id"] for n in nodes}
        source = next(
            self._node_at(n["port"])
            for n in nodes
            if "master" in n["flags"] and any(lo <= slot <= hi for lo, hi in n["slots"])
        )
        if source is target:
            return
        self.cli(target, "cluster", "setslot", str(slot), "importing", ids[source.port])
        self.cli(source, "cluster", "setslot", str(slot), "migrating", ids[target.port])
        keys = self.cli(source, "cluster", "getkeysinslot", str(slot), "100000").split()
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
            if part:
                self.cli(source, "migrate", self.host, str(target.port), "", "0", "5000", "keys", *part)
            if midway is not None:
                midway(0.5 * (i + 1))
        for node in [target, source, *(self._node_at(n["port"]) for n in nodes if "master" in n["flags"])]:
            self.cli(node, "cluster", "setslot", str(slot), "node", ids[target.port])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.nodes = []

    def __enter__(self) -> LocalRedisCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalRedisCluster({self.masters} masters x {1 + self.replicas}, {[n.port for n in self.nodes]})"


__all__ = ["LocalRedisCluster", "RedisServer", "RedisServerError", "redis_server_available"]
