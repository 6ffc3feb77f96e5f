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
computes the prompt's chunk keys here, and ``lookup_keys`` (which a caller that made the keys
already, the prefill worker's ``PrefillPlan``, calls directly) asks each shard which of its keys it
holds (``Probe``, one call per shard, in parallel) and finds the longest prefix those entries cover
(``kvstore.prefix.longest_chain``). A shard that cannot be reached counts as holding nothing, after
the second-ranked shards were asked: its entries are misses (recomputed), never wrong.

``open_store`` gives a ``ShardedStoreClient`` for every address, one shard included, so the workers
find prefixes one way whatever the number of shards. The store's own ``Lookup`` RPC (one call that
hashes the tokens on the server) stays for thin clients: ``StoreClient.lookup``.
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
from dkv.kvstore.prefix import chunk_keys, longest_chain
from dkv.kvstore.remote import LookupReply, PutReply
from dkv.services.pb import store_pb2
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


def open_store(address: str, timeout_s: float = 30.0, security: Security | None = None) -> ShardedStoreClient:
    """The store at ``address``: one ``host:port``, a comma-separated list of shards, or
    ``dns:///NAME:PORT`` (the shards NAME resolves to, now and every ``REFRESH_S``). One address is a
    one-shard client, so callers find prefixes one way however many shards there are."""
    if address.strip().startswith(DNS):
        target = address.strip()
        return ShardedStoreClient(lambda: resolve_shards(target), timeout_s=timeout_s, security=security)
    return ShardedStoreClient(shard_addresses(address), timeout_s=timeout_s, security=security)


class ShardedStoreClient:
    """``StoreClient``'s methods over one shard or several; each key goes to the shard that owns it.
    ``lookup`` and ``lookup_keys`` probe the shards (see the module docstring) instead of calling the
    store's Lookup RPC; ``stats`` sums the shards' numbers.

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
    def address(self) -> str:
        """The shards' addresses, comma-separated (what the servers log)."""
        return ",".join(self._members[0])

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

    def stats(self) -> store_pb2.StatsResponse:
        """The store's numbers: one shard's own, or the sums over every shard (``merge_stats``);
        a shard that cannot be reached fails the call (its numbers are unknown, not zero)."""
        replies = list(self._pool.map(lambda client: client.stats(), self._current()[1]))
        return replies[0] if len(replies) == 1 else merge_stats(replies)

    def probe(self, keys: Sequence[EntryKey | str]) -> list[store_pb2.ProbedEntry]:
        """Whether the store holds each of ``keys`` (and where each one starts), in order; each key is
        asked of its owner. A key whose shards cannot be reached is absent (``present`` False); when no
        shard answers, the call raises the store's error."""
        found = self._probe_all(keys)
        return [found.get(key) or store_pb2.ProbedEntry(key=str(key), present=False) for key in keys]

    def lookup(
        self, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int], tenant: str = DEFAULT_TENANT
    ) -> LookupReply | None:
        """The longest cached prefix of ``token_ids``, its chunk entries gathered from their shards."""
        keys = chunk_keys(token_ids, recipe, model_fingerprint, tenant or DEFAULT_TENANT)
        return self.lookup_keys(keys, recipe.chunk_size, len(token_ids))

    def lookup_keys(self, keys: Sequence[EntryKey], chunk_size: int, context_tokens: int) -> LookupReply | None:
        """The longest prefix of a context of ``context_tokens`` tokens whose chunk ``keys`` (made by
        ``kvstore.prefix.chunk_keys``) the shards hold, or None: one Probe per shard, in parallel."""
        found = self._probe_all(keys)
        starts = [found[key].start if key in found else None for key in keys]
        chain = longest_chain(keys, starts, chunk_size, context_tokens)
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

    def _probe_all(self, keys: Sequence[EntryKey | str]) -> dict:
        """``key -> ProbedEntry`` of the keys their shards hold, one Probe per shard in parallel; the
        keys of a shard that is UNAVAILABLE are asked of the shards that rank second for them. When
        no shard answers, the store is unreachable: its error is raised (what the caller of a
        one-shard store expects and counts as the store being down), not a miss."""
        addresses, clients = self._current()
        by_shard: dict[int, list[EntryKey | str]] = {}
        for key in keys:
            by_shard.setdefault(owner(key, addresses), []).append(key)
        found, failed = self._probe_shards(by_shard, addresses, clients)
        answered = len(by_shard) > len(failed)
        down = {i for i, e in failed.items() if e.code() == grpc.StatusCode.UNAVAILABLE}
        if down and len(down) < len(addresses):  # a shard left to ask
            again: dict[int, list[EntryKey | str]] = {}
            for shard in down:
                for key in by_shard[shard]:
                    again.setdefault(next(i for i in ranked(key, addresses) if i not in down), []).append(key)
            found_again, failed_again = self._probe_shards(again, addresses, clients)
            found.update(found_again)
            answered = answered or len(again) > len(failed_again)
            failed.update(failed_again)
        if failed and not answered:
            raise next(iter(failed.values()))
        return found

    def _probe_shards(
        self, by_shard: dict[int, list[EntryKey | str]], addresses, clients
    ) -> tuple[dict, dict[int, grpc.RpcError]]:
        """(``key -> ProbedEntry`` of the keys held, the error of each shard that was unreachable)."""
        probes = {i: self._pool.submit(clients[i].probe, shard_keys) for i, shard_keys in by_shard.items()}
        found, failed = {}, {}
        for i, probe in probes.items():
            try:
                probed = probe.result()
            except grpc.RpcError as e:
                if e.code() not in UNREACHABLE:
                    raise
                log.warning(
                    "store shard %s unreachable during a lookup (%s)",
                    addresses[i],
                    e.code().name,
                )
                failed[i] = e
                continue
            found.update({key: p for key, p in zip(by_shard[i], probed) if p.present})
        return found, failed


def merge_stats(replies: Sequence[store_pb2.StatsResponse]) -> store_pb2.StatsResponse:
    """One ``StatsResponse`` for several shards: every count and byte figure is the sum of the
    shards' (a tier's by its name, a tenant's by its name), and a tier is healthy when it is on
    every shard. Each shard counts only its own entries, also in a shared Redis, so the sums add
    up; ``capacity_bytes`` of a shared Redis is the sum of what each shard was given of it."""
    merged = store_pb2.StatsResponse(tenant=replies[0].tenant)
    _sum_fields(merged, replies)
    tiers: dict[str, list[store_pb2.TierStats]] = {}
    for reply in replies:
        for tier in reply.tiers:
            tiers.setdefault(tier.name, []).append(tier)
    for name, same in tiers.items():
        _sum_fields(merged.tiers.add(name=name), same)
    tenants: dict[str, list[store_pb2.StatsResponse]] = {}
    for reply in replies:
        for tenant in reply.tenants:
            tenants.setdefault(tenant.tenant, []).append(tenant)
    merged.tenants.extend(merge_stats(same) for same in tenants.values())
    return merged


def _sum_fields(into, messages) -> None:
    """Sets each number of ``into`` to the sum over ``messages``, each flag to all of them (the
    repeated fields are messages, merged by the caller)."""
    for field in into.DESCRIPTOR.fields:
        if field.type == field.TYPE_UINT64:
            setattr(into, field.name, sum(getattr(m, field.name) for m in messages))
        elif field.type == field.TYPE_BOOL:
            setattr(into, field.name, all(getattr(m, field.name) for m in messages))
