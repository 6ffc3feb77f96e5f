"""The KV store as the workers reach it: the ``RemoteStore`` protocol and its replies.

The workers (the prefill worker, the gateway) are handed a store; they never import the gRPC
client that implements this (``services.shards.ShardedStoreClient``, over one shard or several,
which ``services.shards.open_store`` returns), so the layers stay one way. A failure
of the store itself raises ``grpc.RpcError`` with its status; a miss is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dkv.kvstore.entry import CompressedKV, EntryKey, Recipe


@dataclass
class PutReply:
    key: EntryKey
    stored_bytes: int
    tier: str
    replaced: bool


@dataclass
class LookupReply:
    keys: list[EntryKey]  # in order; one for a whole-context recipe, one per chunk for a chunked one
    cached_tokens: int
    tiers: list[str]
    stored_bytes: list[int]
    importance: list[float]
    kept_tokens_per_layer: list[int]


class RemoteStore(Protocol):
    def lookup(
        self, model_fingerprint: str, recipe: Recipe, token_ids: Sequence[int], tenant: str = "default"
    ) -> LookupReply | None:
        """The entries of the longest cached prefix of ``token_ids``, or None."""
        ...

    def lookup_keys(self, keys: Sequence[EntryKey], chunk_size: int, context_tokens: int) -> LookupReply | None:
        """``lookup`` by the context's chunk keys, already made (``kvstore.prefix.chunk_keys``): the
        entries of the longest prefix of a context of ``context_tokens`` tokens they cover, or None."""
        ...

    def get(self, key: EntryKey | str) -> CompressedKV | None: ...

    def put(self, entry: CompressedKV) -> PutReply: ...
