"""dkv.workers.model against the real SmolLM2-135M-Instruct GGUF (no network, nothing downloaded).

The GGUF is converted exactly once in this module, into a temporary cache that every test here
shares (``converted``); the conversion test then loads that cache again and compares.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time

import pytest
import torch

from dkv.workers.model import (
    _source_matches,
    load_model,
    model_fingerprint,
    model_info,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from dkv.workers.model_source import MODELS, ModelError

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(model, tokenizer, seconds, cache root, log messages): SmolLM2 converted into an empty cache."""
    cache = tmp_path_factory.mktemp("dkv-model-cache")
    logger, records = logging.getLogger("dkv.model"), _Records()
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DKV_MODEL_CACHE", str(cache))
            start = time.perf_counter()
            model, tokenizer = load_model("smollm2-135m")
            seconds = time.perf_counter() - start
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    return model, tokenizer, seconds, cache, records.messages


@pytest.fixture
def cache_env(converted, monkeypatch):
    """Point DKV_MODEL_CACHE at the module's cache for one test."""
    monkeypatch.setenv("DKV_MODEL_CACHE", str(converted[3]))
    return converted[3]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_conversion_is_cached_and_identical(converted, cache_env, caplog):
    model, tokenizer, convert_seconds, cache, messages = converted
    # a line before the long conversion says what is happening, one after says how long it took
    assert messages[0].startswith("converting ") and "once: cached at" in messages[0], messages
    assert any(m.startswith("converted GGUF") for m in messages[1:]), messages
    source = json.loads((cache / "smollm2-135m" / "dkv_source.json").read_text())
    gguf = MODELS["smollm2-135m"].locate()
    assert source["size"] == gguf.stat().st_size and re.fullmatch(r"[0-9a-f]{32}", source["blake2b"])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    caplog.set_level(logging.INFO, logger="dkv.model")
    start = time.perf_counter()
    cached, cached_tok = load_model("smollm2-135m")
    cached_seconds = time.perf_counter() - start
    print(f"\nGGUF conversion {convert_seconds:.1f} s, cached load {cached_seconds:.2f} s")
    assert "from cache" in caplog.text
    assert cached_seconds < convert_seconds / 3
    assert torch.equal(_logits(model, tokenizer), _logits(cached, cached_tok))
    assert model_fingerprint(model, tokenizer) == model_fingerprint(cached, cached_tok)


def test_a_gguf_file_is_converted_once_then_loaded_from_the_cache(converted, cache_env, caplog):
    """``dkv up --model FILE.gguf`` calls prepare_model in the parent before it starts the workers,
    whose load_model then only reads the cache."""
    gguf = MODELS["smollm2-135m"].locate()
    caplog.set_level(logging.INFO, logger="dkv.model")
    source = prepare_model(str(gguf))  # a path, not the registered name: a cache of its own
    assert (source.kind, source.path) == ("gguf", gguf.resolve())
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"converting {gguf.resolve()}") and messages[-1].startswith("converted GGUF")
    caplog.clear()
    assert prepare_model(str(gguf)) == source and not caplog.records  # converted already: nothing to do
    model, tokenizer = load_model(str(gguf))
    assert "from cache" in caplog.text and "converting" not in caplog.text
    assert torch.equal(_logits(model, tokenizer), _logits(*converted[:2]))


def test_cache_is_rebuilt_when_the_gguf_changes(converted):
    source = json.loads((converted[3] / "smollm2-135m" / "dkv_source.json").read_text())
    gguf = MODELS["smollm2-135m"].locate()
    assert _source_matches(source, gguf)
    # the same bytes with another mtime (the wheel installed in another venv) still match
    assert _source_matches({**source, "mtime_ns": source["mtime_ns"] + 1}, gguf)
    assert not _source_matches({**source, "mtime_ns": source["mtime_ns"] + 1, "blake2b": "0" * 32}, gguf)
    assert not _source_matches({**source, "size": source["size"] - 1}, gguf)
    assert not _source_matches({**source, "format": -1}, gguf)
    assert not _source_matches(None, gguf)


def test_loaded_state(converted):
    model, tokenizer = converted[:2]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "dkv"
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert gen.pad_token_id is not None


def test_other_dtype_same_fingerprint(converted, cache_env):
    model, tokenizer = converted[:2]
    half, half_tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not half.training and not any(p.requires_grad for p in half.parameters())
    assert model_fingerprint(half, half_tok) == model_fingerprint(model, tokenizer)


def test_greedy_generation_knows_paris(converted):
    model, tokenizer = converted[:2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at end of turn

    plain = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(plain, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, plain.shape[1] :])


def test_model_info(converted):
    info = model_info(converted[0])
    assert (info.num_layers, info.num_q_heads, info.num_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert (info.vocab_size, info.max_positions) == (49152, 8192)
    assert info.rope_theta == 100000.0


def test_fingerprint_is_stable(converted):
    model, tokenizer = converted[:2]
    first = model_fingerprint(model, tokenizer)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert model_fingerprint(model, tokenizer) == first == model.dkv_fingerprint


def test_fingerprint_changes_with_weights(converted, cache_env, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer = converted[:2]
    copy_dir = tmp_path / "copy"
    model.save_pretrained(str(copy_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(copy_dir))
    same, same_tok = load_model(str(copy_dir))
    before = model_fingerprint(same, same_tok)
    assert json.loads((cache_env / "weight_hashes.json").read_text())  # file hash remembered

    weights = copy_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.self_attn.k_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    stat = weights.stat()  # same size; make sure the mtime moves even on a coarse clock
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    changed, changed_tok = load_model(str(copy_dir))
    assert not torch.equal(_logits(same, same_tok), _logits(changed, changed_tok))
    after = model_fingerprint(changed, changed_tok)
    assert after != before
    assert after != model_fingerprint(model, tokenizer)


def test_fingerprint_changes_with_tokenizer(converted):
    model, tokenizer = converted[:2]
    original = model_fingerprint(model, tokenizer)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<dkv_test_token>"])
    assert model_fingerprint(model, other) != original
    assert model_fingerprint(model, tokenizer) == original


def test_fingerprint_of_a_model_not_loaded_by_dkv(converted):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = converted[1]
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    a = LlamaForCausalLM(config)
    torch.manual_seed(0)
    b = LlamaForCausalLM(config)
    assert model_fingerprint(a, tokenizer) == model_fingerprint(b, tokenizer)
    torch.manual_seed(0)
    c = LlamaForCausalLM(config)
    with torch.no_grad():
        c.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(c, tokenizer) != model_fingerprint(a, tokenizer)


def test_unknown_name_is_refused():
    with pytest.raises(ModelError, match="smollm2-135m") as info:
        load_model("llama-3-70b")
    assert "never downloaded" in str(info.value)


def test_non_llama_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelError, match="'gpt2' is not supported"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "has no config.json"),
        ({"config.json": "[1, 2]"}, "is not a JSON object with a model_type"),
        ({"config.json": '{"model_type": "llama"}'}, r"has no weights \(\*.safetensors or \*.bin\)"),
        ({"config.json": '{"model_type": "llama"}', "model.safetensors": ""}, "has no tokenizer"),
    ],
)
def test_an_incomplete_folder_is_refused_before_loading(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelError, match=message):
        load_model(str(tmp_path))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="is a file but not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="is not a readable GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))


def test_an_absent_gpu_is_refused_with_what_to_use():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal of an absent one cannot be seen here")
    with pytest.raises(ModelError, match="asked for a CUDA GPU but torch .* sees none.*use device cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ModelError, match="not one of cpu, cuda, cuda:N, auto"):
        resolve_device("tpu:0")
