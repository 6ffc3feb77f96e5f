"""The Decode service over gRPC with the real SmolLM2, a real store and a real prefill worker."""

from __future__ import annotations

import grpc
import pytest
import torch
from in_process import InProcessServer

from dkv.kvstore.entry import Recipe
from dkv.services.decode_server import DecodeServer
from dkv.services.pb import decode_pb2, decode_pb2_grpc
from dkv.services.prefill_client import PrefillClient
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import DecodeSettings, PrefillSettings
from dkv.services.shards import open_store
from dkv.services.store_client import StoreClient
from dkv.services.wire import recipe_to_proto
from dkv.workers.decode_worker import DecodeWorker
from dkv.workers.prefill import PrefillWorker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CONTEXT = FILLER * 5 + "The pass key is 71432. Remember it. " + FILLER * 25
QUESTION = "\nWhat is the pass key? The pass key is"


@pytest.fixture
def system(smollm2, store_service):
    model, tokenizer = smollm2
    store = store_service()
    prefill = InProcessServer(
        PrefillServer(
            PrefillSettings(port=0), PrefillWorker(model, tokenizer, open_store(store.address, timeout_s=120))
        )
    )
    prefill_client = PrefillClient(prefill.address)
    worker = DecodeWorker(model, tokenizer, open_store(store.address, timeout_s=120), prefill_client)
    decode = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    channel = grpc.insecure_channel(decode.address)
    yield decode_pb2_grpc.DecodeStub(channel), prefill_client, StoreClient(store.address), model, tokenizer
    channel.close()
    decode.stop()
    prefill_client.close()
    prefill.stop()


def decode(stub, **fields) -> tuple[list[decode_pb2.GeneratedToken], decode_pb2.DecodeStats]:
    request = decode_pb2.DecodeRequest(**{k: v for k, v in fields.items() if k not in ("context_ids", "query_ids")})
    if "context_ids" in fields:
        request.context_ids.ids.extend(fields["context_ids"])
    if "query_ids" in fields:
        request.query_ids.ids.extend(fields["query_ids"])
    tokens, stats = [], None
    for reply in stub.Decode(request, timeout=600):
        if reply.HasField("token"):
            tokens.append(reply.token)
        else:
            stats = reply.stats
    return tokens, stats


def test_decode_by_key_streams_the_same_tokens_as_plain_generation(system):
    stub, prefill, _, model, tokenizer = system
    ctx = tokenizer(CONTEXT).input_ids
    query = tokenizer(QUESTION, add_special_tokens=False).input_ids
    keys = prefill.keys(ctx, Recipe(method="full"))
    tokens, stats = decode(stub, keys=keys, query_ids=query, max_new_tokens=10)
    full = torch.tensor([ctx + query])
    plain = model.generate(full, max_new_tokens=10, do_sample=False)[0, full.shape[1] :].tolist()
    assert [t.id for t in tokens] == plain
    assert "".join(t.text for t in tokens) == tokenizer.decode(plain, skip_special_tokens=True)
    assert stats.new_tokens == len(plain) and not stats.prefilled and stats.context_tokens == len(ctx)
    assert stats.bytes_fetched_by_tier["cpu"] > 0 and stats.ms_per_token > 0
    assert stats.mean_selected_per_step >= len(ctx)  # dense: every slot


def test_sparse_and_paged_decoding_through_the_service(system):
    stub, prefill, _, _, tokenizer = system
    ctx = tokenizer(CONTEXT).input_ids
    reply = prefill.prefill(ctx, Recipe(method="full"))
    keys, entry_bytes = list(reply.keys), reply.stored_bytes
    budget = len(ctx) // 8
    for paged in (False, True):
        tokens, stats = decode(
            stub, keys=keys, query_text=QUESTION, selection="pages", budget=budget, paged=paged, max_new_tokens=8
        )
        assert "71432" in "".join(t.text for t in tokens)
        assert stats.mean_selected_per_step < len(ctx) / 2
        if paged:
            assert 0 < stats.bytes_fetched_by_tier["cpu"] < entry_bytes / 2  # 8 tokens read well under half


def test_a_context_is_prefilled_once_then_read_from_the_store(system):
    stub, _, _, _, tokenizer = system
    recipe = recipe_to_proto(Recipe(method="snapkv", ratio=0.5))
    first = decode(stub, context_text=CONTEXT, recipe=recipe, query_text=QUESTION, max_new_tokens=4)[1]
    again = decode(stub, context_text=CONTEXT, recipe=recipe, query_text=QUESTION, max_new_tokens=4)[1]
    assert first.prefilled and not again.prefilled


def test_a_missing_entry_is_recomputed_when_the_context_is_given_else_not_found(system):
    stub, prefill, store, _, tokenizer = system
    ctx = tokenizer(CONTEXT).input_ids
    keys = prefill.keys(ctx, Recipe(method="full"))
    store.delete(keys[0])
    with pytest.raises(grpc.RpcError) as info:
        decode(stub, keys=keys, query_text=QUESTION, max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "recomputed" in info.value.details()
    store.delete(keys[0])
    tokens, stats = decode(
        stub,
        keys=keys,
        context_ids=ctx,
        recipe=recipe_to_proto(Recipe(method="full")),
        query_text=QUESTION,
        max_new_tokens=8,
    )
    assert stats.prefilled and "71432" in "".join(t.text for t in tokens)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(keys=["default/m/r/h"], query_text="hi", selection="nope"), "unknown selection 'nope'"),
        (dict(keys=["default/m/r/h"], query_text="hi", budget_fraction=2.0), "budget_fraction 2.0"),
        (dict(keys=["default/m/r/h"]), "the query is empty"),
        (dict(keys=["default/m/r/h"], query_text="hi", paged=True), "paged decoding"),
        (dict(keys=["default/m/r/h"], query_text="hi", temperature=-1.0), "temperature"),
        (dict(query_text="hi"), "no entry"),
    ],
)
def test_bad_requests_are_invalid_argument(system, fields, message):
    stub = system[0]
    with pytest.raises(grpc.RpcError) as info:
        decode(stub, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_a_query_too_long_for_the_model_is_invalid_argument(system):
    stub, prefill, _, _, tokenizer = system
    keys = prefill.keys(tokenizer(CONTEXT).input_ids, Recipe(method="full"))
    with pytest.raises(grpc.RpcError) as info:
        decode(stub, keys=keys, query_text=QUESTION, max_new_tokens=8190)
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than the model's 8192" in info.value.details()
    )
