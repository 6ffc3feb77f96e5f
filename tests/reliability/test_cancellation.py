"""Scenario 7 of issue 14 (cancellation), through a real Decode service with the real SmolLM2.

A decode of ``max_new_tokens=512`` cancelled by its client after its first token leaves the batch
within one step, and the next request's time to first token is an idle worker's: the cancelled
stream does not keep generating behind it. Prints a ``[figures]`` line for docs/reliability.md.
"""

from __future__ import annotations

import statistics
import time

import grpc
import pytest
import torch
from in_process import InProcessServer

from dkv.services.decode_server import DecodeServer
from dkv.services.pb import decode_pb2, decode_pb2_grpc
from dkv.services.settings import DecodeSettings
from dkv.services.shards import open_store
from dkv.workers.compression import compress
from dkv.workers.decode_worker import DecodeWorker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEXT = "The river bends twice before it reaches the old mill, where the miller keeps three grey cats. " * 20


def first_token_ms(stub, key: str, query: list[int]) -> float:
    request = decode_pb2.DecodeRequest(keys=[key], max_new_tokens=1)
    request.query_ids.ids.extend(query)
    started = time.perf_counter()
    replies = list(stub.Decode(request, timeout=120))
    assert replies[0].HasField("token")
    return (time.perf_counter() - started) * 1e3


def test_7_a_decode_cancelled_after_one_token_stops_within_a_step_and_the_next_ttft_is_an_idle_ones(
    smollm2, store_service
):
    model, tokenizer = smollm2
    store = store_service()
    client = open_store(store.address, timeout_s=120)
    worker = DecodeWorker(model, tokenizer, client)
    server = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    channel = grpc.insecure_channel(server.address)
    try:
        stub = decode_pb2_grpc.DecodeStub(channel)
        ids = tokenizer(TEXT).input_ids
        key = str(client.put(compress(model, torch.tensor([ids]), "full", ratio=0.0).cast(torch.float16)).key)
        query = tokenizer("\nHow many cats does the miller keep?", add_special_tokens=False).input_ids
        idle = statistics.median(first_token_ms(stub, key, query) for _ in range(3))

        tried = cancelled = 0
        after = []
        for _ in range(3):
            request = decode_pb2.DecodeRequest(keys=[key], max_new_tokens=512, ignore_eos=True)
            request.query_ids.ids.extend(query)
            call = stub.Decode(request, timeout=300)
            tried += 1
            assert next(call).HasField("token")
            stream = worker.engine.batch.streams[0]
            call.cancel()
            at_cancel = stream.produced
            deadline = time.monotonic() + 30
            while worker.engine.active and time.monotonic() < deadline:
                time.sleep(0.002)
            assert worker.engine.active == 0
            assert stream.produced <= at_cancel + 1  # it left at the next step boundary
            cancelled += stream.produced < 512
            after.append(first_token_ms(stub, key, query))
        busy = statistics.median(after)
        print(
            f"[figures] scenario 7: {tried} decodes of 512 tokens cancelled after their first token, "
            f"{cancelled} stopped within one step; next TTFT {busy:.0f} ms vs idle {idle:.0f} ms; wrong 0"
        )
        assert cancelled == tried
        assert busy <= 1.2 * idle + 25  # +25 ms: scheduling noise of a shared machine
    finally:
        channel.close()
        server.stop()
