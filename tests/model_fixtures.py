"""A session-wide SmolLM2 for test modules that need the real model (import into conftest.py).

Uses the default conversion cache (``$DKV_MODEL_CACHE`` or ``~/.cache/dkv/models``), so only the
first session on a machine pays the ~30 s GGUF conversion; later ones load in about a second.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, float32 on CPU; shared, so do not modify it."""
    from dkv.workers.model import load_model

    return load_model("smollm2-135m")
