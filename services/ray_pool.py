"""Prefill and decode worker pools as Ray actors, behind the same gateway contract.

``dkv up --ray [ADDRESS]`` keeps the store (a gRPC service, with Redis) and the gateway, but runs
the prefill and decode workers as Ray actors: on the Ray cluster at ``ADDRESS``, or on a local
Ray it starts. Each actor holds one model and one worker (``workers.prefill.PrefillWorker``,
``workers.decode_worker.DecodeWorker``) on the device its ``device`` setting names (see
``actor_placement``: ``cuda`` asks Ray for one GPU per actor, ``auto`` does when the cluster has
enough), and Ray restarts it if it dies (``max_restarts``), on another node when its own is gone.
The gateway talks to actors through ``RayBackend`` with the very messages it sends over gRPC
(``dkv.v1.PrefillRequest``, ``DecodeRequest``, ..., serialized), so routing, stop strings and stats
are the same code as without Ray; an actor that dies mid-stream ends the stream with UNAVAILABLE, as
a gRPC worker that dies does.

On a Ray cluster of several nodes the actors go where Ray's scheduler puts them (each needs one CPU,
and one GPU with ``device`` cuda); ``start_pools``' ``prefill_options`` and ``decode_options`` pin
them (custom resources, a scheduling strategy). The actors reach the store at the address they are
given, so it must be one every node can reach.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import ray

from dkv.services.pb import decode_pb2, prefill_pb2
from dkv.services.settings import SettingsError

log = logging.getLogger("dkv.ray")


@ray.remote(max_restarts=-1, max_task_retries=0)
class PrefillActor:
    def __init__(self, model: str, store: str, security=None, device: str = "cpu", dtype: str = "auto"):
        from dkv.services.shards import open_store
        from dkv.workers.model import load_model
        from dkv.workers.prefill import PrefillWorker

        loaded, tokenizer = load_model(model, dtype, device)
        self.worker = PrefillWorker(loaded, tokenizer, open_store(store, timeout_s=120, security=security))

    def prefill(self, request: bytes) -> bytes:
        from dkv.services.prefill_server import prefill_ids, prefill_response
        from dkv.services.wire import recipe_from_proto

        r = prefill_pb2.PrefillRequest.FromString(request)
        result = self.worker.prefill(prefill_ids(r, self.worker), recipe_from_proto(r.recipe), r.tenant or "default")
        return prefill_response(result).SerializeToString()

    def entries(self, request: bytes) -> list[bytes]:
        """The context's entries as store Get frames (``Prefill.Entries``), for a decode actor."""
        from dkv.kvstore import codec
        from dkv.services.prefill_server import prefill_ids
        from dkv.services.wire import recipe_from_proto

        r = prefill_pb2.PrefillRequest.FromString(request)
        entries = self.worker.entries(prefill_ids(r, self.worker), recipe_from_proto(r.recipe), r.tenant or "default")
        return [f for e in entries for f in codec.encode(e)]

    def pid(self) -> int:
        import os

        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()


# a threaded actor: each call waits for its stream in its own thread while the worker's one model
# loop decodes them all together (as many calls as the worker's default active + queued streams)
@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=16 + 64)
class DecodeActor:
    def __init__(
        self,
        model: str,
        store: str,
        prefill: ray.actor.ActorHandle,
        security=None,
        device: str = "cpu",
        dtype: str = "auto",
    ):
        from dkv.services.shards import open_store
        from dkv.workers.decode_worker import DecodeWorker
        from dkv.workers.model import load_model

        loaded, tokenizer = load_model(model, dtype, device)
        self.worker = DecodeWorker(
            loaded, tokenizer, open_store(store, timeout_s=120, security=security), ActorPrefill(prefill)
        )

    def decode(self, request: bytes):
        """Streams serialized ``DecodeResponse`` messages: the tokens, then the stats."""
        from dkv.services.decode_server import decode_responses

        for reply in decode_responses(self.worker, decode_pb2.DecodeRequest.FromString(request)):
            yield reply.SerializeToString()

    def pid(self) -> int:
        import os

        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()


