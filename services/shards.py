"""Several store shards behind one client: every entry lives on the shard its key picks.

A shard is one ``dkv store serve`` with its own tiers. The owner of an entry is chosen by
rendezvous (highest random weight) hashing of its key ``tenant/model/recipe/prefix_hash`` over
the shard addresses, so every client that lists the same addresses finds the same owner without
asking anyone, and adding or removing a shard moves only the keys that shard wins or loses.

A prompt's chunk entries (chunked recipes) land on different shards. ``lookup`` therefore
computes the prompt's chunk keys here, asks each shard which of its keys it holds (``Probe``,
one call per shard, in parallel), and finds the longest prefix those entries cover. A shard that
cannot be reached counts as holding nothing: its entries are misses (recomputed), never wrong.

``open_store("a:50052")`` is a plain ``StoreClient``; ``open_store("a:50052,b:50052")`` a
``ShardedStoreClient`` with the same methods (``stats`` is per shard: ``client.shards``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV, EntryKey, LayerKV, Recipe
from dkv.kvstore.prefix import chunk_keys, longest_chain
from dkv.services.store_client import LookupReply, LayerSummary, PutReply, StoreClient
from dkv.services.transport import DEFAULT_TENANT, Security

log = logging.getLogger("dkv.store.shards")
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def shard_addresses(address: str) -> list[str]:
    """The comma-separated addresses of ``address``, each once; at least one."""
    addresses = list(dict.fromkeys(a.strip() for a in address.split(",") if a.strip()))
    if not addresses:
        raise ValueError(f"store address {address!r} names no host:port")
    return addresses


def owner(key: EntryKey | str, shards: Sequence[str]) -> int:
    """Index of the shard that holds ``key``: the highest hash of (shard, key)."""
    text = str(key).encode()

    def weight(shard: str) -> bytes:
        return hashlib.blake2b(shard.encode() + b"\0" + text, digest_size=8).digest()

    return max(range(len(shards)), key=lambda i: weight(shards[i]))


def open_store(address: str, timeout_s: float = 30.0, security: Security | None = None):
    """A ``StoreClient`` for one address, a ``ShardedStoreClient`` for a comma-separated list."""
    addresses = shard_addresses(address)
    if len(addresses) == 1:
        return StoreClient(addresses[0], timeout_s=timeout_s, security=security)
    return ShardedStoreClient(addresses, timeout_s=timeout_s, security=security)


class ShardedStoreClient:
    """``StoreClient``'s methods over several shards; each key goes to the shard that owns it."""

    def __init__(self, addresses: Sequence[str], timeout_s: float = 30.0, security: Security | None = None):
        self.addresses = list(addresses)
        self.shards = [StoreClient(a, timeout_s=timeout_s, security=security) for a in self.addresses]
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="dkv-probe")

    def __enter__(self) -> "ShardedStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for shard in self.shards:
            shard.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        for shard in self.shards:
            shard.wait_ready(timeout_s)

    def shard_for(self, key: EntryKey | str) -> StoreClient:
        return self.shards[owner(key, self.addresses)]

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
        return self.shard_for(key).get_frames(key)

    def get(self, key: EntryKey | str) -> CompressedKV | None:
        return self.shard_for(key).get(key)

    def get_with_tier(self, key: EntryKey | str) -> tuple[CompressedKV, str, int] | None:
        return self.shard_for(key).get_with_tier(key)

    def delete(self, key: EntryKey | str) -> bool:
        return self.shard_for(key).delete(key)

    def summaries(self, key: EntryKey | str) -> list[LayerSummary] | None:
        return self.shard_for(key).summaries(key)

    def select(self, key: EntryKey | str, layer: int, pages: Sequence[int]) -> tuple[list[LayerKV], int, str] | None:
        return self.shard_for(key).select(key, layer, pages)

    def lookup(self, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int],
               tenant: str = DEFAULT_TENANT) -> LookupReply | None:
        """The longest cached prefix of ``token_ids``, its chunk entries gathered from their shards."""
        tenant = tenant or DEFAULT_TENANT
        keys = chunk_keys(token_ids, recipe, model_fingerprint, tenant)
        by_shard: dict[int, list[EntryKey]] = {}
        for key in keys:
            by_shard.setdefault(owner(key, self.addresses), []).append(key)
        probes = [self._pool.submit(self._probe, i, shard_keys) for i, shard_keys in by_shard.items()]
        found = {}
        for probe in probes:
            found.update(probe.result())
        chain = longest_chain(keys, len(token_ids), recipe.chunk_size,
                              lambda key: found[key].start if key in found else None)
        if chain is None:
            return None
        chain_keys, tokens = chain
        entries = [found[k] for k in chain_keys]
        kept = [sum(layer) for layer in zip(*(e.kept_tokens_per_layer for e in entries))]
        return LookupReply(chain_keys, tokens, [e.tier for e in entries], [e.stored_bytes for e in entries],
                           [e.importance for e in entries], kept)

    def _probe(self, shard: int, keys: list[EntryKey]) -> dict:
        """``key -> ProbedEntry`` of the keys ``shard`` holds; none when it cannot be reached."""
        try:
            probed = self.shards[shard].probe(keys)
        except grpc.RpcError as e:
            if e.code() not in UNREACHABLE:
                raise
            log.warning("store shard %s unreachable during a lookup (%s): its entries count as misses",
                        self.addresses[shard], e.code().name)
            return {}
        return {key: p for key, p in zip(keys, probed) if p.present}
