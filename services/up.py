"""``dkv up``: the whole system on one machine, as child processes, stopped together.

With ``--ray [ADDRESS]`` the prefill and decode workers run as Ray actors instead (on the cluster
at ADDRESS, or a local Ray), and the gateway in this process dispatches to them
(``services.ray_pool``).

Before it starts anything it checks what would otherwise fail in every child at once: the model
(``workers.model_source.resolve_model``), the workers' device and dtype, and the gateway's port;
then it converts a GGUF model once (``workers.model.prepare_model``) so the workers only load it.

Starts a redis-server on a free port when one is installed (the store's last tier; without it
the Redis tier is off and the log says so), then ``dkv store serve``, ``dkv prefill serve``,
``dkv decode serve`` and ``dkv gateway serve``, each waited for until its health check answers
SERVING. On Ctrl-C or SIGTERM every child is stopped (SIGTERM, then SIGKILL after a grace
period), last started first, and Redis with them: nothing is left running.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.services.redis_server import RedisServer, redis_server_available
from dkv.services.server import check_port_free
from dkv.services.settings import SettingsError
from dkv.services.transport import free_port

log = logging.getLogger("dkv.up")


@dataclass
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # the gateway's OpenAI-compatible HTTP API; 0 = none
    model: str = "smollm2-135m"
    device: str = "auto"  # of the workers' models (WorkerSettings.device)
    dtype: str = "auto"  # of the workers' models (WorkerSettings.dtype)
    device_bytes: str = "0"
    cpu_bytes: str = "2GiB"
    redis_bytes: str = "4GiB"
    redis: bool = True
    ready_timeout_s: float = 600.0
    extra_env: dict = field(default_factory=dict)
    ray: str | None = None  # None: workers as processes; "local" or a Ray address: workers as Ray actors
    prefill_workers: int = 1
    decode_workers: int = 1
    token: str = ""  # every component requires this bearer token (and sends it to the others)
    metrics: bool = False  # serve /metrics of every component on a free port (``Cluster.metrics``)
    prefill_threads: int = 0  # torch threads of the prefill worker; 0 = divided by worker_threads
    decode_threads: int = 0


def worker_threads(options: UpOptions) -> tuple[int, int]:
    """(prefill, decode) torch threads: what the options say, else this machine's cores divided.

    The decode loop runs whenever a stream is active, so it gets every core; prefill runs in bursts
    (a miss), mostly while decode waits for it, so it gets every core too but leaves one to the
    decode loop where there are more than two: on two cores the two overlap only while a miss is
    prefilled beside running streams."""
    cores = len(os.sched_getaffinity(0))
    return (options.prefill_threads or (cores if cores <= 2 else cores - 1)), (options.decode_threads or cores)


class Cluster:
    """The system's processes; a context manager (``with Cluster(options) as c: c.gateway``)."""

    def __init__(self, options: UpOptions):
        self.options = options
        self.redis: RedisServer | None = None
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.addresses: dict[str, str] = {}
        self.metrics: dict[str, str] = {}  # component -> host:port of its /metrics (with ``metrics``)
        self._args: dict[str, list[str]] = {}

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]

    @property
    def http(self) -> str:
        """Base URL of the gateway's OpenAI-compatible API ("" when it has none)."""
        o = self.options
        if not o.http_port:
            return ""
        tls = {**os.environ, **o.extra_env}.get("DKV_GATEWAY_TLS_CERT")  # the gateway's own TLS setting
        return f"{'https' if tls else 'http'}://{o.host}:{o.http_port}/v1"

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self) -> None:
        """Raise ``ModelError``, ``SettingsError`` or ``OSError`` (port in use) for what would stop the system
        from starting, before anything has started."""
        from dkv.services.settings import WorkerSettings
        from dkv.workers.model_source import resolve_model

        o = self.options
        resolve_model(o.model)
        WorkerSettings(model=o.model, device=o.device, dtype=o.dtype)  # SettingsError for a malformed one
        check_port_free(o.host, o.port)
        check_port_free(o.host, o.http_port, "--http-port")
        if o.ray is None:  # the workers run on this machine: the GPU asked for must be here
            from dkv.workers.model import resolve_device

            resolve_device(o.device)

    def start(self) -> None:
        self.check()
        o = self.options
        redis_args: list[str] = []
        if o.redis and redis_server_available():
            self.redis = RedisServer().start()
            redis_args = ["--redis-url", self.redis.url, "--redis-bytes", o.redis_bytes]
            log.info("redis-server started at %s", self.redis.url)
        else:
            log.warning(
                "redis-server %s: the store runs without its Redis tier",
                "disabled" if not o.redis else "not found on PATH (apt-get install redis-server)",
            )
        from dkv.workers.model import prepare_model

        prepare_model(o.model)  # convert once here, not in every worker at the same time
        ports = {name: free_port() for name in ("store", "prefill", "decode")}
        ports["gateway"] = o.port
        self.addresses = {name: f"{o.host}:{port}" for name, port in ports.items()}
        a = self.addresses
        self._spawn(
            "store",
            [
                "store",
                "serve",
                "--port",
                str(ports["store"]),
                "--cpu-bytes",
                o.cpu_bytes,
                "--device-bytes",
                o.device_bytes,
                *redis_args,
            ],
        )
        if o.ray is not None:  # the workers and the gateway run in Ray and in this process instead
            self._wait_serving("store", time.monotonic() + o.ready_timeout_s)
            return
        prefill_threads, decode_threads = worker_threads(o)
        where = ["--model", o.model, "--device", o.device, "--dtype", o.dtype]
        self._spawn(
            "prefill",
            [
                "prefill",
                "serve",
                "--port",
                str(ports["prefill"]),
                "--store",
                a["store"],
                *where,
                "--threads",
                str(prefill_threads),
            ],
        )
        self._spawn(
            "decode",
            [
                "decode",
                "serve",
                "--port",
                str(ports["decode"]),
                "--store",
                a["store"],
                "--prefill",
                a["prefill"],
                *where,
                "--threads",
                str(decode_threads),
            ],
        )
        self._spawn(
            "gateway",
            [
                "gateway",
                "serve",
                "--port",
                str(ports["gateway"]),
                "--http-port",
                str(o.http_port),
                "--prefill",
                a["prefill"],
                "--decode",
                a["decode"],
                "--model",
                o.model,
                "--store",
                a["store"],
            ],
        )
        deadline = time.monotonic() + o.ready_timeout_s
        for name, _ in self.processes:
            self._wait_serving(name, deadline)
        log.info("dkv is up: gateway at %s%s", self.gateway, _and_http(self))

    def _spawn(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        env = {**os.environ, **self.options.extra_env}
        if name in ("store", "gateway"):  # no model there: torch's thread pools would only take cores from it
            env.setdefault("OMP_NUM_THREADS", "1")
        if self.options.token:
            env[f"DKV_{name.upper()}_AUTH_TOKEN"] = self.options.token
        if self.options.metrics:
            self.metrics.setdefault(name, f"{self.options.host}:{free_port()}")
            args = [*args, "--metrics-port", self.metrics[name].rsplit(":", 1)[1]]
        proc = subprocess.Popen([sys.executable, "-m", "dkv", *args, "--host", self.options.host], env=env)
        self.processes = [(n, p) for n, p in self.processes if n != name] + [(name, proc)]
        log.info(
            "started %s (pid %d) on %s%s",
            name,
            proc.pid,
            self.addresses[name],
            f", metrics at http://{self.metrics[name]}/metrics" if name in self.metrics else "",
        )

    def _wait_serving(self, name: str, deadline: float) -> None:
        proc = dict(self.processes)[name]
        with grpc.insecure_channel(self.addresses[name]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise ChildProcessError(
                        f"{name} exited with code {proc.returncode} before it was serving; its log is above"
                    )
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become healthy within {self.options.ready_timeout_s:.0f} s")
                time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one component (``redis`` included), as a crash would."""
        if name == "redis":
            self.redis.kill()
            return
        proc = dict(self.processes)[name]
        proc.kill()
        proc.wait()
        log.warning("killed %s (pid %d)", name, proc.pid)

    def restart(self, name: str) -> None:
        """Start a killed component again on the same port and wait until it serves."""
        if name == "redis":
            self.redis.start()
            return
        self._spawn(name, self._args[name])
        self._wait_serving(name, time.monotonic() + self.options.ready_timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.processes and self.redis is None:
            return  # nothing was started (a check failed first)
        for _name, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in reversed(self.processes):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", name, grace_s)
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        log.info("dkv stopped: nothing left running")


def _and_http(cluster: Cluster) -> str:
    return f", OpenAI API at {cluster.http}" if cluster.http else ""


async def _serve_ray_gateway(cluster: Cluster) -> None:
    """The gateway in this process, over Ray actor pools, until SIGTERM or SIGINT."""
    import ray

    from dkv.services.gateway import Gateway, Router, Worker
    from dkv.services.gateway_server import GatewayServer
    from dkv.services.ray_pool import RayBackend, RoundRobin, start_pools
    from dkv.services.server import serve_until_signal
    from dkv.services.settings import GatewaySettings
    from dkv.services.transport import Security
    from dkv.workers.model import load_tokenizer

    o = cluster.options
    try:
        ray.init(
            address=None if o.ray == "local" else o.ray,
            include_dashboard=False,
            log_to_driver=True,
            **({"num_cpus": max(2, o.prefill_workers + o.decode_workers)} if o.ray == "local" else {}),
        )
    except ConnectionError as e:
        if any(isinstance(c, ray.exceptions.AuthenticationError) for c in _causes(e)):
            raise SettingsError(
                f"the Ray cluster at {o.ray} asks for a token: run dkv up with RAY_AUTH_MODE=token and "
                "the cluster's token (in ~/.ray/auth_token, or RAY_AUTH_TOKEN), as its nodes have"
            ) from e
        raise
    try:
        check_ray_reachable(
            o.host, ray.util.get_node_ip_address(), [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        )
        prefill, decode = start_pools(
            o.model,
            cluster.addresses["store"],
            o.prefill_workers,
            o.decode_workers,
            Security(token=o.token),
            o.device,
            o.dtype,
        )
        router = Router([Worker(f"ray-decode-{i}", RayBackend(actor)) for i, actor in enumerate(decode)])
        settings = GatewaySettings(
            host=o.host,
            port=o.port,
            http_port=o.http_port,
            prefill="ray",
            decode="ray",
            model=o.model,
            auth_token=o.token,
        )
        gateway = Gateway(
            load_tokenizer(o.model),
            RoundRobin([RayBackend(a) for a in prefill]),
            router,
            max_positions=settings.max_positions,
        )
        print(
            f"dkv is up: gateway at {cluster.gateway}{_and_http(cluster)} (workers on Ray; Ctrl-C to stop)", flush=True
        )
        await serve_until_signal(GatewayServer(settings, gateway))
    finally:
        ray.shutdown()


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _loopback(address: str) -> bool:
    """True for a loopback address (and for 0.0.0.0 or ::, which actors elsewhere would dial as themselves)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a name
        return address == "localhost"
    return ip.is_loopback or ip.is_unspecified


def check_ray_reachable(host: str, here: str, nodes: list[str]) -> None:
    """``SettingsError`` when the store listens on a loopback ``host`` (the address the actors are
    given) but Ray ``nodes`` run on other machines than this one (``here``): their actors could not
    reach it."""
    elsewhere = sorted({n for n in nodes if n != here and not _loopback(n)})
    if _loopback(host.strip("[]")) and elsewhere:
        raise SettingsError(
            f"the store listens on {host}, which the actors on the Ray nodes at {', '.join(elsewhere)} "
            f"cannot reach: listen on an address of this machine they can reach (--host {here})"
        )


def run(options: UpOptions) -> int:
    """``dkv up``: start, print the gateway address, wait for Ctrl-C or SIGTERM, stop."""
    if options.ray is not None:
        import asyncio

        with Cluster(options) as cluster:
            asyncio.run(_serve_ray_gateway(cluster))
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with Cluster(options) as cluster:
        print(f"dkv is up: gateway at {cluster.gateway}{_and_http(cluster)} (Ctrl-C to stop)", flush=True)
        try:
            while not stop:
                for name, proc in cluster.processes:
                    if proc.poll() is not None:
                        log.error("%s exited with code %s: stopping everything", name, proc.returncode)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
