"""The gateway's OpenAI-compatible HTTP API, driven by the official ``openai`` client over loopback.

Store, prefill, decode and the gateway run in this process (the real SmolLM2), the gateway with
``http_port`` and bearer tokens. The decode worker runs one stream and queues one more, so a third
request is refused (429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import threading
import time
from types import SimpleNamespace

import httpx2
import openai
import pytest
from in_process import InProcessServer

from dkv.kvstore.recipe import DEFAULT_RECIPE, Recipe
from dkv.services.client import DkvClient
from dkv.services.decode_server import DecodeServer
from dkv.services.gateway import INLINE_TEXT
from dkv.services.gateway_server import GatewayServer
from dkv.services.http_api import RecipeFields
from dkv.services.prefill_client import PrefillClient
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import DecodeSettings, GatewaySettings, PrefillSettings
from dkv.services.shards import open_store
from dkv.services.transport import free_port
from dkv.workers.decode_worker import DecodeWorker
from dkv.workers.prefill import PrefillWorker
from dkv.workers.prompts import chat_prompt, completion_prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m"
SERVICE_TOKEN, TENANT_TOKEN = "service-token", "acme-token"
DOCUMENT = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried on the island. Its keeper, Elsa "
    "Brandt, kept a log of every ship that passed, and in the winter of 1893 she rowed out alone to rescue "
    "the crew of the schooner Maren. The light was electrified in 1931 and automated in 1978; since then the "
    "keeper's cottage has been a museum of the island's fishing fleet. "
) * 6
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def cluster(smollm2):
    """Store, prefill, decode and the gateway (also on HTTP, with tokens) in this process."""
    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import StoreServer

    model, tokenizer = smollm2
    store = InProcessServer(StoreServer(StoreSettings(port=0, cpu_bytes=256 << 20)))
    prefill = InProcessServer(
        PrefillServer(
            PrefillSettings(port=0), PrefillWorker(model, tokenizer, open_store(store.address, timeout_s=120))
        )
    )
    recompute = PrefillClient(prefill.address)
    worker = DecodeWorker(
        model, tokenizer, open_store(store.address, timeout_s=120), recompute.keys, max_active=1, max_queued=1
    )
    decode = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    gateway = gateway_server(
        prefill=prefill.address,
        decode=decode.address,
        store=store.address,
        auth_token=SERVICE_TOKEN,
        tenant_tokens=f"acme={TENANT_TOKEN}",
    )
    yield SimpleNamespace(
        gateway=gateway, store=store, prefill=prefill, worker=worker, model=model, tokenizer=tokenizer
    )
    for server in (gateway, decode, prefill, store):
        server.stop()
    recompute.close()


def gateway_server(**settings) -> InProcessServer:
    return InProcessServer(GatewayServer(GatewaySettings(port=0, http_port=free_port(), **settings)))


def base_url(gateway: InProcessServer, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{gateway.server.http.port}/v1"


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=base_url(cluster.gateway), api_key=SERVICE_TOKEN, max_retries=0, timeout=300) as client:
        yield client


def ask(question: str) -> list[dict]:
    return [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}]


def test_models_and_health(cluster, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx2.get(base_url(cluster.gateway).removesuffix("/v1") + "/health").json() == {"status": "ok"}  # no token


def test_chat_streams_the_same_text_it_answers_whole(cluster, client):
    messages = ask("When was the lighthouse automated?")
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    context, query = chat_prompt(cluster.tokenizer, messages)
    assert whole.usage.prompt_tokens == len(context) + len(query)
    assert 1 <= whole.usage.completion_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.model_extra["dkv"]["context_tokens"] == len(context)

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == len(context)  # the same context again: all of it cached


def test_completions_stream_the_same_text_they_answer_whole(cluster, client):
    prompt = DOCUMENT * 2 + "\nThe keeper who rowed out to the Maren was"  # long: tokenized off the event loop
    assert len(prompt) > INLINE_TEXT
    ids = cluster.tokenizer(prompt, add_special_tokens=False).input_ids
    whole = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert whole.choices[0].text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL, prompt=prompt, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert client.completions.create(model=MODEL, prompt=ids, **GREEDY).choices[0].text == whole.choices[0].text


def test_a_second_turn_reuses_the_first_turn_s_entries(cluster, client):
    first = [
        {"role": "system", "content": DOCUMENT.replace("1871", "1869")},  # a context no other test cached
        {"role": "user", "content": "Who was the keeper?"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=first, **GREEDY)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    second = first + [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And when was the light electrified?"},
    ]
    again = client.chat.completions.create(model=MODEL, messages=second, **GREEDY)
    first_context, _ = chat_prompt(cluster.tokenizer, first)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 256 <= cached <= len(first_context)  # the whole chunks of the first turn's context
    assert again.model_extra["dkv"]["cached_prefix_tokens"] == cached


def test_developer_messages_and_text_parts_are_what_they_say(client):
    plain = client.chat.completions.create(model=MODEL, messages=ask("Who rowed out\nto the schooner?"), **GREEDY)
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": DOCUMENT},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Who rowed out"}, {"type": "text", "text": "to the schooner?"}],
            },
        ],
        **GREEDY,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_http_and_grpc_give_the_same_greedy_text(cluster, client):
    messages = ask("What is the keeper's cottage now?")
    over_http = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, extra_body={"recipe": {"ratio": 0.25}}
    )
    prompt = "Granite from the island was used to build"
    completion = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    with DkvClient(cluster.gateway.address, token=SERVICE_TOKEN) as dkv:
        text, _ = dkv.ask(
            *chat_prompt(cluster.tokenizer, messages),
            max_new_tokens=12,
            recipe=dataclasses.replace(DEFAULT_RECIPE, ratio=0.25),
        )  # fields left out: the default's
        assert text == over_http.choices[0].message.content
        text, _ = dkv.ask(*completion_prompt(cluster.tokenizer, prompt), max_new_tokens=12)
        assert text == completion.choices[0].text
        # a recipe that names its method is its own, as over gRPC: the default's int4 is not added to it
        whole = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=12, extra_body={"recipe": {"method": "full"}}
        )
        text, _ = dkv.ask(
            *completion_prompt(cluster.tokenizer, prompt), max_new_tokens=12, recipe=Recipe(method="full")
        )
        assert text == whole.choices[0].text


def test_a_recipe_without_method_adjusts_the_default_and_one_with_method_is_its_own():
    assert RecipeFields(ratio=0.25).recipe() == dataclasses.replace(DEFAULT_RECIPE, ratio=0.25)
    assert RecipeFields(method="full").recipe() == Recipe(method="full")
    assert RecipeFields(method="snapkv", ratio=0.5, params={"window": 8}).recipe() == Recipe(
        method="snapkv", ratio=0.5, params=(("window", 8),)
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": 5}, "temperature: Input should be less than or equal to 2"),
        ({"n": 2}, "n must be 1"),
        ({"extra_body": {"selecton": "pages"}}, "selecton: unknown field"),
        ({"extra_body": {"selection": "nope"}}, "unknown selection 'nope'"),
        ({"extra_body": {"recipe": {"ratio": 1.5}}}, "recipe ratio 1.5 must be in [0, 1)"),
        ({"extra_body": {"recipe": {"method": "no-such-method"}}}, "no-such-method"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            "the last message must be the user's",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role: Input should be"),
        ({"max_tokens": 9000}, "is more than the model's 8192"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.list[TextPart].0.type: Input should be 'text'",
        ),
    ],
)
def test_bad_requests_get_400_with_a_message(client, fields, message):
    request = {"model": MODEL, "messages": ask("Who built it?"), "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**request)
    assert refused.value.status_code == 400
    assert message in refused.value.message, refused.value.message


def test_bad_json_and_bad_bodies_get_400_not_422(cluster):
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}", "Content-Type": "application/json"}
    url = base_url(cluster.gateway)
    reply = httpx2.post(url + "/chat/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    reply = httpx2.post(url + "/completions", json={"model": MODEL}, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"] == {
        "message": "prompt: Field required",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": None,
    }
    reply = httpx2.post(url + "/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
    assert reply.status_code == 400 and "needs at least 2" in reply.json()["error"]["message"]
    reply = httpx2.post(url + "/completions", json={"model": MODEL, "prompt": "x" * ((1 << 20) + 1)}, headers=headers)
    assert reply.status_code == 400 and "tokenizes at most 1048576 (max_text_bytes)" in reply.json()["error"]["message"]
    reply = httpx2.post(url + "/completions", content=b"x" * (9 << 20), headers=headers)
    assert reply.status_code == 413 and "over 8 MiB" in reply.json()["error"]["message"]
    reply = httpx2.get(url + "/no-such-route", headers=headers)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"


def test_tokens_tenants_and_models(cluster):
    url = base_url(cluster.gateway)
    with openai.OpenAI(base_url=url, api_key="wrong-token", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model=MODEL, messages=ask("Who?"), max_tokens=2)
        assert refused.value.status_code == 401 and "invalid bearer token" in refused.value.message
    reply = httpx2.post(url + "/chat/completions", json={"model": MODEL, "messages": ask("Who?")})  # no token
    assert reply.status_code == 401 and "missing bearer token" in reply.json()["error"]["message"]
    with openai.OpenAI(base_url=url, api_key=TENANT_TOKEN, max_retries=0) as tenant:
        assert tenant.chat.completions.create(model=MODEL, messages=ask("Who?"), **GREEDY).choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as refused:
            tenant.chat.completions.create(
                model=MODEL, messages=ask("Who?"), max_tokens=2, extra_body={"tenant": "beta"}
            )
        assert refused.value.status_code == 403 and "acts for tenant 'acme'" in refused.value.message
        with pytest.raises(openai.NotFoundError) as refused:
            tenant.chat.completions.create(model="gpt-4o", messages=ask("Who?"), max_tokens=2)
        assert refused.value.status_code == 404 and "use 'smollm2-135m'" in refused.value.message


LONG = {
    "model": MODEL,
    "messages": ask("Tell me everything."),
    "max_tokens": 400,
    "temperature": 0,
    "extra_body": {"ignore_eos": True},
}


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_full_decode_queue_is_429_and_a_client_that_goes_away_ends_its_generation(cluster, client):
    engine = cluster.worker.engine
    stream = client.chat.completions.create(stream=True, **LONG)
    next(stream), next(stream)  # it holds the worker's one row
    waiting = []  # and this one its one queued place
    queued = threading.Thread(
        target=lambda: waiting.append(client.chat.completions.create(**{**LONG, "max_tokens": 4}))
    )
    queued.start()
    wait_until(lambda: engine.queued == 1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**{**LONG, "max_tokens": 4})
    assert refused.value.status_code == 429 and "RESOURCE_EXHAUSTED" in refused.value.message
    stream.close()  # the client goes away mid-stream: its row frees, the queued request gets it
    queued.join(120)
    assert waiting[0].usage.completion_tokens == 4
    wait_until(lambda: engine.active == 0 and engine.queued == 0, 15)


def test_a_worker_failing_mid_stream_is_the_stream_s_last_event(cluster):
    """The status line (200) is out once the first token is: a later failure is one last event."""
    worker = DecodeWorker(cluster.model, cluster.tokenizer, open_store(cluster.store.address, timeout_s=120))
    decode = InProcessServer(DecodeServer(DecodeSettings(port=0), worker))
    gateway = gateway_server(prefill=cluster.prefill.address, decode=decode.address)
    body = {**{k: v for k, v in LONG.items() if k != "extra_body"}, **LONG["extra_body"], "stream": True}
    try:
        with httpx2.stream("POST", base_url(gateway) + "/chat/completions", json=body, timeout=300) as reply:
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
            lines = (line for line in reply.iter_lines() if line.startswith("data:"))
            assert json.loads(next(lines)[5:])["choices"][0]["delta"]["role"] == "assistant"
            decode.stop()  # the decode worker goes away mid-stream
            events = [line[5:].strip() for line in lines]
    finally:
        gateway.stop()
        decode.stop()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] in ("service_unavailable", "worker_error") and "a worker answered" in error["message"]


def test_health_turns_503_while_the_gateway_drains(cluster):
    gateway = gateway_server(prefill=cluster.prefill.address, decode="127.0.0.1:1")
    health = base_url(gateway).removesuffix("/v1") + "/health"
    try:
        assert httpx2.get(health).status_code == 200
        stopping = asyncio.run_coroutine_threadsafe(gateway.server.stop(0, drain_delay_s=2), gateway.loop)
        wait_until(lambda: gateway.server.draining, 5)
        reply = httpx2.get(health)
        assert reply.status_code == 503 and reply.json() == {"status": "stopping"}
        stopping.result(30)
        with pytest.raises(httpx2.ConnectError):  # then it stops listening
            httpx2.get(health)
    finally:
        gateway.stop()


def test_tls_and_client_certificates_apply_to_http(cluster, pki):
    gateway = gateway_server(
        prefill=cluster.prefill.address,
        decode="127.0.0.1:1",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_ca=pki["ca"],
    )
    try:
        url = base_url(gateway, "https")
        with_certificate = ssl.create_default_context(cafile=pki["ca"])
        with_certificate.load_cert_chain(pki["client_cert"], pki["client_key"])
        with openai.OpenAI(
            base_url=url, api_key="unused", max_retries=0, http_client=httpx2.Client(verify=with_certificate)
        ) as client:
            assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(httpx2.HTTPError):  # no client certificate
            httpx2.get(url + "/models", verify=ssl.create_default_context(cafile=pki["ca"]))
        with pytest.raises(httpx2.HTTPError):  # plain HTTP
            httpx2.get(base_url(gateway) + "/models")
    finally:
        gateway.stop()
