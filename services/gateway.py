"""The gateway's work: turn a Generate request into Prefill and Decode calls, and account for it.

Per request: tokenize (optionally inside the chat template, split so the context is a stable
token prefix across turns), look the context up in the store (a full hit goes straight to a
decode worker: one Lookup, no Prefill call), else have a prefill worker resolve it (it reuses the
longest cached prefix and prefills only the rest), choose a decode worker (``Router``: fewest
requests in flight, i.e. the shortest queue, then the one that last decoded this context, whose
page cache may still hold it), stream its tokens, stop at stop strings (which cancels the stream
on the worker), and report time to first token, cache use and bytes.

The store lookup needs the model's fingerprint and its uncompressed bytes per token; the gateway
runs no model, so it learns both from its first Prefill reply (until then every request goes
through prefill, and a reply with another fingerprint, after a model change, replaces them).

Workers are reached through ``Backend`` objects with one contract, the dkv.v1 Prefill and Decode
messages: ``GrpcBackend`` calls them over gRPC; ``services.ray_pool`` calls Ray actors instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from dkv.kvstore.recipe import DEFAULT_RECIPE as RECIPE
from dkv.services.pb import decode_pb2, gateway_pb2, prefill_pb2
from dkv.services.wire import recipe_from_proto, recipe_to_proto
from dkv.workers.degradation import Degradation

log = logging.getLogger("dkv.gateway")
INLINE_TEXT = 4096  # characters tokenized on the event loop; longer texts go to a thread

DEFAULT_RECIPE = recipe_to_proto(RECIPE)


@dataclass
class Worker:
    """A decode worker as the router sees it."""

    name: str
    backend: object  # has: async def decode(DecodeRequest) -> AsyncIterator[DecodeResponse]
    in_flight: int = 0
    recent: list[str] = field(default_factory=list)  # first keys of contexts it decoded lately


class Router:
    """Least loaded first; among equals, the worker that decoded this context last (locality)."""

    def __init__(self, workers: list[Worker], memory: int = 64):
        if not workers:
            raise ValueError("the gateway needs at least one decode worker")
        self.workers, self.memory = workers, memory

    def pick(self, first_key: str) -> Worker:
        return min(self.workers, key=lambda w: (w.in_flight, first_key not in w.recent))

    def remember(self, worker: Worker, first_key: str) -> None:
        if first_key in worker.recent:
            worker.recent.remove(first_key)
        worker.recent.append(first_key)
        del worker.recent[: -self.memory]


def split_chat(tokenizer, context: str, query: str) -> tuple[list[int], list[int]]:
    """Token ids of (the chat-templated text up to the end of the context, the rest).

    The context's ids do not depend on the query, so a later turn with the same context (or one
    that extends it) starts with the same tokens and finds the cached entries.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + "\n\n" + query}], tokenize=False, add_generation_prompt=True
    )
    cut = text.index(context) + len(context)
    encode = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    return encode(text[:cut]), encode(text[cut:])


