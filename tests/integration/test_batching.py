"""Continuous batching in the decode worker, with the real SmolLM2.

A stream's greedy tokens are the same alone or in a batch with streams of other lengths, recipes
and selections that join and leave around it; per-stream sampling with a seed is the same too; a
cancelled stream leaves within one step; the queue's bounds answer RESOURCE_EXHAUSTED over gRPC;
a client that goes away frees its row.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
import torch
from in_process import InProcessServer

from dkv.services.decode_server import DecodeServer
from dkv.services.pb import decode_pb2, decode_pb2_grpc
from dkv.services.settings import DecodeSettings
from dkv.services.shards import open_store
from dkv.workers.compression import compress, compress_chunks
from dkv.workers.decode import generate, row_selection
from dkv.workers.decode_worker import DecodeWorker
from dkv.workers.engine import Batch, Cancelled, DecodeEngine, QueueFull, Sampler, Stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NEW = 20
TEXT = (
    "Mara kept bees on the hill above Tollan. Each spring she carried the hives down to the orchards, and each "
    "autumn she sold the honey in the market by the river. Her brother Ivo mended the boats and told stories of "
    "the old bridge that the flood took away. "
) * 12


@pytest.fixture(scope="module")
def streams(smollm2):
    """(entries, query ids, selection) of four contexts: different lengths, recipes and selections."""
    model, tokenizer = smollm2
    ids = tokenizer(TEXT).input_ids
    query = tokenizer("\nWho mended the boats?", add_special_tokens=False).input_ids
    return [
        ([compress(model, torch.tensor([ids[:240]]), "full", ratio=0.0)], query, "dense"),
        ([compress(model, torch.tensor([ids[:410]]), "snapkv", ratio=0.5).cast(torch.float16)], query[2:], "dense"),
        (
            compress_chunks(model, torch.tensor([ids[:530]]), "snapkv", 0.5, chunk_size=128, quant="int4"),
            query,
            "dense",
        ),
        ([compress(model, torch.tensor([ids[:330]]), "full", ratio=0.0)], query, "topk"),
    ]


def alone(model, tokenizer, entries, query, selection, **kwargs) -> list[int]:
    return generate(
        model,
        tokenizer,
        entries,
        torch.tensor([query]),
        NEW,
        selection,
        64 if selection != "dense" else None,
        stop_ids=set(),
        **kwargs,
    )


def test_batched_greedy_tokens_equal_each_stream_alone(smollm2, streams):
    model, tokenizer = smollm2
    expected = [alone(model, tokenizer, *s) for s in streams]
    batch = Batch(model)
    out = [[] for _ in streams]
    ended: list = []
    made = [
        Stream(e, q, NEW, out[i].append, ended.append, selection=row_selection(sel, 64 if sel != "dense" else 0))
        for i, (e, q, sel) in enumerate(streams)
    ]
    rows_at_join = []
    with torch.inference_mode():
        for i, stream in enumerate(made):  # each joins a batch that is already running
            rows_at_join.append(batch.rows)
            batch.join([stream])
            for _ in range(3 * i):
                batch.step()
        while batch.rows:
            batch.step()
    assert rows_at_join == [0, 1, 2, 3]
    assert ended == [None] * len(streams)
    assert out == expected
    assert all(len(o) == NEW for o in out)


def test_streams_that_join_together_run_their_queries_in_one_forward_and_equal_each_alone(smollm2, streams):
    model, tokenizer = smollm2
    same_query = [(e, streams[0][1], sel) for e, _, sel in streams]  # one query length, four contexts
    expected = [alone(model, tokenizer, *s) for s in same_query]
    batch = Batch(model)
    out = [[] for _ in same_query]
    made = [
        Stream(e, q, NEW, out[i].append, lambda e: None, selection=row_selection(sel, 64 if sel != "dense" else 0))
        for i, (e, q, sel) in enumerate(same_query)
    ]
    with torch.inference_mode():
        batch.join(made[:1])
        batch.step()
        batch.join(made[1:])  # three at once, beside one already decoding
        assert all(len(o) == 1 for o in out[1:]) and len(out[0]) == 2
        while batch.rows:
            batch.step()
    assert out == expected


def test_per_stream_sampling_is_the_same_alone_and_in_a_batch(smollm2, streams):
    model, tokenizer = smollm2
    entries, query, _ = streams[0]
    expected = alone(model, tokenizer, entries, query, "dense", temperature=0.8, top_p=0.9, seed=7)
    batch = Batch(model)
    sampled, greedy, ended = [], [], []
    with torch.inference_mode():
        batch.join([Stream(streams[1][0], streams[1][1], NEW, greedy.append, ended.append)])
        batch.step()
        batch.join([Stream(entries, query, NEW, sampled.append, ended.append, pick=Sampler(0.8, 0.9, 7))])
        while batch.rows:
            batch.step()
    assert sampled == expected
    assert greedy == alone(model, tokenizer, *streams[1])


def test_a_cancelled_stream_leaves_within_one_step_and_frees_its_row(smollm2, streams):
    model, tokenizer = smollm2
    engine = DecodeEngine(model, max_active=4, max_queued=4)
    try:
        tokens = {0: queue.SimpleQueue(), 1: queue.SimpleQueue()}
        ends = {0: queue.SimpleQueue(), 1: queue.SimpleQueue()}
        made = []
        for i in (0, 1):
            entries, query, _ = streams[i]
            engine.admit()
            made.append(Stream(entries, query, 400, tokens[i].put, ends[i].put))
            engine.submit(made[-1])
        for i in (0, 1):
            tokens[i].get(timeout=120)
        made[0].cancel()
        error = ends[0].get(timeout=60)
        assert isinstance(error, Cancelled)
        after = made[0].produced
        time.sleep(0.5)
        assert made[0].produced == after  # nothing more for it
        assert engine.active == 1  # its row is free; the other stream goes on
        before = made[1].produced
        deadline = time.monotonic() + 60
        while made[1].produced < before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert made[1].produced >= before + 3
        made[1].cancel()
        assert isinstance(ends[1].get(timeout=60), Cancelled)
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.close()


def test_streams_from_many_threads_equal_each_alone(smollm2, streams):
    model, tokenizer = smollm2
    expected = [alone(model, tokenizer, e, q, "dense") for e, q, _ in streams[:3]]
    engine = DecodeEngine(model, max_active=2, max_queued=8)  # three streams, two rows: one waits
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out, done = [], threading.Event()
        engine.admit()
        engine.submit(Stream(streams[i][0], streams[i][1], NEW, out.append, lambda e: done.set()))
        done.wait(300)
        results[i] = out

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        engine.close()
    assert [results[i] for i in range(3)] == expected


def test_the_queue_bounds_answer_queue_full(smollm2):
    model, _ = smollm2
    engine = DecodeEngine(model, max_active=1, max_queued=2)
    try:
        engine.admit()
        engine.admit()
        with pytest.raises(QueueFull, match="max_active_streams 1.*max_queued_requests 2"):
            engine.admit()
        engine.release()
        engine.admit()  # a released place is free again
    finally:
        engine.close()


@pytest.fixture
def decode_service(smollm2, store_service):
    """A Decode service whose worker runs one stream and queues one more."""
    model, tokenizer = smollm2
    store = store_service()
    client = open_store(store.address, timeout_s=120)
    worker = DecodeWorker(model, tokenizer, client, max_active=1, max_queued=1)
    server = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    channel = grpc.insecure_channel(server.address)
    yield decode_pb2_grpc.DecodeStub(channel), worker, client
    channel.close()
    server.stop()


def long_request(key: str, query: list[int]) -> decode_pb2.DecodeRequest:
    request = decode_pb2.DecodeRequest(keys=[key], max_new_tokens=200, ignore_eos=True)
    request.query_ids.ids.extend(query)
    return request


def test_over_the_bounds_a_request_gets_resource_exhausted_with_them(decode_service, streams):
    stub, worker, store = decode_service
    entries, query, _ = streams[0]
    key = str(store.put(entries[0]).key)
    running = stub.Decode(long_request(key, query), timeout=300)
    next(running)  # it holds the one row
    waiting = stub.Decode(long_request(key, query), timeout=300)  # the one queued place
    deadline = time.monotonic() + 30
    while worker.engine.queued < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.Decode(long_request(key, query), timeout=60))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_active_streams 1" in refused.value.details() and "max_queued_requests 1" in refused.value.details()
    running.cancel()
    assert next(waiting).HasField("token")  # the queued one got the row
    waiting.cancel()


def test_a_client_that_goes_away_frees_its_row_within_a_step(decode_service, streams):
    stub, worker, store = decode_service
    entries, query, _ = streams[0]
    key = str(store.put(entries[0]).key)
    call = stub.Decode(long_request(key, query), timeout=300)
    next(call)
    assert worker.engine.active == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while worker.engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.engine.active == 0
    # and the next request is served at once
    tokens = [r.token.id for r in stub.Decode(long_request(key, query), timeout=300) if r.HasField("token")]
    assert len(tokens) == 200


def test_a_request_that_fails_before_its_first_token_gives_back_its_place(decode_service, streams):
    stub, worker, _ = decode_service
    entries, query, _ = streams[0]
    missing = str(entries[0].key)  # never stored; this worker has no prefill to recompute it
    for _ in range(3):  # more than max_queued: each failure gave its place back
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Decode(long_request(missing, query), timeout=60))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert worker.engine.queued == 0 and worker.engine.active == 0


def test_a_deadline_that_passes_frees_the_row(decode_service, streams):
    stub, worker, store = decode_service
    entries, query, _ = streams[0]
    key = str(store.put(entries[0]).key)
    request = long_request(key, query)
    request.max_new_tokens = 4000  # far more than a second of decoding
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.Decode(request, timeout=1.0):
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while worker.engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.engine.active == 0


@pytest.fixture
def gateway(smollm2, store_service):
    """Store, prefill, decode and gateway in this process; the gateway looks contexts up first."""
    from dkv.services.client import DkvClient
    from dkv.services.gateway_server import GatewayServer
    from dkv.services.prefill_client import PrefillClient
    from dkv.services.prefill_server import PrefillServer
    from dkv.services.settings import GatewaySettings, PrefillSettings
    from dkv.workers.prefill import PrefillWorker

    model, tokenizer = smollm2
    store = store_service()
    prefill_worker = PrefillWorker(model, tokenizer, open_store(store.address, timeout_s=120))
    prefill = InProcessServer(PrefillServer(PrefillSettings(port=0), prefill_worker))
    recompute = PrefillClient(prefill.address)
    worker = DecodeWorker(model, tokenizer, open_store(store.address, timeout_s=120), recompute)
    decode = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    front = InProcessServer(
        GatewayServer(GatewaySettings(port=0, prefill=prefill.address, decode=decode.address, store=store.address))
    )

    def prefill_calls() -> float:
        return sum(
            s.value
            for m in prefill.server.metrics.rpc_duration.collect()
            for s in m.samples
            if s.name.endswith("_count") and s.labels["method"] == "Prefill"
        )

    with DkvClient(front.address) as client:
        yield client, worker, tokenizer, prefill_calls
    for server in (front, decode, prefill):
        server.stop()
    recompute.close()


def test_a_stop_string_ends_the_stream_on_the_worker_too(gateway):
    client, worker, tokenizer, _ = gateway
    context = TEXT[:600]
    answer, stats = client.ask(
        context, "Who kept bees, and where?", chat_template=True, max_new_tokens=400, ignore_eos=True, stop=["e"]
    )
    assert stats.finish_reason == "stop_string" and stats.new_tokens < 400, (answer, stats)
    deadline = time.monotonic() + 10
    while worker.engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.engine.active == 0


def test_a_full_hit_goes_straight_to_decode(gateway):
    client, _, _, prefill_calls = gateway
    context = TEXT[:900]
    first, stats = client.ask(context, "\nWho sold the honey?", max_new_tokens=8)
    assert not stats.cache_hit
    calls = prefill_calls()
    again, stats = client.ask(context, "\nWho sold the honey?", max_new_tokens=8)
    assert stats.cache_hit and again == first
    assert prefill_calls() == calls  # the hit was answered from one store Lookup
    assert stats.context_tokens > 0 and stats.entry_bytes > 0 and stats.compression_ratio > 1


def test_chunk_keys_out_of_order_are_invalid_argument(decode_service, smollm2):
    stub, worker, store = decode_service
    model, tokenizer = smollm2
    ids = tokenizer(TEXT).input_ids[:300]
    chunks = compress_chunks(model, torch.tensor([ids]), "snapkv", 0.5, chunk_size=128)
    keys = [str(store.put(e).key) for e in chunks]
    for wrong in (keys[::-1], keys[1:], [keys[0], keys[2]]):
        request = decode_pb2.DecodeRequest(keys=wrong, max_new_tokens=2)
        request.query_ids.ids.extend([42])
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Decode(request, timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "entry" in e.value.details()
    request = decode_pb2.DecodeRequest(keys=keys, max_new_tokens=2)  # in order: served
    request.query_ids.ids.extend([42])
    assert next(stub.Decode(request, timeout=60)).HasField("token")
    assert worker.engine.queued == 0


def test_an_entry_decoded_once_is_served_from_the_worker_the_next_time(decode_service, streams):
    stub, worker, store = decode_service
    entries, query, _ = streams[0]
    key = str(store.put(entries[0]).key)

    def tiers() -> dict:
        request = decode_pb2.DecodeRequest(keys=[key], max_new_tokens=2)
        request.query_ids.ids.extend(query)
        *tokens, last = list(stub.Decode(request, timeout=120))
        return dict(last.stats.bytes_fetched_by_tier), [t.token.id for t in tokens]

    first, tokens = tiers()
    assert set(first) == {"cpu"}
    again, same = tiers()
    assert set(again) == {"worker"} and again["worker"] == entries[0].nbytes and same == tokens
    assert store.delete(key)  # gone from the store: the worker still decodes from its copy
    assert tiers()[0] == again


def test_a_text_longer_than_the_gateway_tokenizes_is_invalid_argument(gateway):
    client, worker, _, prefill_calls = gateway
    with pytest.raises(grpc.RpcError) as e:
        client.ask("x" * ((1 << 20) + 1), "?", max_new_tokens=1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_text_bytes" in e.value.details()
    assert prefill_calls() == 0 and worker.engine.queued == 0
