"""The Python client of dkv: ``DkvClient(address).generate(context, query)`` and store access.

    from dkv.services.client import DkvClient

    with DkvClient("127.0.0.1:50051") as dkv:
        for item in dkv.generate(document, "Who signed the treaty?", chat_template=True):
            if isinstance(item, str):
                print(item, end="", flush=True)   # text as it comes
            else:
                print(item.ttft_ms, item.cache_hit)  # GenerateStats, last

Clients that bring their own KV caches use ``dkv.store(address)``: what ``services.shards.open_store``
gives, a ``ShardedStoreClient`` over one address or several (comma-separated, or ``dns:///``), with
the same token and TLS.

``DkvClient`` is also ``dkv.Client``. This module imports neither torch nor anything of the
server side, so it works with the light install (``pip install dkv``); ``store()`` moves tensors
and needs torch (``pip install 'dkv[server]'``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from dkv.kvstore.recipe import Recipe
from dkv.services.pb import gateway_pb2, gateway_pb2_grpc
from dkv.services.transport import Security, call_metadata, open_channel
from dkv.services.wire import recipe_to_proto

if TYPE_CHECKING:
    from dkv.services.shards import ShardedStoreClient


class DkvClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout_s: float = 600.0,
        *,
        token: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ):
        """``token``: the bearer token when the gateway asks for one; ``tls_ca``: the CA that signed
        the gateway's certificate (TLS on); ``tls_cert``/``tls_key``: this client's, for mutual TLS."""
        self.address, self.timeout_s = address, timeout_s
        self.security = Security(token, tls_ca, tls_cert, tls_key)
        self.channel = open_channel(address, self.security)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def __enter__(self) -> DkvClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(
        self,
        context: str | Sequence[int],
        query: str | Sequence[int],
        *,
        chat_template: bool = False,
        recipe: Recipe | None = None,
        selection: str = "dense",
        budget: int = 0,
        budget_fraction: float = 0.0,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        tenant: str = "",
        ignore_eos: bool = False,
    ) -> Iterator[str | gateway_pb2.GenerateStats]:
        """Yield the generated text piece by piece, then the ``GenerateStats``.

        ``context``/``query`` are texts or token ids. ``recipe`` defaults to the gateway's (chunked
        SnapKV keeping half of the tokens). ``ignore_eos``: generate exactly ``max_new_tokens``
        (benchmarks). Raises ``grpc.RpcError`` with the server's status.
        """
        request = gateway_pb2.GenerateRequest(
            chat_template=chat_template,
            selection=selection,
            budget=budget,
            budget_fraction=budget_fraction,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            tenant=tenant,
            ignore_eos=ignore_eos,
        )
        if isinstance(context, str):
            request.context_text = context
        else:
            request.context_ids.ids.extend(context)
        if isinstance(query, str):
            request.query_text = query
        else:
            request.query_ids.ids.extend(query)
        if recipe is not None:
            request.recipe.CopyFrom(recipe_to_proto(recipe))
        for reply in self.stub.Generate(request, timeout=self.timeout_s, metadata=call_metadata(self.security)):
            if reply.HasField("token"):
                yield reply.token.text
            else:
                yield reply.stats

    def ask(self, context, query, **kwargs) -> tuple[str, gateway_pb2.GenerateStats]:
        """The whole answer and its stats."""
        pieces, stats = [], None
        for item in self.generate(context, query, **kwargs):
            if isinstance(item, str):
                pieces.append(item)
            else:
                stats = item
        return "".join(pieces), stats

    def store(self, address: str = "127.0.0.1:50052", timeout_s: float = 60.0) -> ShardedStoreClient:
        """Direct access to a KV store (or its shards: comma-separated addresses) with this client's
        token and TLS, for clients that bring their own KV caches: ``open_store(address)``, one shard
        or several. Its ``lookup`` makes the chunk keys here, so name your tenant (a tenant's token
        may act only for its own; an empty tenant is ``default``)."""
        from dkv.services.shards import open_store

        return open_store(address, timeout_s=timeout_s, security=self.security)
