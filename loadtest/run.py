"""``python -m dkv.loadtest.run``: start dkv on free loopback ports, run the locust load test against it, stop.

    python -m dkv.loadtest.run --time 60s --users 3 --scenario mixed --p99-ms 120000   # what `make loadtest` runs

1. Starts ``python -m dkv.loadtest.cluster`` (``dkv up`` through ``services.up.Cluster``: Redis when
   installed, the store with small tiers so that eviction runs, a prefill and a decode worker, the
   gateway, also on HTTP) with its log in ``OUT/dkv.log``, and waits until every service is healthy.
   With ``--host`` (and ``--store``, ``--http-host``) it starts nothing and tests that cluster instead.
2. Sends one Generate about an unrelated text to warm the workers up (not measured).
3. Runs ``locust -f loadtest/locustfile.py --headless`` for ``--time`` with ``--users`` users of
   ``--scenario`` and writes ``OUT/dkv_stats.csv`` (and the other CSV files), ``OUT/report.html``
   and ``OUT/dkv_summary.json``; users busy when the time is up finish their call (up to
   ``--stop-timeout``).
4. Stops the cluster and exits with locust's code: 0 only when no call failed, no task raised and
   every call name's p99 is within ``--p99-ms``.

Everything listens on and talks to loopback only, unless ``--host``/``--store`` name other addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

WARMUP_CONTEXT = (
    "Weather notes for a small harbour town: mornings are foggy in spring, the afternoons clear up, "
    "and the wind turns west in the evening. "
)


def timespan_s(text: str) -> float:
    """Seconds of a locust time span: ``90``, ``90s``, ``2m``, ``1h30m``."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"time {text!r}: use seconds or a span like 90s, 2m, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m dkv.loadtest.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--time", default=env("LOADTEST_TIME", "60s"), help="how long the load runs (locust --run-time)")
    p.add_argument("--users", type=int, default=int(env("LOADTEST_USERS", "3")), help="simulated users")
    p.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    p.add_argument(
        "--scenario",
        choices=("store", "generate", "mixed", "http"),
        default=env("LOADTEST_SCENARIO", "mixed"),
        help="store: KV store users; generate: gRPC chats and document questions; mixed: both; http: chats "
        "over the OpenAI HTTP API",
    )
    p.add_argument(
        "--p99-ms",
        type=float,
        default=float(env("LOADTEST_P99_MS", "120000")),
        help="fail when the p99 of any call name is above this",
    )
    p.add_argument("--out", default="build/loadtest", help="folder of the CSV, HTML and log files")
    p.add_argument("--stop-timeout", default="60s", help="at the end, how long users may finish their current call")
    p.add_argument("--host", default="", help="gateway of a running cluster: start nothing, test it")
    p.add_argument("--store", default="", help="KV store of that cluster (store users)")
    p.add_argument("--http-host", default="", help="OpenAI API of that cluster, e.g. http://HOST:8000/v1 (HTTP users)")
    p.add_argument("--cpu-bytes", default="64MiB", help="host-memory tier of the started store")
    p.add_argument("--redis-bytes", default="64MiB", help="Redis tier of the started store")
    p.add_argument("--no-redis", action="store_true", help="start the store without its Redis tier")
    p.add_argument(
        "--token",
        default=env("DKV_TOKEN", ""),
        help="bearer token: the started cluster requires it and the users send it (default $DKV_TOKEN)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up Generate")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the started cluster")
    p.add_argument("locust_args", nargs="*", help="more locust arguments, after --")
    return p


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Terminated(BaseException):
    pass


def _start_cluster(args, out: Path) -> tuple[subprocess.Popen, dict, object]:
    info = out / "cluster.json"
    info.unlink(missing_ok=True)
    logfile = open(out / "dkv.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "dkv.loadtest.cluster",
        "--info",
        str(info),
        "--cpu-bytes",
        args.cpu_bytes,
        "--redis-bytes",
        args.redis_bytes,
        *(["--no-redis"] if args.no_redis else []),
        *(["--token", args.token] if args.token else []),
    ]
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
    print(f"starting dkv (log: {out / 'dkv.log'}) ...", flush=True)
    started = time.monotonic()
    while not info.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"dkv exited with code {proc.returncode} before serving; its log ends with:\n" + _tail(out / "dkv.log")
            )
        if time.monotonic() - started > args.ready_timeout:
            raise TimeoutError(f"dkv was not serving within {args.ready_timeout:.0f} s; see {out / 'dkv.log'}")
        time.sleep(0.5)
    addresses = json.loads(info.read_text())
    print(
        f"dkv is up in {time.monotonic() - started:.0f} s: gateway {addresses['gateway']}, "
        f"OpenAI API {addresses['http']}, store {addresses['store']}",
        flush=True,
    )
    return proc, addresses, logfile


def _stop_cluster(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _warm_up(gateway: str) -> None:
    from dkv.loadtest.clients import client_kwargs
    from dkv.services.client import DkvClient

    started = time.perf_counter()
    with DkvClient(gateway, timeout_s=300, **client_kwargs(DkvClient)) as client:
        client.ask(WARMUP_CONTEXT, "Is it windy in the evening?", chat_template=True, max_new_tokens=4)
    print(f"warm-up Generate: {time.perf_counter() - started:.1f} s", flush=True)


def locust_command(args, gateway: str, http: str, store: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(Path(__file__).with_name("locustfile.py")),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.time,
        "--stop-timeout",
        args.stop_timeout,
        "--host",
        gateway,
        "--http-host",
        http,
        "--store",
        store,
        "--scenario",
        args.scenario,
        "--p99-ms",
        str(args.p99_ms),
        "--csv",
        str(out / "dkv"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--exit-code-on-error",
        "1",
        *args.locust_args,
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run_s, stop_s = timespan_s(args.time), timespan_s(args.stop_timeout)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("dkv_*.csv")) + list(out.glob("dkv_summary.json")) + [out / "report.html"]:
        old.unlink(missing_ok=True)

    def terminated(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)
    if args.token:
        os.environ["DKV_TOKEN"] = args.token  # the warm-up and locust's users send it
    cluster = logfile = locust = None
    try:
        if args.host:
            gateway, http, store = args.host, args.http_host, args.store
        else:
            cluster, addresses, logfile = _start_cluster(args, out)
            gateway, http, store = addresses["gateway"], addresses["http"], addresses["store"]
        if not args.no_warmup and args.scenario != "store":
            _warm_up(gateway)
        cmd = locust_command(args, gateway, http, store, out)
        print("running: " + " ".join(cmd[1:]), flush=True)
        locust = subprocess.Popen(cmd)
        try:
            code = locust.wait(run_s + stop_s + 300)
        except subprocess.TimeoutExpired:
            print("locust did not finish in time: stopping it", flush=True)
            locust.terminate()
            locust.wait(30)
            code = 124
        print(
            f"report: {out / 'report.html'}; CSV: {out / 'dkv_stats.csv'}; summary: {out / 'dkv_summary.json'}"
            + (f"; dkv log: {out / 'dkv.log'}" if cluster else ""),
            flush=True,
        )
        return code
    except _Terminated:
        print("terminated: stopping", flush=True)
        return 143
    finally:
        if locust is not None and locust.poll() is None:
            locust.terminate()
            try:
                locust.wait(30)
            except subprocess.TimeoutExpired:
                locust.kill()
        if cluster is not None:
            print("stopping dkv ...", flush=True)
            _stop_cluster(cluster)
        if logfile is not None:
            logfile.close()


if __name__ == "__main__":
    sys.exit(main())
