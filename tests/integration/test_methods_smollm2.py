"""The compression methods on the real SmolLM2-135M-Instruct: a passkey retrieval test.

The context is ~600 tokens of repeated filler with "The pass key is 71432. Remember it." at 15%
depth, beyond StreamingLLM's recent window. Each method must keep a passkey that StreamingLLM at
the same ratio, in the same mode, loses. ``SETTINGS`` gives each method the setting in which it
does on this model:

- query-agnostic (the question comes after the cached context, as with a store entry reused by
  other questions): TOVA and LagKV keep the key at ratio 0.75;
- query-aware (the question is in the compressed context, SnapKV's own evaluation): DynamicKV at
  0.75; SnapKV, CAKE and PyramidKV with a 16-query window (their defaults, 64 and 32, read mostly
  filler) and K-norm at 0.5; PyramidKV also needs one token set shared by the KV heads.

Query-agnostic, every observation-window scorer loses the key at 0.75 and 0.5 on this 135M model,
as kvpress's implementations do (``bench/quality.py`` compares them task by task): the model needs
the passkey tokens in nearly every KV head, and a window of filler does not point at them. H2O
keeps it in no setting we tried (``xfail`` with the reason, reported by ``-ra``).
"""

from __future__ import annotations

import pytest
import torch

from dkv.workers.cache import to_hf_cache
from dkv.workers.compression import compress
from dkv.workers.methods import METHODS

pytestmark = pytest.mark.slow

PASSKEY = "71432"
RATIO = 0.75
NEW_TOKENS = 10
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
_AGNOSTIC = (
    "query-agnostic window: the last 64 queries read repeated filler and attend to sinks, neighbours and "
    "earlier filler copies, so the passkey sentence is kept in only some KV heads; this model needs it in "
    "nearly all of them"
)
KNOWN_FAILURES = {
    # Measured on this prompt (docs/benchmarks.md, "H2O and the passkey"): of the key's 5 digit tokens,
    # H2O keeps 1.5-2.1 per KV head at ratio 0.5 and 2.4-3.0 even at 0.25; 4-22 of the 90 heads keep
    # all five. The digits are read only by the tokens right after them; accumulated attention goes to
    # sinks, punctuation and the filler repeated everywhere.
    "h2o": "accumulated attention keeps too few of the key's digits (1.5-3 of 5 per KV head at ratio 0.25-0.5); "
    "no setting tried (ratio 0.25-0.75, query-aware or not, recent_fraction 0.2-0.5, attention "
    "normalized by the queries that see each token) keeps the key",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared CPU, spinning OpenMP threads made this module 5-10x slower (a
    600-token prefill took 11 s instead of 2.4 s); a 135M model gains little from a second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    from dkv.workers.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def passkey(smollm2):
    """``(context_ids [1, ~600], full_ids [1, context + question])``."""
    _, tok = smollm2
    parts = [FILLER] * 22
    parts.insert(3, f"The pass key is {PASSKEY}. Remember it. ")  # 15% depth
    context = PREAMBLE + "".join(parts)
    text = tok.apply_chat_template(
        [{"role": "user", "content": context + "\n\nWhat is the pass key?"}], tokenize=False, add_generation_prompt=True
    )
    cut = text.index(context) + len(context)
    ctx = tok(text[:cut], return_tensors="pt", add_special_tokens=False).input_ids
    question = tok(text[cut:], return_tensors="pt", add_special_tokens=False).input_ids
    assert 550 <= ctx.shape[1] <= 650
    return ctx, torch.cat([ctx, question], dim=1)


def _answer(smollm2, ids, entry=None) -> tuple[torch.Tensor, str]:
    model, tok = smollm2
    kwargs = {} if entry is None else {"cache": to_hf_cache(entry)}
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)[0, ids.shape[1] :]
    return out, tok.decode(out, skip_special_tokens=True)


def test_full_entry_continues_exactly_like_generate(smollm2, passkey):
    ctx, ids = passkey
    plain, text = _answer(smollm2, ids)
    assert PASSKEY in text, f"the uncompressed model must find the key, said {text!r}"
    cached, _ = _answer(smollm2, ids, compress(smollm2[0], ctx, "full"))
    assert cached.tolist() == plain.tolist()


def test_streaming_llm_loses_the_passkey(smollm2, passkey):
    ctx, ids = passkey
    _, text = _answer(smollm2, ids, compress(smollm2[0], ctx, "streaming_llm", RATIO))
    assert PASSKEY not in text, "the key sits outside StreamingLLM's sinks and recent window"


# How each method keeps the key on this 135M model (found by sweeping ratio, window and head sharing;
# the quality benchmark has the full picture). "aware": the question is part of the compressed
# context, as in SnapKV's own evaluation, so a short observation window reads it.
SETTINGS = {
    "tova": dict(aware=False, ratio=0.75),
    "lagkv": dict(aware=False, ratio=0.75),
    "dynamickv": dict(aware=True, ratio=0.75),
    "snapkv": dict(aware=True, ratio=0.5, window_size=16),
    "cake": dict(aware=True, ratio=0.5, window_size=16),
    "knorm": dict(aware=True, ratio=0.5),
    "pyramidkv": dict(aware=True, ratio=0.5, window_size=16, share_heads=True),
    "h2o": dict(aware=True, ratio=0.5),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True)) if n in KNOWN_FAILURES else n
        for n in sorted(set(METHODS) - {"full", "streaming_llm"})
    ],
)
def test_method_keeps_a_passkey_that_streaming_llm_loses(smollm2, passkey, name):
    ctx, ids = passkey
    setting = dict(SETTINGS[name])
    aware, ratio = setting.pop("aware"), setting.pop("ratio")
    cached = ids[:, :-1] if aware else ctx  # query-aware: all but the last token is compressed
    _, baseline = _answer(smollm2, ids, compress(smollm2[0], cached, "streaming_llm", ratio))
    assert PASSKEY not in baseline, f"streaming_llm at {ratio} ({'aware' if aware else 'agnostic'}) kept the key"
    entry = compress(smollm2[0], cached, name, ratio, **setting)
    assert sum(entry.kept_tokens()) <= round(cached.shape[1] * (1 - ratio)) * entry.num_layers * entry.num_kv_heads
    _, text = _answer(smollm2, ids, entry)
    assert PASSKEY in text, f"{name} at ratio {ratio} with {setting} answered {text!r}"
