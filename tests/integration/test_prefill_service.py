"""The Prefill service over gRPC with the real SmolLM2 and a real store on loopback."""

from __future__ import annotations

import grpc
import pytest
import torch
from in_process import InProcessServer

from dkv.kvstore.entry import Recipe
from dkv.services.pb import prefill_pb2, prefill_pb2_grpc
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import PrefillSettings
from dkv.services.shards import open_store
from dkv.services.store_client import StoreClient
from dkv.services.wire import recipe_to_proto
from dkv.workers.cache import to_hf_cache
from dkv.workers.prefill import PrefillWorker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. Members discussed the cost of "
    "shelving, the hours of the reading room and a plan to lend laptops to students. "
) * 12


@pytest.fixture
def services(smollm2, store_service):
    model, tokenizer = smollm2
    store = store_service()
    worker = PrefillWorker(model, tokenizer, open_store(store.address, timeout_s=120), max_tokens=2048)
    prefill = InProcessServer(PrefillServer(PrefillSettings(port=0), worker))
    channel = grpc.insecure_channel(prefill.address)
    yield prefill_pb2_grpc.PrefillStub(channel), StoreClient(store.address), tokenizer, model
    channel.close()
    prefill.stop()


def call(stub, recipe: Recipe, text: str | None = None, ids: list[int] | None = None):
    request = prefill_pb2.PrefillRequest(recipe=recipe_to_proto(recipe))
    if text is not None:
        request.text = text
    else:
        request.token_ids.ids.extend(ids)
    return stub.Prefill(request, timeout=300)


def test_full_recipe_entry_continues_like_plain_generation(services):
    stub, store, tokenizer, model = services
    reply = call(stub, Recipe(method="full"), text=TEXT)
    ids = tokenizer(TEXT).input_ids
    assert reply.context_tokens == len(ids) and reply.prefilled_tokens == len(ids) and reply.cached_tokens == 0
    # storage_dtype auto keeps this float32 model's K/V as float16: half the bytes (plus positions and scores)
    assert len(reply.keys) == 1 and 0.5 <= reply.stored_bytes / reply.full_bytes <= 0.55
    assert list(reply.kept_tokens_per_layer) == [3 * len(ids)] * 30
    assert reply.timings.prefill_ms > 0 and reply.timings.total_ms >= reply.timings.prefill_ms
    entry = store.get(reply.keys[0])
    question = tokenizer("\nWhat did the committee discuss?", add_special_tokens=False).input_ids
    full = torch.tensor([ids + question])
    assert entry.layers[0].keys.dtype == torch.float16
    plain = model.generate(full, max_new_tokens=12, do_sample=False)
    cached = model.generate(full, cache=to_hf_cache(entry), max_new_tokens=12, do_sample=False)
    assert cached[0].tolist() == plain[0].tolist()
    # the tolerance float16 storage implies: first-step logits within 0.01 (they reach ~25) of float32's
    with torch.inference_mode():
        exact = model(input_ids=torch.tensor([ids]), use_cache=True)
        rounded = model(input_ids=torch.tensor([question]), cache=to_hf_cache(entry), logits_to_keep=1).logits[0, -1]
        reference = model(input_ids=torch.tensor([question]), cache=exact.cache, logits_to_keep=1).logits[0, -1]
    assert (rounded - reference).abs().max() < 0.01
    again = call(stub, Recipe(method="full"), text=TEXT)  # an exact hit: nothing prefilled
    assert (again.cached_tokens, again.prefilled_tokens, list(again.keys)) == (len(ids), 0, list(reply.keys))


def test_chunked_recipe_reuses_the_cached_prefix_of_a_longer_prompt(services):
    stub, store, tokenizer, _ = services
    recipe = Recipe(method="streaming_llm", ratio=0.5, chunk_size=128, chunked=True)
    ids = tokenizer(TEXT).input_ids
    first = call(stub, recipe, ids=ids[:300])
    assert len(first.keys) == 3 and first.cached_tokens == 0
    assert list(first.kept_tokens_per_layer) == [3 * (64 + 64 + 22)] * 30
    longer_ids = ids[:300] + tokenizer(" And then they voted.", add_special_tokens=False).input_ids
    longer = call(stub, recipe, ids=longer_ids)
    assert (longer.cached_tokens, longer.prefilled_tokens) == (256, len(longer_ids) - 256)
    assert list(longer.keys[:2]) == list(first.keys[:2])
    assert longer.keys[2] != first.keys[2]  # the third chunk holds other tokens now
    found = store.lookup(first.model_fingerprint, recipe, ids[:300])
    assert found.cached_tokens == 300 and [str(k) for k in found.keys] == list(first.keys)


@pytest.mark.parametrize(
    "recipe, ids, message",
    [
        (Recipe(method="nope"), [1, 2, 3], "unknown compression method 'nope'; use one of"),
        (Recipe(method="streaming_llm", params=(("window", 3.0),)), [1, 2, 3], "has no parameter ['window']"),
        (Recipe(method="full"), [], "no context"),
        (Recipe(method="full"), [1, 99999999], "outside the vocabulary [0, 49152)"),
        (Recipe(method="full"), [1] * 3000, "at most 2048"),
    ],
)
def test_bad_requests_are_invalid_argument_with_what_to_fix(services, recipe, ids, message):
    stub = services[0]
    request = prefill_pb2.PrefillRequest(recipe=recipe_to_proto(recipe))
    if ids:
        request.token_ids.ids.extend(ids)
    with pytest.raises(grpc.RpcError) as info:
        stub.Prefill(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_ratio_outside_the_range_is_invalid_argument(services):
    stub = services[0]
    bad = recipe_to_proto(Recipe(method="full"))
    bad.ratio = 1.5
    request = prefill_pb2.PrefillRequest(recipe=bad, text="hello")
    with pytest.raises(grpc.RpcError) as info:
        stub.Prefill(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ratio 1.5" in info.value.details()


def test_a_chunk_size_below_the_worker_s_minimum_is_invalid_and_stores_nothing(services):
    """chunk_size is the client's choice, and a chunked recipe stores one entry per chunk: 1 would
    make one entry per token. The worker's min_chunk_size (16 by default) bounds it."""
    stub, store, tokenizer, _ = services
    before = store.stats().entries
    for chunk_size in (1, 15):
        with pytest.raises(grpc.RpcError) as info:
            call(stub, Recipe(method="snapkv", ratio=0.5, chunk_size=chunk_size, chunked=True), text=TEXT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"chunk_size {chunk_size} is below this worker's min_chunk_size 16" in info.value.details()
    assert store.stats().entries == before
    assert call(stub, Recipe(method="snapkv", ratio=0.5, chunk_size=16, chunked=True), ids=list(range(40))).keys
