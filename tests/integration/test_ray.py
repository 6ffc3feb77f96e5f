"""Worker pools as Ray actors on a local Ray with small resources, behind the same gateway."""

from __future__ import annotations

import asyncio
import os

import pytest
import ray
import torch

from dkv.kvstore.entry import Recipe
from dkv.services.gateway import Gateway, Router, Worker
from dkv.services.pb import gateway_pb2
from dkv.services.ray_pool import RayBackend, start_pools
from dkv.services.wire import recipe_to_proto

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONTEXT = (
    "The lighthouse on Skerry Point was built in 1871 by the engineer Thomas Pell. The last keeper, Ada Rowe, "
    "left in 1962. "
) * 3
QUERY = "\nQuestion: Who was the last keeper? Answer:"


@pytest.fixture(scope="module")
def pools(store_service_module):
    # A local Ray turns token auth on in this process (RAY_AUTH_MODE=token, a token cached in the
    # driver), and a later test's cluster without auth would then get no actor started: this one
    # runs without auth too, and the variables Ray set go with it.
    saved = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prefill, decode = start_pools("smollm2-135m", store_service_module.address)
        yield prefill, decode
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def store_service_module():
    from in_process import InProcessServer

    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import StoreServer

    server = InProcessServer(StoreServer(StoreSettings(port=0, cpu_bytes=512 << 20)))
    yield server
    server.stop()


def generate(gateway: Gateway, context: list[int], query: list[int], recipe: Recipe):
    async def run():
        request = gateway_pb2.GenerateRequest(recipe=recipe_to_proto(recipe), max_new_tokens=10)
        request.context_ids.ids.extend(context)
        request.query_ids.ids.extend(query)
        return [reply async for reply in gateway.generate(request)]

    replies = asyncio.run(run())
    return [r.token.id for r in replies if r.HasField("token")], replies[-1].stats


def test_actors_serve_generate_like_plain_generation_and_restart_after_a_crash(pools, smollm2):
    prefill, decode = pools
    model, tokenizer = smollm2
    context = tokenizer(CONTEXT, add_special_tokens=False).input_ids
    query = tokenizer(QUERY, add_special_tokens=False).input_ids
    full = torch.tensor([context + query])
    plain = model.generate(full, max_new_tokens=10, do_sample=False)[0, full.shape[1] :].tolist()
    gateway = Gateway(
        tokenizer, RayBackend(prefill[0]), Router([Worker("ray-decode-0", RayBackend(decode[0]))]), max_positions=8192
    )
    tokens, stats = generate(gateway, context, query, Recipe(method="full"))
    assert tokens == plain and not stats.cache_hit and stats.decode_worker == "ray-decode-0"

    old_pid = ray.get(decode[0].pid.remote())
    ray.kill(decode[0], no_restart=False)  # a crash: Ray restarts the actor (max_restarts)
    tokens, stats = generate(gateway, context, query, Recipe(method="full"))
    assert tokens == plain and stats.cache_hit  # the entry is still in the store
    assert ray.get(decode[0].pid.remote()) != old_pid
