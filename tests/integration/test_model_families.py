"""Beyond SmolLM2: random-weight Llama (head_dim 128, GQA 8:1), Qwen2 (q/k/v biases) and Mistral
models, saved as Hugging Face folders with SmolLM2's tokenizer, through prefill -> store -> decode.

In process (``compress`` + ``generate``, the public entry points) and through the real gRPC
services loading the folder themselves (store, prefill, decode, gateway over loopback). The
``full`` recipe must continue exactly like plain ``model.generate``; a compressed recipe must run
and keep the tokens it promises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from in_process import serving
from model_fixtures import FAMILIES, random_model_folder

from dkv.kvstore.entry import Recipe
from dkv.services.client import DkvClient
from dkv.services.prefill_server import PrefillServer
from dkv.services.settings import PrefillSettings
from dkv.workers.cache import to_hf_cache
from dkv.workers.compression import compress
from dkv.workers.decode import generate
from dkv.workers.model import load_model, model_info
from dkv.workers.model_source import ModelError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONTEXT = (
    "The committee met on Tuesday to review the budget for the new library. Members discussed the cost of "
    "shelving, the hours of the reading room and a plan to lend laptops to students. "
) * 3
OTHER_CONTEXT = (
    "A storm closed the harbour for three days; the ferry to the island stayed at the pier and the "
    "fishermen mended their nets in the sheds. "
) * 3
QUERY = "\nWhat did the committee discuss?"
NEW_TOKENS = 12
SHAPES = {  # family -> (layers, query heads, KV heads, head dim)
    "llama": (2, 8, 1, 128),
    "qwen2": (2, 4, 2, 64),
    "mistral": (2, 4, 2, 64),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, random_models):
    """(family, folder, model, tokenizer): the folder loaded by ``load_model``, as a worker loads it."""
    folder = random_models[request.param]
    model, tokenizer = load_model(str(folder), dtype="float32", device="cpu")
    return request.param, folder, model, tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def plain_generate(model, context: list[int], query: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    full = torch.tensor([context + query])
    return model.generate(full, max_new_tokens=new_tokens, do_sample=False)[0, full.shape[1] :].tolist()


def test_the_folder_loads_with_its_family_shape(family):
    name, _, model, _ = family
    info = model_info(model)
    assert (info.num_layers, info.num_q_heads, info.num_kv_heads, info.head_dim) == SHAPES[name]
    attention = model.model.layers[0].self_attn
    has_bias = attention.k_proj.bias is not None
    assert has_bias == (name == "qwen2")  # Qwen2's K (and so the cache) carries a bias term
    assert model.config._attn_implementation == "dkv"


def test_full_recipe_continues_like_plain_generation(family):
    _, _, model, tokenizer = family
    context, query = ids(tokenizer, CONTEXT), ids(tokenizer, QUERY)
    entry = compress(model, torch.tensor([context]), "full")
    info = model_info(model)
    assert (entry.num_layers, entry.num_kv_heads, entry.head_dim) == (info.num_layers, info.num_kv_heads, info.head_dim)
    with torch.no_grad():  # the cache is the context's: the query's logits match a plain forward
        cached = model(torch.tensor([query]), cache=to_hf_cache(entry)).logits[0, -1]
        plain = model(torch.tensor([context + query])).logits[0, -1]
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)
    expected = plain_generate(model, context, query)
    assert len(set(expected)) > 1, "the random model repeats one token: the check below would prove little"
    assert generate(model, tokenizer, entry, torch.tensor([query]), NEW_TOKENS) == expected
    other = compress(model, torch.tensor([ids(tokenizer, OTHER_CONTEXT)]), "full")
    assert generate(model, tokenizer, other, torch.tensor([query]), NEW_TOKENS) != expected  # the check can fail


@pytest.mark.parametrize("selection, budget", [("dense", None), ("pages", 32)])
def test_a_compressed_recipe_runs_and_keeps_what_it_promises(family, selection, budget):
    _, _, model, tokenizer = family
    context, query = ids(tokenizer, CONTEXT), ids(tokenizer, QUERY)
    entry = compress(model, torch.tensor([context]), "snapkv", ratio=0.5, quant="int4")
    info = model_info(model)
    assert (entry.num_layers, entry.num_kv_heads, entry.head_dim, entry.seq_len) == (
        info.num_layers,
        info.num_kv_heads,
        info.head_dim,
        len(context),
    )
    keep = round(len(context) * 0.5)
    for layer in entry.layers:
        assert layer.head_counts().tolist() == [keep] * info.num_kv_heads
        assert layer.positions.max() < len(context)
    tokens = generate(model, tokenizer, entry, torch.tensor([query]), NEW_TOKENS, selection, budget)
    assert 1 <= len(tokens) <= NEW_TOKENS and all(0 <= t < info.vocab_size for t in tokens)


def test_through_the_grpc_services(family, store_service):
    """The services load the folder from their settings, as ``dkv prefill serve --model DIR`` does."""
    _, folder, model, tokenizer = family
    context, query = ids(tokenizer, CONTEXT), ids(tokenizer, QUERY)
    expected = tokenizer.decode(plain_generate(model, context, query), skip_special_tokens=True)
    assert expected.strip()
    with serving(str(folder), store_service().address) as gateway, DkvClient(gateway) as client:
        text, first = client.ask(context, query, recipe=Recipe(method="full"), max_new_tokens=NEW_TOKENS)
        assert text == expected
        assert not first.cache_hit and first.prefilled_tokens == len(context)
        text, again = client.ask(context, query, recipe=Recipe(method="full"), max_new_tokens=NEW_TOKENS)
        assert text == expected and again.cache_hit and again.prefilled_tokens == 0
        recipe = Recipe(method="snapkv", ratio=0.5, quant="int4", chunk_size=64, chunked=True)
        text, compressed = client.ask(
            context, query, recipe=recipe, selection="pages", budget=32, max_new_tokens=NEW_TOKENS
        )
        assert text and compressed.prefilled_tokens == len(context)
        assert compressed.entry_bytes < first.entry_bytes / 2  # half the tokens at 4 bits


def test_unsupported_architectures_are_refused_at_start(tmp_path, random_models):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dkv.workers.model import load_tokenizer

    tokenizer = load_tokenizer(str(random_models["llama"]))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=2)).save_pretrained(str(gpt2))
    tokenizer.save_pretrained(str(gpt2))
    with pytest.raises(ModelError, match=r"model type 'gpt2' is not supported; .*: llama, mistral, qwen2"):
        PrefillServer(PrefillSettings(port=0, model=str(gpt2), device="cpu"))
    windowed = random_model_folder("mistral", tmp_path / "mistral-v0.1", tokenizer, sliding_window=16)
    with pytest.raises(ModelError, match=r"sliding-window attention \(sliding_window=16\) is not supported"):
        load_model(str(windowed))


def test_a_repo_id_is_found_in_the_local_hugging_face_cache(tmp_path, random_models):
    """The Hugging Face cache layout (models--ORG--NAME/refs/main -> snapshots/<commit>/), as
    `hf download` leaves it; resolved with HF_HUB_CACHE in a fresh process, never downloaded."""
    repo = tmp_path / "hub" / "models--dkv-tests--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(random_models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    probe = (
        "import json, sys; from dkv.workers.model_source import resolve_model\n"
        "for name in sys.argv[1:]:\n"
        "    try: print(json.dumps(['ok', str(resolve_model(name).path)]))\n"
        "    except ValueError as e: print(json.dumps(['error', str(e)]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe, "dkv-tests/tiny-llama", "dkv-tests/not-there"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found, missing = (json.loads(line) for line in out.stdout.splitlines())
    assert found == ["ok", str((repo / "snapshots" / commit).resolve())]
    assert missing[0] == "error" and "not-there" in missing[1] and "never downloads" in missing[1]
    assert not (tmp_path / "hub" / "models--dkv-tests--not-there" / "snapshots").exists()
    model, tokenizer = load_model(found[1])
    assert model_info(model).head_dim == 128
