"""Redis Cluster failover under load: entries written and read back while a master is killed.

    python -m dkv.loadtest.failover --before 5 --after 10 --json build/failover.json

Starts a local Redis Cluster (3 masters with a replica each, ``services.redis_server.LocalRedisCluster``)
and a store whose only tier is that cluster (``redis_cluster``). ``--writers`` threads put new
entries as fast as they can and ``--readers`` threads read back a random entry written before
every 5 ms each, every read checked byte for byte against what was put. After ``--before`` seconds the master serving the most entries
is SIGKILLed; its replica takes its slots over. The load goes on for ``--after`` seconds, then
every entry written before the kill is read back once more. Prints a JSON report and exits 1 on a
wrong byte, a miss before the kill, or a miss after the failover of an entry that is still there.

Reads of the killed master's slots are misses from the kill until the failover is over (the
store serves the other tiers meanwhile; here there are none). Redis replicates asynchronously, so
an entry written in the last instant before the kill may be lost with its master: it counts in
``lost_in_failover``, a miss, never wrong bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass

from redis.crc import key_slot

from dkv.kvstore import codec
from dkv.kvstore.errors import CorruptEntry, EntryNotFound, KVStoreError
from dkv.services.redis_server import LocalRedisCluster
from dkv.services.settings import StoreSettings
from dkv.services.store_server import build_store
from dkv.testing import synthetic_entry

log = logging.getLogger("dkv.failover")


@dataclass
class Report:
    entries_written: int = 0  # puts the store acknowledged, during the whole run
    written_before_kill: int = 0
    read_back_after_failover: int = 0  # of those, read back (exact bytes) once the load stopped
    lost_in_failover: int = 0  # of those, gone: written too late to reach the replica
    wrong_bytes: int = 0  # reads that returned other bytes than were put (must be 0)
    corrupt: int = 0  # reads the store refused as corrupt (a checksum or MAC failed)
    reads: int = 0
    misses_before_kill: int = 0  # must be 0
    misses_during_failover: int = 0  # between the kill and the first read served from the failed slots
    misses_during_failover_on_other_masters: int = 0  # of those, of entries on the masters still up
    misses_after_failover: int = 0  # of entries still there (must be 0)
    failed_puts: int = 0
    failover_s: float = 0.0  # kill -> the cluster names a new master for the killed master's slots
    recovery_s: float = 0.0  # kill -> the store reads the failed slots again
    killed_master_held_bookkeeping: bool = False  # the store's index lived on the killed master

    @property
    def ok(self) -> bool:
        return not (self.wrong_bytes or self.corrupt or self.misses_before_kill or self.misses_after_failover)


def run(
    before_s: float = 3.0,
    after_s: float = 8.0,
    writers: int = 2,
    readers: int = 2,
    seq_len: int = 64,
    node_timeout_ms: int = 1000,
    read_interval_s: float = 0.005,
) -> Report:
    report = Report()
    with LocalRedisCluster(node_timeout_ms=node_timeout_ms) as cluster:
        store = build_store(
            StoreSettings(
                cpu_bytes=0, redis_url=cluster.url, redis_cluster=True, redis_bytes=1 << 40, cluster_secret="failover"
            )
        )
        tier = store.tiers[-1].tier

        def slot_of(key) -> int:
            return key_slot(tier._manifest_key(key).encode())  # the slot of every key of the entry

        expected: dict = {}  # key -> frames (bytes) of every acknowledged put
        written: list = []  # (time acknowledged, key)
        reads: list = []  # (started, ended, key, outcome): "hit", "miss", "wrong", "corrupt"
        lock = threading.Lock()
        stop = threading.Event()
        seeds = iter(range(1 << 30))

        def write() -> None:
            while not stop.is_set():
                with lock:
                    seed = next(seeds)
                frames = [bytes(f) for f in codec.encode(synthetic_entry(seq_len=seq_len, num_layers=2, seed=seed))]
                try:
                    key = store.put(frames).key
                except KVStoreError:
                    with lock:
                        report.failed_puts += 1
                    time.sleep(0.01)
                    continue
                with lock:
                    expected[key] = frames
                    written.append((time.monotonic(), key))

        def read_one(key) -> str:
            try:
                got = [bytes(f) for f in store.get(key).frames]
            except EntryNotFound:
                return "miss"
            except CorruptEntry:
                return "corrupt"
            return "hit" if got == expected[key] else "wrong"

        def read() -> None:
            rng = random.Random()
            while not stop.is_set():
                time.sleep(read_interval_s)  # a steady rate: a miss answered at once must not flood the count
                with lock:
                    key = rng.choice(written)[1] if written else None
                if key is None:
                    continue
                started = time.monotonic()
                outcome = read_one(key)
                with lock:
                    reads.append((started, time.monotonic(), key, outcome))

        threads = [threading.Thread(target=f, daemon=True) for f in [write] * writers + [read] * readers]
        for t in threads:
            t.start()
        time.sleep(before_s)
        slots = {master: cluster.slots(master) for master in cluster.master_nodes()}
        with lock:
            held = {
                master: sum(any(lo <= slot_of(key) <= hi for lo, hi in ranges) for _, key in written)
                for master, ranges in slots.items()
            }
        victim = max(held, key=held.get)
        failed = slots[victim]
        report.killed_master_held_bookkeeping = cluster.master_of_slot(key_slot(tier._index_key.encode())) is victim
        killed_at = time.monotonic()
        victim.kill()
        log.info("killed master %s (slots %s)", victim, failed)
        deadline = killed_at + 60
        while cluster.master_of_slot(failed[0][0], missing_ok=True) in (None, victim):
            if time.monotonic() > deadline:
                raise TimeoutError("no replica took over the killed master's slots within 60 s")
            time.sleep(0.05)
        report.failover_s = time.monotonic() - killed_at
        time.sleep(after_s)
        stop.set()
        for t in threads:
            t.join(30)

        def on_failed_slots(key) -> bool:
            slot = slot_of(key)
            return any(lo <= slot <= hi for lo, hi in failed)

        before = [key for t, key in written if t < killed_at]
        final = {key: read_one(key) for key in before}
        lost = {key for key, outcome in final.items() if outcome == "miss"}
        recovered_at = min(
            (
                started
                for started, _, key, outcome in reads
                if started > killed_at and outcome == "hit" and on_failed_slots(key)
            ),
            default=None,
        )
        report.entries_written = len(written)
        report.written_before_kill = len(before)
        report.read_back_after_failover = sum(outcome == "hit" for outcome in final.values())
        report.lost_in_failover = len(lost)
        report.reads = len(reads) + len(final)
        report.wrong_bytes = sum(r[3] == "wrong" for r in reads) + sum(o == "wrong" for o in final.values())
        report.corrupt = sum(r[3] == "corrupt" for r in reads) + sum(o == "corrupt" for o in final.values())
        report.recovery_s = (recovered_at - killed_at) if recovered_at is not None else float("inf")
        for started, ended, key, outcome in reads:
            if outcome != "miss":
                continue
            if ended < killed_at:
                report.misses_before_kill += 1
            elif recovered_at is None or started <= recovered_at:
                report.misses_during_failover += 1
                report.misses_during_failover_on_other_masters += not on_failed_slots(key)
            elif key not in lost:
                report.misses_after_failover += 1
        store.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=float, default=5.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after the failover")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--node-timeout-ms", type=int, default=1000, help="cluster-node-timeout of every node")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.before, args.after, args.writers, args.readers, node_timeout_ms=args.node_timeout_ms)
    text = json.dumps(asdict(report) | {"ok": report.ok}, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