class Gateway:
    def __init__(
        self, tokenizer, prefill, router: Router, max_positions: int, store=None, max_text_bytes: int = 1 << 20
    ):
        """``prefill``: a backend with ``async def prefill(PrefillRequest) -> PrefillResponse``;
        ``store``: a store client whose ``lookup`` answers full hits without prefill (None: always prefill);
        ``max_text_bytes``: the longest context + query text tokenized here."""
        self.tokenizer, self.prefill, self.router, self.max_positions = tokenizer, prefill, router, max_positions
        self.max_text_bytes = max_text_bytes
        self.store = store
        self.model_fingerprint = ""  # learnt from prefill replies
        self.degraded = Degradation()
        self.full_bytes_per_token = 0.0

    def tokens(self, request: gateway_pb2.GenerateRequest) -> tuple[list[int], list[int]]:
        """(context ids, query ids); raises ValueError for a request that cannot be served."""
        context_kind, query_kind = request.WhichOneof("context"), request.WhichOneof("query")
        if context_kind is None or query_kind is None:
            raise ValueError("a Generate request needs a context (context_text or context_ids) and a query")
        if request.chat_template:
            if context_kind != "context_text" or query_kind != "query_text":
                raise ValueError("chat_template applies to texts: send context_text and query_text")
            context, query = split_chat(self.tokenizer, request.context_text, request.query_text)
        else:
            encode = lambda t: self.tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
            context = encode(request.context_text) if context_kind == "context_text" else list(request.context_ids.ids)
            query = encode(request.query_text) if query_kind == "query_text" else list(request.query_ids.ids)
        if not context or not query:
            raise ValueError("the context and the query must each have at least one token")
        from dkv.workers.decode_worker import (
            check_decoding,  # refuse before prefilling: a refused request stores nothing
        )

        check_decoding(
            request.selection or "dense", request.budget_fraction, 0.0, request.temperature, request.top_p or 1.0
        )
        total = len(context) + len(query) + (request.max_new_tokens or 64)
        if total > self.max_positions:
            raise ValueError(
                f"context {len(context)} + query {len(query)} + max_new_tokens "
                f"{request.max_new_tokens or 64} = {total} tokens is more than the model's "
                f"{self.max_positions}"
            )
        return context, query

    async def generate(self, request: gateway_pb2.GenerateRequest) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        started = time.perf_counter()
        texts = len(request.context_text) + len(request.query_text)
        if texts > self.max_text_bytes:
            raise ValueError(
                f"context_text and query_text hold {texts} characters; this gateway tokenizes at most "
                f"{self.max_text_bytes} (max_text_bytes): send token ids, or a shorter text"
            )
        # a long text takes the tokenizer milliseconds: off the event loop, which serves every stream
        context, query = self.tokens(request) if texts < INLINE_TEXT else await asyncio.to_thread(self.tokens, request)
        recipe = request.recipe if request.HasField("recipe") else DEFAULT_RECIPE
        prefilled = await self._cached(context, recipe, request.tenant)
        if prefilled is None:
            prefill_request = prefill_pb2.PrefillRequest(recipe=recipe, tenant=request.tenant)
            prefill_request.token_ids.ids.extend(context)
            prefilled = await self.prefill.prefill(prefill_request)
            if prefilled.context_tokens:
                self.model_fingerprint = prefilled.model_fingerprint
                self.full_bytes_per_token = prefilled.full_bytes / prefilled.context_tokens
        prefill_ms = (time.perf_counter() - started) * 1e3
        decode_request = decode_pb2.DecodeRequest(
            keys=prefilled.keys,
            recipe=recipe,
            selection=request.selection or "dense",
            budget=request.budget,
            budget_fraction=request.budget_fraction,
            max_new_tokens=request.max_new_tokens or 64,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            seed=request.seed,
            tenant=request.tenant,
            ignore_eos=request.ignore_eos,
        )
        decode_request.context_ids.ids.extend(context)  # lets the worker recompute a lost entry
        decode_request.query_ids.ids.extend(query)
        worker = self.router.pick(prefilled.keys[0])
        worker.in_flight += 1
        ttft = None
        text, finish, new_tokens, decode_stats = "", "max_new_tokens", 0, None
        try:
            async for reply in worker.backend.decode(decode_request):
                if reply.HasField("stats"):
                    decode_stats = reply.stats
                    break
                if ttft is None:
                    ttft = (time.perf_counter() - started) * 1e3
                new_tokens += 1
                piece = reply.token.text
                hit = _first_stop(text + piece, request.stop, len(text))
                if hit is not None:
                    piece = (text + piece)[len(text) : hit]
                    if piece:
                        yield gateway_pb2.GenerateResponse(
                            token=decode_pb2.GeneratedToken(id=reply.token.id, text=piece)
                        )
                    finish = "stop_string"
                    break
                text += piece
                yield gateway_pb2.GenerateResponse(token=reply.token)
        finally:
            worker.in_flight -= 1
        self.router.remember(worker, prefilled.keys[0])
        if (
            decode_stats is not None
            and finish != "stop_string"
            and decode_stats.new_tokens < decode_request.max_new_tokens
        ):
            finish = "stop_token"
        elapsed = time.perf_counter() - started
        first = (ttft or elapsed * 1e3) / 1e3
        stats = gateway_pb2.GenerateStats(
            cache_hit=prefilled.prefilled_tokens == 0,
            context_tokens=prefilled.context_tokens,
            cached_prefix_tokens=prefilled.cached_tokens,
            prefilled_tokens=prefilled.prefilled_tokens,
            entry_bytes=prefilled.stored_bytes,
            compression_ratio=prefilled.full_bytes / prefilled.stored_bytes if prefilled.stored_bytes else 0.0,
            ttft_ms=ttft or elapsed * 1e3,
            tokens_per_second=(new_tokens - 1) / (elapsed - first) if new_tokens > 1 and elapsed > first else 0.0,
            new_tokens=new_tokens,
            prefill_ms=prefill_ms,
            decode_worker=worker.name,
            finish_reason=finish,
            cache_stored=prefilled.cache_stored,
            not_stored_reason=prefilled.not_stored_reason,
        )
        if decode_stats is not None:
            stats.decode.CopyFrom(decode_stats)
            stats.bytes_fetched_by_tier.update(decode_stats.bytes_fetched_by_tier)
        yield gateway_pb2.GenerateResponse(stats=stats)

    async def _cached(self, context: list[int], recipe, tenant: str) -> prefill_pb2.PrefillResponse | None:
        """A prefill reply made from one store Lookup when every entry of ``context`` is cached, else None."""
        if self.store is None or not self.model_fingerprint:
            return None
        fingerprint = self.model_fingerprint
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                None,
                contextvars.copy_context().run,
                self.store.lookup,
                fingerprint,
                recipe_from_proto(recipe),
                context,
                tenant or "default",
            )
        except grpc.RpcError as e:  # the prefill worker looks again, and knows what to do when the store is down
            log.warning("store lookup failed (%s): going through prefill", e.code())
            self.degraded.failed(f"store lookup failed: {e.code().name}")
            return None
        if found is None or found.cached_tokens != len(context):
            return None
        return prefill_pb2.PrefillResponse(
            keys=[str(k) for k in found.keys],
            model_fingerprint=fingerprint,
            context_tokens=len(context),
            cached_tokens=len(context),
            prefilled_tokens=0,
            stored_bytes=sum(found.stored_bytes),
            full_bytes=round(self.full_bytes_per_token * len(context)),
            kept_tokens_per_layer=found.kept_tokens_per_layer,
            importance=sum(found.importance) / max(len(found.importance), 1),
            cache_stored=True,
        )


def _first_stop(text: str, stops, start: int) -> int | None:
    """Index in ``text`` where the earliest stop string begins, looking only where new text could complete one."""
    best = None
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best
