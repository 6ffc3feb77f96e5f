"""Locust load test of dkv over gRPC: store users, generate users, or both.

    locust -f loadtest/locustfile.py --headless -u 3 -r 1 --run-time 60s \
        --host 127.0.0.1:50051 --store 127.0.0.1:50052 --scenario mixed --p99-ms 60000 \
        --csv build/loadtest/dkv --html build/loadtest/report.html

(``make loadtest`` / ``python -m dkv.loadtest.run`` start a ``dkv up`` on free ports and run this.)

Users:

- ``StoreUser`` talks to the KV store (``--store``) with ``StoreClient``: Get (hot keys, Zipf;
  a miss is recomputed and Put back, as a client of a cache does), Lookup (a longer prompt that
  starts with a hot key's tokens) and Put (keys drawn uniformly: new content). Entries are
  synthetic caches of SmolLM2-135M's shapes, 0.5-2 MB each (``loadtest.entries``); the key space is
  sized from the store's capacity (``Stats``) so that all its entries add up to
  ``--key-space-factor`` times what the store holds, and eviction runs. A Get answered NOT_FOUND
  is reported as ``Get (miss)``, a Lookup without a hit as ``Lookup (miss)``: expected results, not
  failures.
- ``DocumentQAUser`` (SCBench multi-request): asks a random question about one of a few shared
  documents through the gateway (``--host``), with ``DkvClient.generate``.
- ``ChatUser`` (SCBench multi-turn): a conversation about a document whose context grows turn by
  turn (the previous turn's context, question and answer are the next turn's prefix).
- ``HttpChatUser``: the same conversations over the gateway's OpenAI-compatible HTTP API
  (``--http-host``, e.g. ``http://127.0.0.1:8000/v1``): ``POST /v1/chat/completions``, streamed,
  the document as the system message and every earlier question and answer kept as messages.

Every gRPC call is reported by a client interceptor (``loadtest.grpc_locust``): unary calls when they
return, streams (Get, Generate) when fully consumed; an HTTP chat when its last event arrived.
Generations also record their time to first token, by how much of the context was cached, as
``TTFT (hit)``, ``TTFT (partial)`` and ``TTFT (miss)`` (method ``ttft``; over HTTP as the client
saw it); those rows are kept out of the Aggregated row.

``--scenario store|generate|mixed|http`` picks the users. At the end a summary is printed (rps,
p50/p95/p99 per call, hit rates, the store's evictions) and written next to the CSV files
(``<csv prefix>_summary.json``); the exit code is 1 when any call failed, a task raised, no call
completed, or the p99 of any name is above ``--p99-ms``.

More load than one CPU: locust's ``--master`` and separate ``--worker`` processes. Not
``--processes``: it forks after gRPC is initialized, and the forked workers hang.

``DKV_TOKEN`` (optional): passed to the clients as their bearer token when set, for clusters that
require one; likewise ``DKV_TLS_CA`` (and ``DKV_TLS_CERT``/``DKV_TLS_KEY`` for mutual TLS), over
gRPC and HTTP alike.
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

# locust patches the standard library for gevent when it is imported; gRPC must then be told to
# run its I/O on gevent too, before any channel exists, or every call blocks the whole process.
import locust  # noqa: F401  (monkey-patches first)

grpc_gevent.init_gevent()

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from dkv.loadtest.clients import client_kwargs, security_from_env  # noqa: E402
from dkv.loadtest.documents import make_documents  # noqa: E402
from dkv.loadtest.grpc_locust import LocustInterceptor, intercepted, store_outcome  # noqa: E402
from dkv.loadtest.summary import TTFT, format_summary, problems  # noqa: E402

log = logging.getLogger("dkv.loadtest")

SCENARIOS = {
    "store": ("StoreUser",),
    "generate": ("DocumentQAUser", "ChatUser"),
    "mixed": ("StoreUser", "DocumentQAUser", "ChatUser"),
    "http": ("HttpChatUser",),
}
CHAT_ROUTE = "/v1/chat/completions"


class _Context:
    """What the users of this process share: options, the interceptor, entries, documents, counters."""

    def __init__(self):
        self.environment = None
        self.options = None
        self.interceptor: LocustInterceptor | None = None
        self.factory = None
        self.zipf = None
        self.keys = 0
        self.capacity_bytes = 0
        self.documents = []
        self.generate = {"context_tokens": 0, "cached_prefix_tokens": 0, "prefilled_tokens": 0}
        self.bytes_put = 0
        self.store_stats: dict | None = None
        self.started = self.stopped = None
        self.users = 0


CTX = _Context()


# ------------------------------------------------------------------------- options and setup


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="mixed",
        include_in_web_ui=True,
        help="store: StoreUser; generate: DocumentQAUser + ChatUser; mixed: those three (default); http: HttpChatUser",
    )
    parser.add_argument(
        "--p99-ms",
        type=float,
        default=120000.0,
        include_in_web_ui=True,
        help="fail the run (exit code 1) if the p99 of any call name is above this (default 120000)",
    )
    parser.add_argument(
        "--store",
        default=os.environ.get("DKV_STORE", ""),
        include_in_web_ui=True,
        help="address of the KV store, host:port (store users; --host is the gateway)",
    )
    parser.add_argument(
        "--http-host",
        default=os.environ.get("DKV_HTTP_HOST", ""),
        include_in_web_ui=True,
        help="base URL of the gateway's OpenAI API, e.g. http://127.0.0.1:8000/v1 (HTTP users)",
    )
    parser.add_argument(
        "--key-space-factor",
        type=float,
        default=4.0,
        help="the store users' keys add up to this many times the store's capacity (default 4)",
    )
    parser.add_argument("--key-space", type=int, default=0, help="number of keys (overrides --key-space-factor)")
    parser.add_argument("--zipf", type=float, default=1.0, help="skew of the Get/Lookup key popularity (default 1.0)")
    parser.add_argument("--documents", type=int, default=4, help="shared documents (default 4)")
    parser.add_argument(
        "--doc-tokens",
        type=int,
        default=600,
        help="mean document length in tokens; they range from 0.5x to 1.5x (default 600)",
    )
    parser.add_argument("--turns", type=int, default=3, help="turns of a ChatUser conversation (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    parser.add_argument("--tenant", default="", help="tenant of the requests (default: the cluster's default)")
    parser.add_argument("--call-timeout-s", type=float, default=300.0, help="deadline of each call (default 300)")


def _address(host: str | None, default: str) -> str:
    address = host or default
    for scheme in ("grpc://", "grpcs://", "http://", "https://"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
    return address.rstrip("/")


def _store_client(address: str, intercept: bool = True):
    from dkv.services.store_client import StoreClient

    if not intercept:
        return StoreClient(address, timeout_s=CTX.options.call_timeout_s, **client_kwargs(StoreClient))
    with intercepted(CTX.interceptor):
        return StoreClient(address, timeout_s=CTX.options.call_timeout_s, **client_kwargs(StoreClient))


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or not hasattr(options, "scenario"):  # used as a library without our arguments
        return
    CTX.environment, CTX.options = environment, options
    CTX.interceptor = LocustInterceptor(environment.events.request.fire, store_outcome)
    wanted = SCENARIOS[options.scenario]
    chosen = [c for c in environment.user_classes if c.__name__ in wanted]
    if not chosen:
        raise ValueError(f"scenario {options.scenario} needs {', '.join(wanted)}; none of them was selected")
    environment.user_classes[:] = chosen
    if isinstance(environment.runner, MasterRunner):
        return  # workers run the users
    if any(c is StoreUser for c in chosen):
        _setup_store(options)
    if any(c is HttpChatUser for c in chosen) and not options.http_host:
        raise ValueError(
            "the HTTP users need the gateway's OpenAI API: --http-host http://HOST:PORT/v1 (or DKV_HTTP_HOST)"
        )
    if any(c is not StoreUser for c in chosen):
        CTX.documents = make_documents(options.documents, options.doc_tokens)
        log.info("documents: %s", ", ".join(f"{d.name} (~{d.approx_tokens} tokens)" for d in CTX.documents))


def _setup_store(options) -> None:
    from dkv.loadtest.entries import EntryFactory, Zipf, key_space

    if not options.store:
        raise ValueError("the store users need the store's address: --store HOST:PORT (or DKV_STORE)")
    address = _address(options.store, "")
    with _store_client(address, intercept=False) as store:
        store.wait_ready(30)
        stats = store.stats()
    CTX.capacity_bytes = sum(t.capacity_bytes for t in stats.tiers)
    CTX.factory = EntryFactory(tenant=options.tenant or "default")
    CTX.keys = options.key_space or key_space(CTX.capacity_bytes, CTX.factory.mean_bytes, options.key_space_factor)
    CTX.zipf = Zipf(CTX.keys, options.zipf)
    log.info(
        "store %s holds %.0f MiB; %d keys of %.2f MB on average = %.1fx its capacity",
        address,
        CTX.capacity_bytes / 2**20,
        CTX.keys,
        CTX.factory.mean_bytes / 1e6,
        CTX.keys * CTX.factory.mean_bytes / max(1, CTX.capacity_bytes),
    )


def reported(task_fn):
    """A task whose failed calls were reported by the interceptor: their error ends the task quietly
    (one failure in the stats, instead of a failure plus a task exception with its traceback)."""

    @functools.wraps(task_fn)
    def run(self):
        try:
            task_fn(self)
        except grpc.RpcError:
            pass

    return run


@lru_cache(maxsize=65536)
def _key(i: int) -> str:
    return CTX.factory.key(i)


# ------------------------------------------------------------------------------------- users


class StoreUser(User):
    """Put / Get / Lookup on the KV store over a key space larger than the store."""

    weight = 1
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.store = _store_client(_address(CTX.options.store, ""))
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.store.close()

    def _put(self, i: int) -> None:
        frames = CTX.factory.frames(i)
        self.store.put_frames(frames)
        CTX.bytes_put += sum(len(f) for f in frames)

    @task(3)
    @reported
    def get(self) -> None:
        """A hot key; on a miss (never stored, or evicted) the client recomputes it and puts it back."""
        i = CTX.zipf.sample(self.rng)
        if self.store.get_frames(_key(i)) is None:
            self._put(i)

    @task(2)
    @reported
    def lookup(self) -> None:
        """A prompt that starts with a hot key's tokens and goes on: the store finds the cached prefix."""
        i = CTX.zipf.sample(self.rng)
        tokens = CTX.factory.token_ids(i) + [self.rng.randrange(49152) for _ in range(self.rng.randint(1, 200))]
        self.store.lookup(
            CTX.factory.template(i).identity.model_fingerprint,
            CTX.factory.recipe(i),
            tokens,
            tenant=CTX.options.tenant or "default",
        )

    @task(1)
    @reported
    def put(self) -> None:
        """New content: any key of the key space."""
        self._put(self.rng.randrange(CTX.keys))


