"""Models for tests (import the fixtures into conftest.py).

``smollm2``: the real SmolLM2-135M-Instruct, shared by the session. It uses the default
conversion cache (``$DKV_MODEL_CACHE`` or ``~/.cache/dkv/models``), so only the first session on
a machine pays the ~30 s GGUF conversion; later ones load in about a second.

``random_models``: small random-weight models of each supported family, saved as Hugging Face
folders with SmolLM2's tokenizer, as a user's own model would be (``random_model_folder``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Small, but with the shapes that differ between families: Llama with head_dim 128 and 8 query
# heads per KV head, Qwen2 with biases on q/k/v, Mistral without a sliding window (v0.2 and later).
# initializer_range 0.1: random models then answer with varied tokens that depend on the context
# (at the default 0.02 they repeat one token whatever the context, and greedy checks prove little).
FAMILIES = {
    "llama": ("LlamaConfig", {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128}),
    "qwen2": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}),
}


def random_model_folder(family: str, directory: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer random-weight ``family`` model and ``tokenizer`` into ``directory``."""
    import transformers

    config_class, shape = FAMILIES[family]
    config = getattr(transformers, config_class)(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "initializer_range": 0.1,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **shape,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, float32 on CPU; shared, so do not modify it."""
    from dkv.workers.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def random_models(tmp_path_factory) -> dict[str, Path]:
    """Family name -> folder of its random-weight model (``FAMILIES``), built once per session."""
    from dkv.workers.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("random-models")
    return {family: random_model_folder(family, root / family, tokenizer) for family in FAMILIES}
