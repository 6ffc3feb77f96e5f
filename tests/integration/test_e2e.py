"""The whole system as a user runs it: ``dkv up`` as a subprocess, Generate over gRPC, chats over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import torch

from dkv.kvstore.entry import Recipe
from dkv.services.client import DkvClient
from dkv.services.transport import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "e2e-token"
DOCUMENT = (
    "The lighthouse on Skerry Point was built in 1871 by the engineer Thomas Pell. Its lamp burned whale "
    "oil until 1904, when the keepers switched to kerosene. The last keeper, Ada Rowe, left in 1962. "
) * 7


@pytest.fixture(scope="module")
def system():
    port = free_port()
    # the answers are compared with this process's CPU float32 model, also on a machine with a GPU
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dkv",
            "up",
            "--port",
            str(port),
            "--http-port",
            str(free_port()),
            "--token",
            TOKEN,
            "--metrics",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "dkv is up: gateway at" in line:
            break
    else:
        proc.kill()
    if proc.poll() is not None or not any("dkv is up" in line for line in lines):
        proc.kill()
        pytest.fail("dkv up did not start:\n" + "".join(lines[-40:]))
    metrics = dict(re.findall(r"started (\w+) .*metrics at (http://\S+/metrics)", "".join(lines)))
    http = re.search(r"OpenAI API at (http://\S+/v1)", lines[-1]).group(1)
    yield f"127.0.0.1:{port}", proc, metrics, http
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_generate_equals_plain_generation_then_hits_the_cache(system, smollm2):
    address, *_ = system
    model, tokenizer = smollm2
    context = tokenizer(DOCUMENT, add_special_tokens=False).input_ids
    query = tokenizer("\nQuestion: Who was the last keeper? Answer:", add_special_tokens=False).input_ids
    full = torch.tensor([context + query])
    plain = model.generate(full, max_new_tokens=12, do_sample=False)[0, full.shape[1] :].tolist()
    expected = tokenizer.decode(plain, skip_special_tokens=True)
    recipe = Recipe(method="full")
    with DkvClient(address, token=TOKEN) as client:
        text, first = client.ask(context, query, recipe=recipe, selection="dense", max_new_tokens=12)
        assert text == expected
        assert not first.cache_hit and first.prefilled_tokens == len(context) and first.ttft_ms > 0
        text_again, second = client.ask(context, query, recipe=recipe, selection="dense", max_new_tokens=12)
        assert text_again == expected
        assert second.cache_hit and second.prefilled_tokens == 0 and second.cached_prefix_tokens == len(context)
        assert second.bytes_fetched_by_tier and second.entry_bytes > 0


def test_a_follow_up_that_extends_the_context_reuses_its_chunks(system):
    address, *_ = system
    with DkvClient(address, token=TOKEN) as client:
        answer, first = client.ask(DOCUMENT, "When was it built?", chat_template=True, max_new_tokens=16)
        follow_up = DOCUMENT + "\n\nWhen was it built?\n" + answer
        _, second = client.ask(follow_up, "Who built it?", chat_template=True, max_new_tokens=16)
        assert first.context_tokens >= 256  # at least one whole chunk to reuse
        assert second.cached_prefix_tokens >= 256 and second.prefilled_tokens < second.context_tokens


def test_bad_requests_get_invalid_argument(system):
    address, *_ = system
    with DkvClient(address, token=TOKEN) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.ask("some context", "a question", selection="nope")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            client.ask("x " * 9000, "a question")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than the model's" in info.value.details()


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))
    }


def test_every_component_wants_the_token_and_reports_metrics(system):
    address, _, metrics, _ = system
    assert sorted(metrics) == ["decode", "gateway", "prefill", "store"]
    with DkvClient(address) as anonymous, pytest.raises(grpc.RpcError) as info:
        anonymous.ask(DOCUMENT, "Who built it?", max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    before = {name: scrape(url) for name, url in metrics.items()}
    with DkvClient(address, token=TOKEN) as client:
        client.ask(DOCUMENT + " Gulls nest on the rocks.", "Who built it?", chat_template=True, max_new_tokens=4)
    after = {name: scrape(url) for name, url in metrics.items()}

    def moved(component: str, name: str) -> float:
        return after[component].get(name, 0.0) - before[component].get(name, 0.0)

    assert moved("gateway", 'dkv_rpc_duration_seconds_count{code="OK",method="Generate",service="gateway"}') == 1
    assert (
        after["gateway"]['dkv_rpc_duration_seconds_count{code="UNAUTHENTICATED",method="Generate",service="gateway"}']
        >= 1
    )
    assert (
        sum(moved("gateway", f'dkv_gateway_ttft_seconds_count{{cache="{c}"}}') for c in ("hit", "partial", "miss")) == 1
    )
    assert moved("prefill", 'dkv_prefill_tokens_total{source="computed"}') > 0
    assert moved("prefill", "dkv_prefill_compression_ratio_count") == 1
    assert moved("decode", "dkv_decode_tokens_total") >= 1
    assert moved("store", "dkv_store_puts_total") >= 1
    assert after["store"]['dkv_store_used_bytes{tier="cpu"}'] > 0


def test_the_openai_api_answers_with_the_same_token(system):
    _, _, metrics, http = system
    before = scrape(metrics["gateway"])
    with openai.OpenAI(base_url=http, api_key=TOKEN, max_retries=0, timeout=300) as client:
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "Who was the last keeper?"}]
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=6)
        assert reply.choices[0].message.content and 1 <= reply.usage.completion_tokens <= 6
    with openai.OpenAI(base_url=http, api_key="not-the-token", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    after = scrape(metrics["gateway"])
    route = 'dkv_http_request_duration_seconds_count{route="/v1/chat/completions",status="200"}'
    assert after[route] - before.get(route, 0.0) == 1
    assert (
        sum(
            after[f'dkv_gateway_ttft_seconds_count{{cache="{c}"}}']
            - before.get(f'dkv_gateway_ttft_seconds_count{{cache="{c}"}}', 0.0)
            for c in ("hit", "partial", "miss")
        )
        == 1
    )


def test_ctrl_c_stops_everything(system):
    _, proc, *_ = system
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 4  # store, prefill, decode, gateway (and redis-server when installed)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"left running: {alive}"