def unavailable(what: str, error: ray.exceptions.RayActorError) -> grpc.aio.AioRpcError:
    """The error a gRPC worker that died would give (the gateway passes its status on to the client)."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=f"{what}: the worker actor died ({type(error).__name__}); Ray restarts it: retry",
    )


class ActorPrefill:
    """A prefill actor as the decode worker's prefill client (``PrefillClient``'s ``keys`` and ``entries``)."""

    def __init__(self, actor: ray.actor.ActorHandle):
        self.actor = actor

    @staticmethod
    def _request(context_ids, recipe, tenant) -> bytes:
        from dkv.services.wire import recipe_to_proto

        request = prefill_pb2.PrefillRequest(recipe=recipe_to_proto(recipe), tenant=tenant)
        request.token_ids.ids.extend(context_ids)
        return request.SerializeToString()

    def keys(self, context_ids, recipe, tenant) -> list[str]:
        reply = ray.get(self.actor.prefill.remote(self._request(context_ids, recipe, tenant)))
        return list(prefill_pb2.PrefillResponse.FromString(reply).keys)

    def entries(self, context_ids, recipe, tenant) -> list:
        from dkv.kvstore import codec

        frames = ray.get(self.actor.entries.remote(self._request(context_ids, recipe, tenant)))
        return [codec.decode(group) for group in codec.entries_of(frames)]


class RayBackend:
    """A worker actor seen by the gateway: the same async methods as ``GrpcBackend``.

    While Ray restarts a crashed actor (its model loads again), calls are retried for up to
    ``restart_wait_s``; a decode stream is retried only if it failed before its first message. A
    stream cut later, or a call still failing after ``restart_wait_s``, raises UNAVAILABLE
    (``grpc.aio.AioRpcError``).
    """

    def __init__(self, actor, restart_wait_s: float = 300.0):
        self.actor, self.restart_wait_s = actor, restart_wait_s

    async def _retrying(self, attempt):
        deadline = time.monotonic() + self.restart_wait_s
        delay = 0.5
        while True:
            try:
                return await attempt()
            except ray.exceptions.RayActorError as e:
                if time.monotonic() + delay > deadline:
                    raise unavailable(f"no answer within restart_wait_s = {self.restart_wait_s:g} s", e) from e
                log.warning("actor unavailable (%s): retrying in %.1f s", type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def prefill(self, request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillResponse:
        data = request.SerializeToString()

        async def attempt():
            return prefill_pb2.PrefillResponse.FromString(await self.actor.prefill.remote(data))

        return await self._retrying(attempt)

    async def decode(self, request: decode_pb2.DecodeRequest):
        data = request.SerializeToString()

        async def first():
            stream = self.actor.decode.options(num_returns="streaming").remote(data)
            head = await stream.__anext__()
            return stream, await head

        stream, head = await self._retrying(first)
        yield decode_pb2.DecodeResponse.FromString(head)
        try:
            async for ref in stream:
                yield decode_pb2.DecodeResponse.FromString(await ref)
        except ray.exceptions.RayActorError as e:
            raise unavailable("the decode stream was cut", e) from e

    async def close(self) -> None:
        pass


class RoundRobin:
    """Several prefill backends used in turn."""

    def __init__(self, backends: list):
        self.backends, self.next = backends, 0

    async def prefill(self, request):
        backend = self.backends[self.next % len(self.backends)]
        self.next += 1
        return await backend.prefill(request)

    async def close(self) -> None:
        pass


def actor_placement(device: str, actors: int, cluster_gpus: float) -> tuple[int, str]:
    """(GPUs Ray gives each worker actor, the torch device the actor loads its model on).

    ``cuda`` asks for one GPU per actor (Ray makes it the actor's only visible GPU, so the model
    goes to ``cuda``) and is refused when the cluster has fewer GPUs than actors; ``cpu`` asks for
    none; ``auto`` asks for one when the cluster has enough for every actor. ``cuda:N`` is refused:
    Ray, not the setting, picks each actor's GPU.
    """
    if device.startswith("cuda:"):
        raise SettingsError(f"setting device = {device!r}: with Ray use cuda (Ray assigns each actor its GPU) or cpu")
    if device == "cuda" and cluster_gpus < actors:
        raise SettingsError(
            f"setting device = 'cuda' asks for one GPU for each of the {actors} worker actors, but "
            f"the Ray cluster has {cluster_gpus:g}; use fewer workers, device cpu, or device auto"
        )
    gpus = int(device == "cuda" or (device == "auto" and cluster_gpus >= actors))
    return gpus, "cuda" if gpus else "cpu"


def start_pools(
    model: str,
    store: str,
    prefill_workers: int = 1,
    decode_workers: int = 1,
    security=None,
    device: str = "auto",
    dtype: str = "auto",
    prefill_options: dict | None = None,
    decode_options: dict | None = None,
):
    """(prefill actors, decode actors) on the connected Ray cluster, placed by ``actor_placement``.

    ``security`` (a ``services.transport.Security``) is what the actors present to the store;
    ``prefill_options`` and ``decode_options`` are more Ray actor options of each pool (``resources``,
    ``scheduling_strategy``: which nodes it may use)."""
    gpus, actor_device = actor_placement(
        device, prefill_workers + decode_workers, ray.cluster_resources().get("GPU", 0)
    )
    prefill = [
        PrefillActor.options(num_cpus=1, num_gpus=gpus, **(prefill_options or {})).remote(
            model, store, security, actor_device, dtype
        )
        for _ in range(prefill_workers)
    ]
    decode = [
        DecodeActor.options(num_cpus=1, num_gpus=gpus, **(decode_options or {})).remote(
            model, store, prefill[i % len(prefill)], security, actor_device, dtype
        )
        for i in range(decode_workers)
    ]
    ray.get([a.pid.remote() for a in prefill + decode])  # wait until every model is loaded
    log.info(
        "ray pools ready: %d prefill and %d decode actors on %s (%s GPU each)",
        prefill_workers,
        decode_workers,
        actor_device,
        gpus,
    )
    return prefill, decode
