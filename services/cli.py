"""``dkv``: the command line of the disaggregated KV-cache store.

    dkv store serve [--port P --device-bytes N --cpu-bytes N --redis-url URL ...]
    dkv store stats [--address HOST:PORT]
    dkv prefill serve [--port P --store HOST:PORT --model NAME ...]
    dkv decode serve [--port P --store HOST:PORT --prefill HOST:PORT ...]
    dkv bench store [--json]
    dkv demo
    dkv config show store

Every ``serve`` flag also reads from a ``DKV_<COMPONENT>_*`` environment variable and from the YAML
file given by ``--config``; ``dkv config show`` prints the effective values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from services.settings import (DecodeSettings, PrefillSettings, SettingsError, StoreSettings, add_arguments,
                               describe, load)

# glibc returns large blocks to the OS on free and maps fresh zeroed pages for the next one, so
# every 4 MiB frame pays its page faults again. Keeping the heap (see docs/benchmarks.md) makes
# large copies several times faster on this kind of machine.
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
COMPONENTS = {"store": StoreSettings, "prefill": PrefillSettings, "decode": DecodeSettings}


def tune_malloc_and_reexec() -> None:
    """Re-run this process with ``MALLOC_TUNING`` in its environment (glibc reads it at start-up)."""
    if os.environ.get("DKV_MALLOC_TUNING", "1") == "0" or all(k in os.environ for k in MALLOC_TUNING):
        return
    env = {**os.environ, **MALLOC_TUNING}
    os.execve(sys.executable, [sys.executable, "-m", "services.cli", *sys.argv[1:]], env)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _store_serve(args: argparse.Namespace) -> int:
    from services.store_server import serve

    settings = load(StoreSettings, _settings_args(args, StoreSettings))
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _prefill_serve(args: argparse.Namespace) -> int:
    from services.prefill_server import serve

    settings = load(PrefillSettings, _settings_args(args, PrefillSettings))
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _decode_serve(args: argparse.Namespace) -> int:
    from services.decode_server import serve

    settings = load(DecodeSettings, _settings_args(args, DecodeSettings))
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _store_stats(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from services.store_client import StoreClient

    with StoreClient(args.address, timeout_s=args.timeout) as client:
        print(json.dumps(MessageToDict(client.stats(), always_print_fields_with_no_presence=True), indent=2))
    return 0


def _bench_store(args: argparse.Namespace) -> int:
    from bench.store import main as bench_main

    return bench_main(args)


def _demo(args: argparse.Namespace) -> int:
    from services.demo import main as demo_main

    return demo_main(args)


def _config_show(args: argparse.Namespace) -> int:
    cls = COMPONENTS[args.component]
    settings = load(cls, {"config": args.config})
    print(json.dumps(describe(settings), indent=2))
    return 0


def _settings_args(args: argparse.Namespace, cls: type) -> dict:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} | {"config"}
    return {k: v for k, v in vars(args).items() if k in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkv", description="dkv: a disaggregated, compressed KV-cache store "
                                     "for LLM inference.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    store = sub.add_parser("store", help="run or inspect the KV store service").add_subparsers(dest="action", required=True)
    serve = store.add_parser("serve", help="serve the KV store over gRPC until SIGTERM/Ctrl-C",
                             description="Serve the tiered KV store (device / host / Redis memory) over gRPC. "
                             "Health and reflection are served on the same port.")
    add_arguments(serve, StoreSettings)
    serve.set_defaults(func=_store_serve)
    stats = store.add_parser("stats", help="print a running store's tiers and counters as JSON")
    stats.add_argument("--address", default="127.0.0.1:50052", help="store address (default 127.0.0.1:50052)")
    stats.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    stats.set_defaults(func=_store_stats)

    prefill = sub.add_parser("prefill", help="run a prefill worker").add_subparsers(dest="action", required=True)
    pserve = prefill.add_parser("serve", help="serve prefill over gRPC: model forward, compression, write to the store",
                                description="Serve the Prefill service: tokens or text in, compressed KV-cache "
                                "entries written to the store out. Reuses the longest cached prefix.")
    add_arguments(pserve, PrefillSettings)
    pserve.set_defaults(func=_prefill_serve)

    decode = sub.add_parser("decode", help="run a decode worker").add_subparsers(dest="action", required=True)
    dserve = decode.add_parser("serve", help="serve decoding over gRPC: fetch an entry, sparse attention, stream tokens",
                               description="Serve the Decode service: an entry key (or a context) and a query in, "
                               "tokens streamed out, then stats (attended slots per step, bytes per tier, time per "
                               "token). Recomputes missing entries through a prefill worker.")
    add_arguments(dserve, DecodeSettings)
    dserve.set_defaults(func=_decode_serve)

    bench = sub.add_parser("bench", help="benchmarks that print JSON").add_subparsers(dest="suite", required=True)
    bstore = bench.add_parser("store", help="Put/Get throughput of the store against gRPC, Redis, TCP and memcpy",
                              description="Put and get a SmolLM2-sized cache (4096 tokens, 30 layers, 3 KV heads, "
                              "head dim 64, fp16) and its 20%% and 10%% variants through a store server "
                              "process, next to the limits of the same bytes over raw gRPC, Redis, TCP and memcpy.")
    bstore.add_argument("--json", action="store_true", help="print only the JSON result")
    bstore.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (best is kept)")
    bstore.add_argument("--tokens", type=int, default=4096, help="context tokens of the full cache")
    bstore.set_defaults(func=_bench_store)

    demo = sub.add_parser("demo", help="start a store, put and get caches through it, show what happened")
    demo.set_defaults(func=_demo)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the effective settings (flags > DKV_* env > YAML > defaults)")
    show.add_argument("component", choices=sorted(COMPONENTS))
    show.add_argument("--config", metavar="YAML", help="YAML settings file")
    show.set_defaults(func=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        tune_malloc_and_reexec()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"dkv: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
