"""Chaos soak: kill and restart Redis, the store and the workers under load; every answer checked.

    python -m dkv.loadtest.soak --duration 600 --faults redis,store,decode,prefill

Starts the system (``services.up.Cluster``), asks each prompt once before any fault to learn its
golden answer (the cold-miss path, which the golden tests prove equal to a run without the
store), then for ``--duration`` seconds keeps ``--clients`` clients asking random prompts while a
fault thread kills a random component (SIGKILL, as a crash) every ``--interval`` seconds and
restarts it on the same port. A request may fail while a worker is down (UNAVAILABLE); it must
never return a different answer. Prints a JSON report and exits 1 on any wrong answer, any fault
the system did not recover from (no correct answer within ``--recovery-s`` of the restart), or
any failed request while nothing but the cache layer (Redis, the store) was down: the store is a
cache, and requests are answered without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from dkv.services.client import DkvClient
from dkv.services.logs import setup_logging
from dkv.services.transport import free_port
from dkv.services.up import Cluster, UpOptions

log = logging.getLogger("dkv.soak")
FAULTS = ("redis", "store", "decode", "prefill")
CACHE_LAYER = ("redis", "store")  # while only these are down, every request must still be answered
QUESTIONS = ("What is this text about?", "Name one detail the text gives.")
DOCUMENTS = (
    "The lighthouse on Skerry Point was built in 1871 by the engineer Thomas Pell. Its lamp burned whale oil until "
    "1904, when the keepers switched to kerosene. The last keeper, Ada Rowe, left in 1962. " * 6,
    "Mara kept bees on the hill above Tollan. Each spring she carried the hives down to the orchards, and each "
    "autumn she sold the honey in the market by the river. Her brother Ivo mended the boats. " * 6,
    "The night train from Graz to Split leaves at 21:40 and stops in Maribor, Zagreb and Knin. The dining car closes "
    "at midnight; breakfast is served from 6:30 in the sleeper cars. Bicycles travel in the last carriage. " * 6,
)


@dataclass
class Report:
    duration_s: float = 0.0
    requests: int = 0
    correct: int = 0
    wrong: int = 0
    failed: Counter = field(default_factory=Counter)  # by status code
    failed_during: Counter = field(default_factory=Counter)  # by the fault in progress ("none": no fault)
    faults: Counter = field(default_factory=Counter)  # injected, by component
    recovered: int = 0
    recovery_s: list[float] = field(default_factory=list)  # restart -> first correct answer
    unrecovered: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "duration_s": round(self.duration_s, 1),
            "requests": self.requests,
            "correct": self.correct,
            "wrong_answers": self.wrong,
            "failed_by_code": dict(self.failed),
            "failed_during_fault": dict(self.failed_during),
            "faults_injected": dict(self.faults),
            "faults_recovered": self.recovered,
            "unrecovered": self.unrecovered,
            "max_recovery_s": round(max(self.recovery_s, default=0.0), 2),
            "mean_recovery_s": round(sum(self.recovery_s) / len(self.recovery_s), 2) if self.recovery_s else 0.0,
        }


class Soak:
    def __init__(self, cluster: Cluster, prompts: list[tuple[str, str]], args: argparse.Namespace):
        self.cluster, self.prompts, self.args = cluster, prompts, args
        self.golden: dict[int, str] = {}
        self.report = Report()
        self.lock = threading.Lock()
        self.last_correct = 0.0
        self.active = "none"  # the component down or recovering, from its kill to the first correct answer
        self.stop = threading.Event()  # clients stop
        self.stop_faults = threading.Event()  # no new fault (the one in progress runs to its recovery)

    def ask(self, client: DkvClient, i: int) -> str:
        context, query = self.prompts[i]
        text, _ = client.ask(context, query, chat_template=True, max_new_tokens=self.args.max_new_tokens)
        return text

    def learn_golden(self) -> None:
        with DkvClient(self.cluster.gateway, timeout_s=120) as client:
            for i in tqdm(range(len(self.prompts)), desc="golden answers", unit="prompt"):
                self.golden[i] = self.ask(client, i)

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with DkvClient(self.cluster.gateway, timeout_s=self.args.request_timeout_s) as client:
            while not self.stop.is_set():
                i = rng.randrange(len(self.prompts))
                try:
                    text = self.ask(client, i)
                except grpc.RpcError as e:
                    with self.lock:
                        self.report.requests += 1
                        self.report.failed[e.code().name] += 1
                        self.report.failed_during[self.active] += 1
                    time.sleep(1.0)
                    continue
                with self.lock:
                    self.report.requests += 1
                    if text == self.golden[i]:
                        self.report.correct += 1
                        self.last_correct = time.monotonic()
                    else:
                        self.report.wrong += 1
                        log.error("WRONG answer for prompt %d: %r != golden %r", i, text, self.golden[i])

    def fault_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop_faults.wait(self.args.interval):
            name = rng.choice(self.args.faults)
            log.warning("fault: killing %s", name)
            self.active = name
            self.cluster.kill(name)
            time.sleep(rng.uniform(0.5, 3.0))  # down for a while, under load
            self.cluster.restart(name)
            restarted = time.monotonic()
            with self.lock:
                self.report.faults[name] += 1
            while time.monotonic() - restarted < self.args.recovery_s:
                if self.last_correct > restarted:
                    with self.lock:
                        self.report.recovered += 1
                        self.report.recovery_s.append(self.last_correct - restarted)
                    log.info("recovered from %s in %.1f s", name, self.last_correct - restarted)
                    self.active = "none"
                    break
                time.sleep(0.1)
            else:
                self.report.unrecovered.append(name)
                self.active = "none"

    def run(self) -> Report:
        self.learn_golden()
        started = time.monotonic()
        clients = [
            threading.Thread(target=self.client_loop, args=(self.args.seed + c,), daemon=True)
            for c in range(self.args.clients)
        ]
        faults = threading.Thread(target=self.fault_loop, args=(self.args.seed,), daemon=True)
        for t in (*clients, faults):
            t.start()
        with tqdm(total=int(self.args.duration), desc="soak", unit="s") as bar:
            while time.monotonic() - started < self.args.duration:
                time.sleep(1)
                bar.update(1)
                bar.set_postfix(
                    requests=self.report.requests, wrong=self.report.wrong, faults=sum(self.report.faults.values())
                )
        self.stop_faults.set()
        faults.join(self.args.recovery_s + 600)  # the fault in progress: restarted and recovered (or not)
        self.stop.set()
        for t in clients:
            t.join(self.args.request_timeout_s + 10)
        self.report.duration_s = time.monotonic() - started
        return self.report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dkv.loadtest.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=600, help="seconds of load and faults (default 600)")
    p.add_argument("--interval", type=float, default=20, help="seconds between faults (default 20)")
    p.add_argument(
        "--faults",
        type=lambda s: s.split(","),
        default=list(FAULTS),
        help=f"components to kill, comma-separated (default {','.join(FAULTS)})",
    )
    p.add_argument("--clients", type=int, default=2, help="concurrent clients (default 2)")
    p.add_argument("--documents", type=int, default=3, help="documents asked about (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--request-timeout-s", type=float, default=60)
    p.add_argument(
        "--recovery-s",
        type=float,
        default=120,
        help="a fault counts as unrecovered without a correct answer this long after the restart",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        print(f"unknown faults {sorted(unknown)}; use some of {','.join(FAULTS)}", file=sys.stderr)
        return 2
    setup_logging("info", "text")
    prompts = [(doc, q) for doc in DOCUMENTS[: args.documents] for q in QUESTIONS]
    # a small host tier, so entries live in Redis too and a store restart finds them there
    with Cluster(UpOptions(port=free_port(), http_port=0, cpu_bytes="48MiB", redis_bytes="1GiB")) as cluster:
        if cluster.redis is None and "redis" in args.faults:
            args.faults.remove("redis")
        report = Soak(cluster, prompts, args).run().as_dict()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed_without_cause = {k: v for k, v in report["failed_during_fault"].items() if k in CACHE_LAYER + ("none",)}
    return 1 if report["wrong_answers"] or report["unrecovered"] or failed_without_cause else 0


if __name__ == "__main__":
    sys.exit(main())