class _GenerateUser(User):
    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        from dkv.services.client import DkvClient

        with intercepted(CTX.interceptor):
            self.client = DkvClient(
                _address(self.host, "127.0.0.1:50051"), timeout_s=CTX.options.call_timeout_s, **client_kwargs(DkvClient)
            )
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.client.close()

    def ask(self, context: str, query: str) -> str:
        """One Generate (reported by the interceptor); records its time to first token; the answer."""
        answer, stats = self.client.ask(
            context, query, chat_template=True, max_new_tokens=CTX.options.max_new_tokens, tenant=CTX.options.tenant
        )
        if stats is None:
            raise RuntimeError("Generate ended without its GenerateStats")
        _record_generation(stats.ttft_ms, {name: getattr(stats, name) for name in ("cache_hit", *CTX.generate)})
        return answer


class DocumentQAUser(_GenerateUser):
    """Multi-request: different questions about the same few documents."""

    weight = 1

    @task
    @reported
    def question(self) -> None:
        doc = self.rng.choice(CTX.documents)
        self.ask(doc.text, self.rng.choice(doc.questions))


class ChatUser(_GenerateUser):
    """Multi-turn: each turn's context is the previous turn's context, question and answer."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.turn, self.context, self.questions = 0, "", []

    @task
    @reported
    def next_turn(self) -> None:
        turns = max(1, CTX.options.turns)
        if self.turn == 0 or self.turn >= turns:
            doc = self.rng.choice(CTX.documents)
            self.context, self.turn = doc.text, 0
            self.questions = self.rng.sample(doc.questions, min(turns, len(doc.questions)))
            self.questions += [self.rng.choice(doc.questions) for _ in range(turns - len(self.questions))]
        question = self.questions[self.turn]
        answer = self.ask(self.context, question)
        self.context = f"{self.context}\n\nUser: {question}\nAssistant: {answer.strip() or '(no answer)'}"
        self.turn += 1


def _record_generation(ttft_ms: float, stats: dict) -> None:
    """A generation's time to first token, on the row of its cache outcome, and its token counts.

    ``stats``: ``cache_hit`` and the ``CTX.generate`` counters of its ``GenerateStats``."""
    kind = "hit" if stats["cache_hit"] else "partial" if stats["cached_prefix_tokens"] else "miss"
    # logged on the row alone, not through the request event: a TTFT is not one more request
    CTX.environment.stats.get(f"TTFT ({kind})", TTFT).log(round(ttft_ms), 0)
    for name in CTX.generate:
        CTX.generate[name] += int(stats[name])


class HttpChatUser(User):
    """Multi-turn chats over the OpenAI HTTP API, streamed; each chat is about one document (the system
    message) and keeps its earlier questions and answers, so each turn's context extends the last's."""

    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        import requests

        security = security_from_env()
        self.session = requests.Session()
        if "token" in security:
            self.session.headers["Authorization"] = f"Bearer {security['token']}"
        if "tls_ca" in security:
            self.session.verify = security["tls_ca"]
        if "tls_cert" in security:
            self.session.cert = (security["tls_cert"], security["tls_key"])
        self.url = CTX.options.http_host.rstrip("/")
        models = self.session.get(self.url + "/models", timeout=CTX.options.call_timeout_s)
        models.raise_for_status()
        self.model = models.json()["data"][0]["id"]
        self.rng = random.Random()
        self.turn, self.messages, self.questions = 0, [], []

    def on_stop(self) -> None:
        self.session.close()

    @task
    def next_turn(self) -> None:
        turns = max(1, CTX.options.turns)
        if self.turn == 0 or self.turn >= turns:
            doc = self.rng.choice(CTX.documents)
            self.messages, self.turn = [{"role": "system", "content": doc.text}], 0
            self.questions = [self.rng.choice(doc.questions) for _ in range(turns)]
        question = {"role": "user", "content": self.questions[self.turn]}
        body = {
            "model": self.model,
            "messages": [*self.messages, question],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": CTX.options.max_new_tokens,
            "temperature": 0,
            **({"tenant": CTX.options.tenant} if CTX.options.tenant else {}),
        }
        answer = self._chat(body)
        if answer is not None:
            self.messages += [question, {"role": "assistant", "content": answer}]
            self.turn += 1

    def _chat(self, body: dict) -> str | None:
        """One streamed chat completion, reported to locust; its answer, or None when it failed."""
        started, first, length, pieces, stats, error = time.perf_counter(), None, 0, [], None, None
        try:
            with self.session.post(
                self.url + "/chat/completions", json=body, stream=True, timeout=CTX.options.call_timeout_s
            ) as reply:
                if reply.status_code != 200:
                    raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:500]}")
                for line in reply.iter_lines():
                    length += len(line)
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']['message']}")
                    for choice in event["choices"]:
                        if choice.get("delta", {}).get("content"):
                            first = first or time.perf_counter()
                            pieces.append(choice["delta"]["content"])
                    stats = event.get("dkv", stats)
            if stats is None:
                raise RuntimeError("the stream ended without its stats")
        except Exception as e:
            error = e
        elapsed_ms = (time.perf_counter() - started) * 1e3
        CTX.environment.events.request.fire(
            request_type="POST",
            name=CHAT_ROUTE,
            response_time=elapsed_ms,
            response_length=length,
            exception=error,
            context={},
        )
        if error is not None:
            return None
        _record_generation(((first or time.perf_counter()) - started) * 1e3, stats)
        return "".join(pieces).strip() or "(no answer)"


# ------------------------------------------------------------------------------- the summary


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    CTX.started = time.time()


@events.spawning_complete.add_listener
def _on_spawned(user_count, **_kwargs) -> None:
    CTX.users = max(CTX.users, user_count)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    CTX.stopped = time.time()
    if CTX.options is None or isinstance(environment.runner, WorkerRunner) or not CTX.options.store:
        return
    if StoreUser not in environment.user_classes:
        return
    try:
        with _store_client(_address(CTX.options.store, ""), intercept=False) as store:
            s = store.stats()
        CTX.store_stats = {
            "entries": s.entries,
            "hits": s.hits,
            "misses": s.misses,
            "evictions": s.evictions,
            "demotions": s.demotions,
            "promotions": s.promotions,
            "puts": s.puts,
            "rejected_puts": s.rejected_puts,
            "checksum_failures": s.checksum_failures,
            "tiers": [
                {"name": t.name, "entries": t.entries, "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes}
                for t in s.tiers
            ],
        }
    except Exception as e:
        log.warning("could not read the store's stats: %s", e)


def summarize(environment) -> dict:
    """Per call name: requests, failures, rps, p50/p95/p99/max; hit rates; the store's counters."""
    stats = environment.stats
    started = CTX.started or stats.total.start_time
    duration = max(1e-9, (CTX.stopped or time.time()) - started)
    rows = []
    for entry in sorted(stats.entries.values(), key=lambda e: (e.method == TTFT, e.name)):
        if not entry.num_requests and not entry.num_failures:
            continue
        rows.append(
            {
                "name": entry.name,
                "type": entry.method,
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "rps": entry.num_requests / duration,
                "p50_ms": entry.get_response_time_percentile(0.5),
                "p95_ms": entry.get_response_time_percentile(0.95),
                "p99_ms": entry.get_response_time_percentile(0.99),
                "max_ms": entry.max_response_time or 0,
                "avg_bytes": entry.avg_content_length,
            }
        )
    count = {r["name"]: r["requests"] for r in rows}

    def rate(hit: int, miss: int) -> float | None:
        return hit / (hit + miss) if hit + miss else None

    requests = sum(r["requests"] for r in rows if r["type"] != TTFT)
    g = CTX.generate
    return {
        "scenario": CTX.options.scenario if CTX.options else None,
        "users": CTX.users,
        "duration_s": duration,
        "requests": requests,
        "failures": sum(r["failures"] for r in rows),
        "rps": requests / duration,
        "exceptions": sum(e["count"] for e in environment.runner.exceptions.values()) if environment.runner else 0,
        "rows": rows,
        "get_hit_rate": rate(count.get("Get", 0), count.get("Get (miss)", 0)),
        "lookup_hit_rate": rate(count.get("Lookup", 0), count.get("Lookup (miss)", 0)),
        "generate_cache": {
            "hit": count.get("TTFT (hit)", 0),
            "partial": count.get("TTFT (partial)", 0),
            "miss": count.get("TTFT (miss)", 0),
            "prefix_tokens_reused": rate(g["cached_prefix_tokens"], g["context_tokens"] - g["cached_prefix_tokens"]),
        },
        "key_space": {
            "keys": CTX.keys,
            "mean_entry_bytes": CTX.factory.mean_bytes if CTX.factory else None,
            "store_capacity_bytes": CTX.capacity_bytes,
        }
        if CTX.factory
        else None,
        "bytes_put": CTX.bytes_put,
        "store": CTX.store_stats,
        "p99_bound_ms": CTX.options.p99_ms if CTX.options else None,
    }


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    if CTX.options is None or isinstance(environment.runner, WorkerRunner):
        return
    if getattr(environment.parsed_options, "csv_prefix", None):
        # locust rewrites the CSV files every second and not again at shutdown: give its writer one more
        # turn, so calls that ended in the last second (users finishing within --stop-timeout) are in them
        gevent.sleep(1.2)
    summary = summarize(environment)
    found = problems(summary)
    summary["problems"] = found
    print("\n" + format_summary(summary), flush=True)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}_summary.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    if found:
        print("LOAD TEST FAILED: " + "; ".join(found), flush=True)
        environment.process_exit_code = 1
    else:
        print(f"load test passed: no failures, every p99 within {summary['p99_bound_ms']:.0f} ms", flush=True)
