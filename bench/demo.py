"""``dkv demo``: the whole system on this machine, under a small realistic workload.

Starts everything (``dkv up``'s ``Cluster``: Redis when installed, the store with a deliberately
small host tier so older caches move to Redis, a prefill worker, a decode worker, the gateway),
then asks several questions about each of a few documents (the first question of a document is
a cache miss: prefill + compress + store; the next ones are hits) and holds a multi-turn chat
whose turns extend each other. Prints a table and the store's tiers, and writes a PNG plot of
time to first token, miss against hit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import grpc
from tqdm import tqdm

from dkv.kvstore.recipe import DEFAULT_RECIPE
from dkv.services.client import DkvClient
from dkv.services.store_client import StoreClient
from dkv.services.transport import free_port
from dkv.services.up import Cluster, UpOptions

DOCUMENTS = {
    "memo": (
        "Internal memo, March 3. From: Dana Whitfield, head of operations. To: all warehouse staff. "
        "Starting Monday the loading dock opens at 6:30 instead of 7:00, because the new freight contract with "
        "Norland Logistics brings two extra trucks every morning. The night shift will end thirty minutes "
        "earlier to cover the change, with no loss of pay. Forklift training for the new electric models takes "
        "place on Thursday in bay 4; attendance is required for every driver. Questions go to Marco Ruiz, the "
        "shift supervisor, at extension 214. Please also note that the break room will be repainted next "
        "week, so lunch will be served in the conference room on the second floor. "
    )
    * 3,
    "manual": (
        "Kettle model K-200, user guide. Fill the kettle through the lid, between the MIN mark (0.5 litres) "
        "and the MAX mark (1.7 litres). Place it on the base and press the switch; the blue light shows it is "
        "heating. The kettle turns itself off when the water boils, and also if it is switched on empty. To "
        "descale it, boil a mixture of one part white vinegar and two parts water, leave it for an hour, then "
        "rinse twice. Never immerse the base in water. The filter in the spout lifts out for cleaning. The "
        "warranty lasts two years from the date of purchase and does not cover limescale damage. "
    )
    * 3,
    "history": (
        "The Harbor Bridge was opened in 1932 after eight years of construction. Its steel arch spans 503 "
        "metres, and about 1,400 workers took part in building it. The chief engineer, John Bradfield, "
        "chose the arch design because it could be built outward from both shores without supports in the "
        "water, so ships could still pass during construction. Sixteen workers died on the project. The "
        "bridge carried trams until 1958, when their two lanes were turned over to cars. Today it carries "
        "eight traffic lanes, two railway lines, a footpath and a cycleway. "
    )
    * 3,
}
QUESTIONS = {
    "memo": [
        "At what time will the loading dock open?",
        "Who should staff contact with questions?",
        "Where will lunch be served next week?",
    ],
    "manual": [
        "How much water can the kettle hold at most?",
        "How do you descale the kettle?",
        "How long does the warranty last?",
    ],
    "history": [
        "When was the bridge opened?",
        "Why did the engineer choose an arch design?",
        "What does the bridge carry today?",
    ],
}
CHAT = [
    "I am planning a trip to Lisbon in May. What should I pack?",
    "Which neighbourhoods are good to stay in?",
    "And what food should I try there?",
]
GUIDE = (
    "You are a helpful travel assistant. Notes for Lisbon: the city is built on seven hills, so comfortable shoes "
    "matter more than anything else in a suitcase. May is mild, around 22 degrees by day and 14 at night, with "
    "occasional rain. Alfama is the oldest quarter, with narrow lanes and fado bars; Baixa and Chiado are central "
    "and flat; Principe Real is quiet, with gardens and small shops. Tram 28 crosses the old town but is crowded "
    "by mid-morning. Pasteis de nata are the custard tarts of Belem; grilled sardines are a June tradition; "
    "bacalhau, salted cod, is cooked in hundreds of ways. Most museums close on Mondays. "
) * 2


def main(args: argparse.Namespace | None = None) -> int:
    out = Path(getattr(args, "out", None) or ".")
    options = UpOptions(port=free_port(), http_port=0, cpu_bytes="24MiB", redis_bytes="1GiB")
    print("starting dkv (store, Redis when installed, prefill and decode workers, gateway) ...", flush=True)
    with Cluster(options) as cluster, DkvClient(cluster.gateway) as client:
        print(f"dkv is up: gateway at {cluster.gateway}")
        rows = []
        jobs = [(name, q) for name in DOCUMENTS for q in QUESTIONS[name]]
        for name, question in tqdm(jobs, desc="documents", unit="question"):
            rows.append(_ask(client, name, DOCUMENTS[name], question))
        history = GUIDE  # each turn's context extends the previous one: its first chunks are reused
        for turn, question in enumerate(tqdm(CHAT, desc="chat", unit="turn"), start=1):
            row = _ask(client, f"chat turn {turn}", history, question)
            rows.append(row)
            history += f"\n\nUser: {question}\nAssistant: {row['answer']}"
        with StoreClient(cluster.addresses["store"]) as store:
            stats = store.stats()
    _print_table(rows)
    print(
        "\nstore tiers: "
        + ", ".join(
            f"{t.name}: {t.entries} entries, {t.used_bytes / 2**20:.1f} MiB of {t.capacity_bytes / 2**20:.0f} MiB"
            for t in stats.tiers
        )
    )
    print(
        f"store counters: hits {stats.hits}, misses {stats.misses}, demotions {stats.demotions}, "
        f"evictions {stats.evictions}, promotions {stats.promotions}"
    )
    misses = [r["ttft_ms"] for r in rows if not r["hit"]]
    hits = [r["ttft_ms"] for r in rows if r["hit"]]
    if misses and hits:
        print(
            f"time to first token: miss median {statistics.median(misses):.0f} ms, hit median "
            f"{statistics.median(hits):.0f} ms ({statistics.median(misses) / statistics.median(hits):.1f}x faster)"
        )
    plot = _plot(rows, out / "dkv-demo-ttft.png")
    print(f"plot written to {plot}")
    return 0


def _ask(client: DkvClient, name: str, context: str, question: str) -> dict:
    started = time.perf_counter()
    try:
        answer, stats = client.ask(context, question, chat_template=True, recipe=DEFAULT_RECIPE, max_new_tokens=40)
    except grpc.RpcError as e:
        return {"context": name, "question": question, "hit": False, "ttft_ms": 0.0, "answer": f"error: {e.details()}"}
    return {
        "context": name,
        "question": question,
        "hit": stats.cache_hit,
        "cached": stats.cached_prefix_tokens,
        "prefilled": stats.prefilled_tokens,
        "ttft_ms": stats.ttft_ms,
        "tok_s": stats.tokens_per_second,
        "ratio": stats.compression_ratio,
        "tiers": dict(stats.bytes_fetched_by_tier),
        "total_s": time.perf_counter() - started,
        "answer": answer.strip().replace("\n", " "),
    }


def _print_table(rows: list[dict]) -> None:
    print()
    header = (
        f"{'context':<13} {'cache':<5} {'cached':>6} {'prefill':>7} {'ttft ms':>8} {'tok/s':>6} {'ratio':>5}  "
        f"{'bytes read by tier':<24} answer"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tiers = ", ".join(f"{t} {b / 2**20:.1f}M" for t, b in sorted(r.get("tiers", {}).items()))
        print(
            f"{r['context']:<13} {'hit' if r['hit'] else 'miss':<5} {r.get('cached', 0):>6} {r.get('prefilled', 0):>7} "
            f"{r['ttft_ms']:>8.0f} {r.get('tok_s', 0):>6.1f} {r.get('ratio', 0):>5.1f}  {tiers:<24} "
            f"{r['answer'][:60]}"
        )


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for hit, color in ((False, "tab:red"), (True, "tab:green")):
        xs = [i for i, r in enumerate(rows) if r["hit"] == hit]
        ax.bar(xs, [rows[i]["ttft_ms"] for i in xs], color=color, label="hit" if hit else "miss (prefill)")
    ax.set_xticks(range(len(rows)), [r["context"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title("dkv demo: time to first token, cache miss vs hit (SmolLM2-135M, CPU)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
