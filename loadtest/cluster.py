"""``python -m dkv.loadtest.cluster --info FILE``: ``dkv up`` on free loopback ports, for the load test.

Starts ``services.up.Cluster`` (Redis when installed, the store, a prefill and a decode worker,
the gateway), waits until every service answers its health check, then writes
``{"gateway": ADDR, "http": URL, "store": ADDR}`` to FILE (atomically) and runs until SIGTERM or SIGINT, until
a service exits, or until the process that started it is gone; then stops everything.
``loadtest.run`` starts it with its output going to a log file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("dkv.loadtest.cluster")


class _Stop(BaseException):  # not swallowed by an `except Exception` in start-up code
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dkv.loadtest.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--info", required=True, help="file to write the addresses to once everything serves")
    parser.add_argument("--host", default="127.0.0.1", help="address the services listen on (default 127.0.0.1)")
    parser.add_argument("--cpu-bytes", default="64MiB", help="host-memory tier of the store (default 64MiB)")
    parser.add_argument("--redis-bytes", default="64MiB", help="Redis tier of the store (default 64MiB)")
    parser.add_argument("--no-redis", action="store_true", help="no Redis tier")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--token", default="", help="bearer token every service requires (default: none)")
    parser.add_argument("--log-level", default="warning", help="log level of the services (default warning)")
    args = parser.parse_args(argv)

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dkv.services.transport import free_port
    from dkv.services.up import Cluster, UpOptions

    levels = {f"DKV_{c}_LOG_LEVEL": args.log_level for c in ("STORE", "PREFILL", "DECODE", "GATEWAY")}
    options = UpOptions(
        host=args.host,
        port=free_port(args.host),
        http_port=free_port(args.host),
        model=args.model,
        cpu_bytes=args.cpu_bytes,
        redis_bytes=args.redis_bytes,
        redis=not args.no_redis,
        extra_env={**levels, **{k: v for k, v in os.environ.items() if k.endswith("_LOG_LEVEL")}},
    )
    if args.token:
        options.token = args.token  # dkv up --token: every service requires it
    parent = os.getppid()

    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    info = Path(args.info)
    try:
        with Cluster(options) as cluster:
            tmp = info.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "gateway": cluster.gateway,
                        "http": cluster.http,
                        "store": cluster.addresses["store"],
                        "pid": os.getpid(),
                    }
                )
            )
            tmp.replace(info)
            log.info("serving: gateway %s, store %s", cluster.gateway, cluster.addresses["store"])
            while True:
                for name, proc in cluster.processes:
                    if proc.poll() is not None:
                        log.error("%s exited with code %s: stopping everything", name, proc.returncode)
                        return 1
                if os.getppid() != parent:
                    log.warning("the load test runner is gone: stopping everything")
                    return 1
                time.sleep(0.5)
    except _Stop as e:
        log.info("%s: stopped", e)
        return 0


if __name__ == "__main__":
    sys.exit(main())
