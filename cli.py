"""``dkv``: the command line of the disaggregated KV-cache store.

The top layer: it dispatches to the services (``serve``, ``up``, ``generate``), the benchmarks and
the demo (``bench``, ``demo``), so it lives beside them in none of their folders.

    dkv store serve [--port P --device-bytes N --cpu-bytes N --redis-url URL ...]
    dkv store stats [--address HOST:PORT]
    dkv prefill serve [--port P --store HOST:PORT --model NAME ...]
    dkv decode serve [--port P --store HOST:PORT --prefill HOST:PORT ...]
    dkv gateway serve [--port 50051 --prefill HOST:PORT --decode HOST:PORT[,...]]
    dkv up [--port 50051]                  # everything on this machine
    dkv generate "context" "query" [--method snapkv --ratio 0.5 --selection pages --budget 256]
    dkv bench store [--json]
    dkv bench quality [--json] [--quick] [--no-peers] [--out DIR]
    dkv bench decode|serve [--json]
    dkv demo
    dkv config show store

Every ``serve`` flag also reads from a ``DKV_<COMPONENT>_*`` environment variable and from the YAML
file given by ``--config``; ``dkv config show`` prints the effective values.

Failures a user fixes without reading code (a bad setting or model, a port in use, a server that
cannot be reached, a package that is not installed) end with one line on stderr and a non-zero
exit; ``dkv --debug ...`` (or ``DKV_DEBUG=1``) shows their traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import sys

from dkv.kvstore.recipe import DEFAULT_RECIPE, SCHEMES
from dkv.services.logs import setup_logging
from dkv.services.malloc import MALLOC_TUNING
from dkv.services.settings import (
    DecodeSettings,
    GatewaySettings,
    PrefillSettings,
    SettingsError,
    StoreSettings,
    add_arguments,
    describe,
    load,
)
from dkv.workers.model_source import DTYPES, FORMS, ModelError

COMPONENTS = {"store": StoreSettings, "prefill": PrefillSettings, "decode": DecodeSettings, "gateway": GatewaySettings}


def tune_malloc_and_reexec() -> None:
    """Re-run this process with ``MALLOC_TUNING`` in its environment (glibc reads it at start-up)."""
    if os.environ.get("DKV_MALLOC_TUNING", "1") == "0" or all(k in os.environ for k in MALLOC_TUNING):
        return
    env = {**os.environ, **MALLOC_TUNING}
    os.execve(sys.executable, [sys.executable, "-m", "dkv", *sys.argv[1:]], env)


# component -> the module whose ``serve(settings)`` runs it (imported when it is run)
SERVERS = {
    "store": "dkv.services.store_server",
    "prefill": "dkv.services.prefill_server",
    "decode": "dkv.services.decode_server",
    "gateway": "dkv.services.gateway_server",
}


def _serve(args: argparse.Namespace) -> int:
    import importlib

    cls = COMPONENTS[args.command]
    settings = load(cls, _settings_args(args, cls))
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(importlib.import_module(SERVERS[args.command]).serve(settings))
    return 0


def _up(args: argparse.Namespace) -> int:
    from dkv.services.up import UpOptions, run

    setup_logging("info", "text")
    return run(
        UpOptions(
            host=args.host,
            port=args.port,
            http_port=args.http_port,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            device_bytes=args.device_bytes,
            cpu_bytes=args.cpu_bytes,
            redis_bytes=args.redis_bytes,
            redis=not args.no_redis,
            ray=args.ray,
            prefill_workers=args.prefill_workers,
            decode_workers=args.decode_workers,
            token=args.token,
            metrics=args.metrics,
        )
    )


def _generate(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from dkv.kvstore.recipe import Recipe
    from dkv.services.client import DkvClient

    recipe = Recipe(
        method=args.method, ratio=args.ratio, quant=args.quant, chunk_size=args.chunk_size, chunked=not args.whole
    )
    with DkvClient(args.address, token=args.token, tls_ca=args.tls_ca) as client:
        for item in client.generate(
            args.context,
            args.query,
            chat_template=not args.raw,
            recipe=recipe,
            selection=args.selection,
            budget=args.budget,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            stop=args.stop or (),
        ):
            if isinstance(item, str):
                print(item, end="", flush=True)
            else:
                print("\n" + json.dumps(MessageToDict(item), indent=2), file=sys.stderr)
    return 0


def _store_stats(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from dkv.services.store_client import StoreClient
    from dkv.services.transport import Security

    with StoreClient(args.address, timeout_s=args.timeout, security=Security(args.token, args.tls_ca)) as client:
        print(json.dumps(MessageToDict(client.stats(), always_print_fields_with_no_presence=True), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"dkv.bench.{args.suite}").main(args)


def _demo(args: argparse.Namespace) -> int:
    from dkv.bench.demo import main as demo_main

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


def _client_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=os.environ.get("DKV_TOKEN", ""),
        help="bearer token, when the server requires one (env DKV_TOKEN)",
    )
    parser.add_argument("--tls-ca", default="", help="PEM CA of the server's certificate (turns TLS on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkv",
        description="dkv: a disaggregated, compressed KV-cache store for LLM inference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("DKV_DEBUG", "") not in ("", "0"),
        help="show the traceback of a failure instead of one line (env DKV_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    store = sub.add_parser("store", help="run or inspect the KV store service").add_subparsers(
        dest="action", required=True
    )
    serve = store.add_parser(
        "serve",
        help="serve the KV store over gRPC until SIGTERM/Ctrl-C",
        description="Serve the tiered KV store (device / host / Redis memory) over gRPC. "
        "Health and reflection are served on the same port.",
    )
    add_arguments(serve, StoreSettings)
    serve.set_defaults(func=_serve)
    stats = store.add_parser("stats", help="print a running store's tiers and counters as JSON")
    stats.add_argument("--address", default="127.0.0.1:50052", help="store address (default 127.0.0.1:50052)")
    stats.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    _client_security_arguments(stats)
    stats.set_defaults(func=_store_stats)

    prefill = sub.add_parser("prefill", help="run a prefill worker").add_subparsers(dest="action", required=True)
    pserve = prefill.add_parser(
        "serve",
        help="serve prefill over gRPC: model forward, compression, write to the store",
        description="Serve the Prefill service: tokens or text in, compressed KV-cache "
        "entries written to the store out. Reuses the longest cached prefix.",
    )
    add_arguments(pserve, PrefillSettings)
    pserve.set_defaults(func=_serve)

    decode = sub.add_parser("decode", help="run a decode worker").add_subparsers(dest="action", required=True)
    dserve = decode.add_parser(
        "serve",
        help="serve decoding over gRPC: fetch an entry, sparse attention, stream tokens",
        description="Serve the Decode service: an entry key (or a context) and a query in, "
        "tokens streamed out, then stats (attended slots per step, bytes per tier, time per "
        "token). Recomputes missing entries through a prefill worker.",
    )
    add_arguments(dserve, DecodeSettings)
    dserve.set_defaults(func=_serve)

    gateway = sub.add_parser("gateway", help="run the gateway").add_subparsers(dest="action", required=True)
    gserve = gateway.add_parser(
        "serve",
        help="serve Generate over gRPC: the one entry point for clients",
        description="Serve the Gateway: context + query in, tokens streamed out. Resolves "
        "the context through a prefill worker (longest cached prefix first) and decodes on "
        "the least loaded decode worker.",
    )
    add_arguments(gserve, GatewaySettings)
    gserve.set_defaults(func=_serve)

    up = sub.add_parser(
        "up",
        help="start the whole system on this machine (Ctrl-C stops all of it)",
        description="Start Redis (when installed), the store, a prefill worker, a decode worker and "
        "the gateway as child processes; print the gateway address; stop them all on Ctrl-C.",
    )
    up.add_argument("--port", type=int, default=50051, help="gateway port (default 50051)")
    up.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="port of the gateway's OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models); 0 = none (default 8000)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    up.add_argument(
        "--model", default="smollm2-135m", help=f"model of the workers and the gateway: {FORMS} (default smollm2-135m)"
    )
    up.add_argument(
        "--device",
        default="auto",
        help="torch device of the workers' models: auto (the first CUDA GPU "
        "if there is one, else cpu), cpu, cuda, cuda:N (default auto)",
    )
    up.add_argument(
        "--dtype",
        default="auto",
        help=f"precision of the workers' weights: {', '.join(DTYPES)}, or "
        "auto: float32 on cpu, bfloat16 (or float16) on a GPU (default auto)",
    )
    up.add_argument("--cpu-bytes", default="2GiB", help="host-memory tier of the store")
    up.add_argument("--device-bytes", default="0", help="device-memory tier of the store (GPU when present)")
    up.add_argument("--redis-bytes", default="4GiB", help="what the store may use in Redis")
    up.add_argument("--no-redis", action="store_true", help="run without the Redis tier")
    up.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the prefill and decode workers as Ray actors: on the Ray cluster at ADDRESS, or on a "
        "local Ray when no address is given",
    )
    up.add_argument("--prefill-workers", type=int, default=1, help="prefill actors (with --ray)")
    up.add_argument("--decode-workers", type=int, default=1, help="decode actors (with --ray)")
    up.add_argument(
        "--token",
        default=os.environ.get("DKV_TOKEN", ""),
        help="bearer token every component requires and sends (env DKV_TOKEN; default: no auth)",
    )
    up.add_argument(
        "--metrics",
        action="store_true",
        help="serve every component's Prometheus /metrics on a free port (printed in the log)",
    )
    up.set_defaults(func=_up)

    gen = sub.add_parser(
        "generate",
        help="send one Generate request to a running gateway and print the answer",
        description="Print the tokens as they come, then the stats (stderr, JSON).",
    )
    gen.add_argument("context", help="the context (a document, a conversation so far)")
    gen.add_argument("query", help="the question or instruction after it")
    gen.add_argument("--address", default="127.0.0.1:50051", help="gateway address")
    gen.add_argument(
        "--method", default=DEFAULT_RECIPE.method, help="compression method (snapkv, pyramidkv, h2o, ..., full)"
    )
    gen.add_argument(
        "--ratio", type=float, default=DEFAULT_RECIPE.ratio, help="fraction of the context's tokens removed"
    )
    gen.add_argument("--quant", default=DEFAULT_RECIPE.quant, choices=list(SCHEMES), help="K/V precision")
    gen.add_argument("--chunk-size", type=int, default=DEFAULT_RECIPE.chunk_size, help="tokens per prefix chunk")
    gen.add_argument("--whole", action="store_true", help="compress the whole context at once (no prefix reuse)")
    gen.add_argument("--selection", default="dense", choices=["dense", "topk", "pages"], help="decode-time selection")
    gen.add_argument("--budget", type=int, default=0, help="tokens each KV head attends per step (0 = all)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _client_security_arguments(gen)
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks that print JSON").add_subparsers(dest="suite", required=True)
    bstore = bench.add_parser(
        "store",
        help="Put/Get throughput of the store against gRPC, Redis, TCP and memcpy",
        description="Put and get a SmolLM2-sized cache (4096 tokens, 30 layers, 3 KV heads, "
        "head dim 64, fp16) and its 20% and 10% variants through a store server "
        "process, next to the limits of the same bytes over raw gRPC, Redis, TCP and memcpy.",
    )
    bstore.add_argument("--json", action="store_true", help="print only the JSON result")
    bstore.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (best is kept)")
    bstore.add_argument("--tokens", type=int, default=4096, help="context tokens of the full cache")
    bstore.set_defaults(func=_bench)
    bquality = bench.add_parser(
        "quality",
        help="retrieval, likelihood and bytes of every compression method vs kvpress",
        description="Score every compression method at ratios 0.5/0.75/0.9 (plus quantized, "
        "merged and chunked variants) on SmolLM2: passkey and needle retrieval, extra NLL "
        "and top-1 agreement against the full cache, stored bytes, prefill overhead; and "
        "kvpress's presses on the same tokens when .venv-peers exists (make bench-peers).",
    )
    bquality.add_argument("--json", action="store_true", help="print only the JSON result")
    bquality.add_argument("--quick", action="store_true", help="smoke test: 2 methods, 1 ratio, 3 tasks")
    bquality.add_argument("--no-peers", action="store_true", help="skip kvpress even when .venv-peers exists")
    bquality.add_argument(
        "--out",
        default="docs",
        metavar="DIR",
        help="write DIR/img/quality.png and the quality section of DIR/benchmarks.md (default docs; '' to skip)",
    )
    bquality.add_argument("--threads", type=int, default=1, help="torch threads of dkv and of the kvpress runner")
    bquality.set_defaults(func=_bench)

    bserve = bench.add_parser(
        "serve",
        help="serving side by side with transformers and vLLM CPU: TTFT, tokens/s, clients",
        description="Serve the same token ids with plain transformers, vLLM's CPU "
        "build (when make bench-peers built it) and dkv up: time to first token on a miss and "
        "a hit, single-stream tokens per second, aggregate tokens per second and inter-token "
        "latency at 1, 4, 8 and 16 clients; optionally the capacity scenario. Prints JSON; the "
        "ratios to the serving targets are under 'targets'.",
    )
    from dkv.bench.serve import add_arguments as serve_arguments

    serve_arguments(bserve)
    bserve.set_defaults(func=_bench)
    bdec = bench.add_parser(
        "decode",
        help="sparse vs dense decode attention; selection quality at small budgets",
        description="Attention time per decode step, sparse vs dense, at 4K/16K/64K tokens for "
        "the SmolLM2 and a Llama-8B shape (Triton on a GPU, torch on a CPU), the kernel's share "
        "of copy bandwidth on a GPU, and retrieval / extra NLL of each selection at budgets "
        "1/4, 1/8, 1/16 on SmolLM2.",
    )
    bdec.add_argument("--json", action="store_true", help="print only the JSON result")
    bdec.add_argument("--repeats", type=int, default=20, help="timed repetitions (median)")
    bdec.add_argument("--quick", action="store_true", help="contexts 4K and 16K, few quality tasks")
    bdec.add_argument("--no-quality", action="store_true", help="attention timings only")
    bdec.set_defaults(func=_bench)

    demo = sub.add_parser(
        "demo",
        help="start the whole system, ask questions about documents, show what happened",
        description="Start dkv on this machine, ask several questions about each of a few "
        "documents and hold a multi-turn chat; print time to first token (miss vs hit), tokens "
        "per second, bytes read per tier, compression ratio and the answers; plot TTFT.",
    )
    demo.add_argument("--out", default=".", help="directory for the plot (dkv-demo-ttft.png)")
    demo.set_defaults(func=_demo)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the effective settings (flags > DKV_* env > YAML > defaults)")
    show.add_argument("component", choices=sorted(COMPONENTS))
    show.add_argument("--config", metavar="YAML", help="YAML settings file")
    show.set_defaults(func=_config_show)
    return parser


def one_line(error: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for a failure the user can fix from one line; None for anything else."""
    if isinstance(error, (SettingsError, ModelError)):
        return str(error), 2
    if isinstance(error, ChildProcessError):  # dkv up: a component died while starting (its log says why)
        return str(error), 1
    if isinstance(error, OSError) and error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return error.strerror, 1
    if isinstance(error, ModuleNotFoundError) and error.name and error.name.partition(".")[0] != "dkv":
        return (
            f"{error.name} is not installed, and this command needs it: pip install 'dkv[server]' for the store, "
            "the workers and dkv up, 'dkv[bench]' for benchmarks and the demo's plot"
        ), 1
    import grpc

    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach the server: {details}; is dkv running there? (check --address)", 1
        return f"the server answered {code.name}: {details}", 1
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        tune_malloc_and_reexec()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        failure = None if args.debug else one_line(e)
        if failure is None:
            raise
        message, code = failure
        print(f"dkv: {' '.join(message.split())}", file=sys.stderr)
        return code
