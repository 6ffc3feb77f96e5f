"""Several store shards behind one client: every entry lives on the shard its key picks.

A shard is one ``dkv store serve`` with its own tiers. The owner of an entry is chosen by
rendezvous (highest random weight) hashing of its key ``tenant/model/recipe/prefix_hash`` over
the shard addresses, so every client that lists the same addresses finds the same owner without
asking anyone, and adding or removing a shard moves only the keys that shard wins or loses.

Membership. ``open_store("a:50052,b:50052")`` names the shards once. ``open_store("dns:///NAME:PORT")``
takes them from DNS: every address NAME resolves to (the ready pods of a Kubernetes headless
Service), looked up again every ``refresh_s``, so shards come and go without restarting clients. A
pod address is written as the pod's own DNS name when it has one (a StatefulSet pod:
``dkv-store-0.dkv-store-headless.ns.svc.cluster.local``), which a restarted pod keeps, so its keys
stay with it.

A lost shard. Reads of a key whose owner answers UNAVAILABLE go to the shard that ranks second for
that key, which is where the key goes once the owner leaves the membership. That shard has no
index entry for it, so it looks in its last tier: with a shared last tier (Redis Cluster), it finds
and serves the entries the lost shard had demoted there, instead of having them recomputed; only
what the lost shard held in its memory tiers is gone. Puts go to the owner only: while it is
unreachable they fail (UNAVAILABLE).

A prompt's chunk entries (chunked recipes) land on different shards. ``lookup`` therefore
computes the prompt's chunk keys here, asks each shard which of its keys it holds (``Probe``,
one call per shard, in parallel), and finds the longest prefix those entries cover. A shard that
cannot be reached counts as holding nothing, after the second-ranked shards were asked: its
entries are misses (recomputed), never wrong.

``open_store("a:50052")`` is a plain ``StoreClient``; otherwise a ``ShardedStoreClient`` with the same
methods (``stats`` is per shard: ``client.shards``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV, EntryKey, LayerKV, Recipe
from dkv.kvstore.prefix import longest_cached_prefix
from dkv.kvstore.remote import LookupReply, PutReply
from dkv.services.store_client import LayerSummary, StoreClient
from dkv.services.transport import DEFAULT_TENANT, Security

log = logging.getLogger("dkv.store.shards")
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
DNS = "dns:///"
# how often a dns:/// membership is looked up again: Kubernetes takes a few seconds to drop a pod that
# stopped being ready from its Service anyway
REFRESH_S = 10.0
PROBE_THREADS = 16


class NoShards(grpc.RpcError):
    """No store shard is known (the membership names none yet): UNAVAILABLE, like an unreachable store."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def shard_addresses(address: str) -> list[str]:
    """The comma-separated addresses of ``address``, each once; at least one."""
    addresses = list(dict.fromkeys(a.strip() for a in address.split(",") if a.strip()))
    if not addresses:
        raise ValueError(f"store address {address!r} names no host:port")
    return addresses


def resolve_shards(target: str) -> list[str]:
    """The shards of ``dns:///NAME:PORT``: ``HOST:PORT`` for every address NAME resolves to, HOST being
    the address's own DNS name where it has one (a reverse lookup), else the address. Raises
    ``OSError`` when NAME does not resolve."""
    name, sep, port = target.removeprefix(DNS).rpartition(":")
    if not target.startswith(DNS) or not sep or not name or not port.isdigit():
        raise ValueError(f"store address {target!r} must be dns:///NAME:PORT")
    name = name.strip("[]")
    ips = sorted({info[4][0] for info in socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)})
    shards = set()
    for ip in ips:
        try:
            host = socket.gethostbyaddr(ip)[0]
        except OSError:
            host = f"[{ip}]" if ":" in ip else ip
        shards.add(f"{host}:{port}")
    return sorted(shards)


def _weight(shard: str, text: bytes) -> bytes:
    return hashlib.blake2b(shard.encode() + b"\0" + text, digest_size=8).digest()


def owner(key: EntryKey | str, shards: Sequence[str]) -> int:
    """Index of the shard that holds ``key``: the highest hash of (shard, key)."""
    text = str(key).encode()
    return max(range(len(shards)), key=lambda i: _weight(shards[i], text))


def ranked(key: EntryKey | str, shards: Sequence[str]) -> list[int]:
    """Indices of ``shards`` from the owner of ``key`` down: where the key goes as shards leave."""
    text = str(key).encode()
    return sorted(range(len(shards)), key=lambda i: _weight(shards[i], text), reverse=True)


def open_store(address: str, timeout_s: float = 30.0, security: Security | None = None):
    """A ``StoreClient`` for one address, a ``ShardedStoreClient`` for a comma-separated list or for
    ``dns:///NAME:PORT`` (the shards NAME resolves to, now and every ``REFRESH_S``)."""
    if address.strip().startswith(DNS):
        target = address.strip()
        return ShardedStoreClient(lambda: resolve_shards(target), timeout_s=timeout_s, security=security)
    addresses = shard_addresses(address)
    if len(addresses) == 1:
        return StoreClient(addresses[0], timeout_s=timeout_s, security=security)
    return ShardedStoreClient(addresses, timeout_s=timeout_s, security=security)


class ShardedStoreClient:
    """``StoreClient``'s methods over several shards; each key goes to the shard that owns it.

    ``shards``: the shard addresses, or a function that gives the current ones, called now and every
    ``refresh_s`` in a background thread (a membership that changes: ``resolve_shards``). While it
    names none (the store's pods are not ready yet), calls fail UNAVAILABLE (``NoShards``) and it is
    asked every second.
    """

    def __init__(
        self,
        shards: Sequence[str] | Callable[[], Sequence[str]],
        timeout_s: float = 30.0,
        security: Security | None = None,
        refresh_s: float = REFRESH_S,
    ):
        self.timeout_s, self.security = timeout_s, security
        self._members: tuple[list[str], list[StoreClient]] = ([], [])
        self._retired: list[StoreClient] = []  # left the membership: closed one refresh later
        self._pool = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="dkv-probe")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if callable(shards):
            self._resolve = shards
            self.refresh()
            threading.Thread(target=self._refresh_every, args=(refresh_s,), name="dkv-shards", daemon=True).start()
        else:
            self._resolve = lambda: shards
            self.refresh()
            if not self._members[0]:
                raise ValueError("a sharded store needs at least one shard address")

    def _open(self, address: str) -> StoreClient:
        return StoreClient(address, timeout_s=self.timeout_s, security=self.security)

    @property
    def addresses(self) -> list[str]:
        return list(self._members[0])

    @property
    def shards(self) -> list[StoreClient]:
        return list(self._members[1])

    # -- membership -------------------------------------------------------------------------

    def _refresh_every(self, refresh_s: float) -> None:
        while not self._stop.wait(refresh_s if self._members[0] else min(1.0, refresh_s)):
            self.refresh()

    def refresh(self) -> None:
        """Take the current shard list from the membership source; keep the last one when it fails
        or names none (every pod unready is an outage to ride out, not an empty store)."""
        try:
            addresses = list(dict.fromkeys(self._resolve()))
        except OSError as e:
            log.warning("store shards could not be looked up (%s): keeping %s", e, self.addresses)
            return
        if not addresses:
            log.warning("store shards: the membership names none: keeping %s", self.addresses)
            return
        with self._lock:
            if self._stop.is_set():
                return
            old_addresses, old_clients = self._members
            for client in self._retired:  # calls they had in flight had a refresh period to finish
                client.close()
            kept = dict(zip(old_addresses, old_clients))
            self._retired = [c for a, c in kept.items() if a not in addresses]
            self._members = (addresses, [kept.get(a) or self._open(a) for a in addresses])
        if old_addresses and addresses != old_addresses:
            log.info(
                "store shards now %s (joined %s, left %s)",
                addresses,
                sorted(set(addresses) - set(old_addresses)),
                sorted(set(old_addresses) - set(addresses)),
            )

    def __enter__(self) -> ShardedStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self._pool.shutdown(wait=False)
            for client in self._members[1] + self._retired:
                client.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        for shard in self.shards:
            shard.wait_ready(timeout_s)

    # -- calls ------------------------------------------------------------------------------

    def _current(self) -> tuple[list[str], list[StoreClient]]:
        members = self._members
        if not members[0]:
            raise NoShards(
                "no store shard is known yet: the membership (DNS) names none; is the store running and ready?"
            )
        return members

    def shard_for(self, key: EntryKey | str) -> StoreClient:
        addresses, clients = self._current()
        return clients[owner(key, addresses)]

    def _read(self, key: EntryKey | str, call):
        """``call(client)`` on the owner of ``key``, then, when the owner is UNAVAILABLE, on the shard
        that ranks second for it (see the module docstring)."""
        addresses, clients = self._current()
        order = ranked(key, addresses)
        try:
            return call(clients[order[0]])
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or len(order) < 2:
                raise
            log.warning(
                "store shard %s unavailable: asking %s, the next shard for %s",
                addresses[order[0]],
                addresses[order[1]],
                key,
            )
        return call(clients[order[1]])

    def put(self, entry: CompressedKV) -> PutReply:
        return self.shard_for(entry.key).put(entry)

    def put_frames(self, frames: Iterable[bytes]) -> PutReply:
        frames = iter(frames)
        first = next(frames, None)
        if first is None:
            raise ValueError("put_frames needs the entry's frames, header first; got none")
        key = codec.parse_header(first).key  # a broken header fails here, as the store would refuse it
        return self.shard_for(key).put_frames(itertools.chain([first], frames))

    def get_frames(self, key: EntryKey | str) -> list[memoryview] | None:
        return self._read(key, lambda shard: shard.get_frames(key))

    def get(self, key: EntryKey | str) -> CompressedKV | None:
        return self._read(key, lambda shard: shard.get(key))

    def get_with_tier(self, key: EntryKey | str) -> tuple[CompressedKV, str, int] | None:
        return self._read(key, lambda shard: shard.get_with_tier(key))

    def delete(self, key: EntryKey | str) -> bool:
        return self._read(key, lambda shard: shard.delete(key))

    def summaries(self, key: EntryKey | str) -> list[LayerSummary] | None:
        return self._read(key, lambda shard: shard.summaries(key))

    def select(self, key: EntryKey | str, layer: int, pages: Sequence[int]) -> tuple[list[LayerKV], int, str] | None:
        return self._read(key, lambda shard: shard.select(key, layer, pages))

    def lookup(
        self, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int], tenant: str = DEFAULT_TENANT
    ) -> LookupReply | None:
        """The longest cached prefix of ``token_ids``, its chunk entries gathered from their shards."""
        found = {}

        def starts_of(keys: list[EntryKey]) -> list[int | None]:
            found.update(self._probe_all(keys))
            return [found[k].start if k in found else None for k in keys]

        chain = longest_cached_prefix(token_ids, recipe, model_fingerprint, tenant or DEFAULT_TENANT, starts_of)
        if chain is None:
            return None
        chain_keys, tokens = chain
        entries = [found[k] for k in chain_keys]
        kept = [sum(layer) for layer in zip(*(e.kept_tokens_per_layer for e in entries))]
        return LookupReply(
            chain_keys,
            tokens,
            [e.tier for e in entries],
            [e.stored_bytes for e in entries],
            [e.importance for e in entries],
            kept,
        )

    def _probe_all(self, keys: list[EntryKey]) -> dict:
        """``key -> ProbedEntry`` of the keys their shards hold, one Probe per shard in parallel; the
        keys of a shard that is UNAVAILABLE are asked of the shards that rank second for them."""
        addresses, clients = self._current()
        by_shard: dict[int, list[EntryKey]] = {}
        for key in keys:
            by_shard.setdefault(owner(key, addresses), []).append(key)
        found, down = self._probe_shards(by_shard, addresses, clients)
        if down and len(addresses) > 1:
            again: dict[int, list[EntryKey]] = {}
            for shard in down:
                for key in by_shard[shard]:
                    again.setdefault(next(i for i in ranked(key, addresses) if i not in down), []).append(key)
            found.update(self._probe_shards(again, addresses, clients)[0])
        return found

    def _probe_shards(self, by_shard: dict[int, list[EntryKey]], addresses, clients) -> tuple[dict, set[int]]:
        """(``key -> ProbedEntry`` of the keys held, the shards that were UNAVAILABLE)."""
        probes = {i: self._pool.submit(clients[i].probe, shard_keys) for i, shard_keys in by_shard.items()}
        found, down = {}, set()
        for i, probe in probes.items():
            try:
                probed = probe.result()
            except grpc.RpcError as e:
                if e.code() not in UNREACHABLE:
                    raise
                log.warning(
                    "store shard %s unreachable during a lookup (%s): its entries count as misses",
                    addresses[i],
                    e.code().name,
                )
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    down.add(i)
                continue
            found.update({key: p for key, p in zip(by_shard[i], probed) if p.present})
        return found, down
