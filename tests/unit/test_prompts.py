"""How OpenAI prompts become (context, query) token ids (``workers.prompts``), with SmolLM2's real tokenizer."""

from __future__ import annotations

import copy

import pytest

from dkv.workers.model import load_tokenizer
from dkv.workers.prompts import chat_prompt, completion_prompt, encode


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def rendered(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


CHAT = [
    {"role": "system", "content": "You answer questions about the harbour log."},
    {"role": "user", "content": "Which ship came in first?"},
    {"role": "assistant", "content": "The Maren, at dawn."},
    {"role": "user", "content": "\n\nAnd which one left last?"},  # leading newlines: a token that could merge
    {"role": "assistant", "content": "The Tern.\n"},
    {"role": "user", "content": "Thanks!"},
]


def test_each_turn_s_context_starts_with_the_last_turn_s(tokenizer):
    contexts = []
    for end in (2, 4, 6):  # three turns of one chat
        context, query = chat_prompt(tokenizer, CHAT[:end])
        assert tokenizer.decode(context + query) == rendered(tokenizer, CHAT[:end])
        # the query is the last user message's text, its end of turn and the assistant's turn
        assert tokenizer.decode(query).startswith(CHAT[end - 1]["content"])
        assert tokenizer.decode(query).endswith("<|im_start|>assistant\n")
        contexts.append(context)
    for shorter, longer in zip(contexts, contexts[1:]):
        assert longer[: len(shorter)] == shorter and len(longer) > len(shorter)


def test_without_a_system_message_the_template_s_default_is_context(tokenizer):
    context, query = chat_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
    assert tokenizer.decode(context).endswith("<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(context)
    assert tokenizer.decode(query) == "Hello<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_the_beginning_still_gives_the_whole_prompt(tokenizer):
    """Where no cut is a prefix of the whole text, the context is all but the last token."""
    counting = copy.deepcopy(tokenizer)
    counting.chat_template = (
        "{{ messages | map(attribute='content') | join | length }} characters\n"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    context, query = chat_prompt(counting, CHAT[:4])
    assert context + query == encode(counting, rendered(counting, CHAT[:4])) and len(query) == 1


def test_a_conversation_the_template_refuses_is_a_value_error(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and loop.first %}"
        "{{ raise_exception('a conversation starts with the user') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="chat template refused these messages: a conversation starts with the user"):
        chat_prompt(strict, [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}])


def test_a_completion_s_context_is_its_prompt_but_the_last_token(tokenizer):
    ids = encode(tokenizer, "The harbour log of 1893 begins")
    assert completion_prompt(tokenizer, "The harbour log of 1893 begins") == (ids[:-1], ids[-1:])
    assert completion_prompt(tokenizer, ids) == (ids[:-1], ids[-1:])
    with pytest.raises(ValueError, match="needs at least 2"):
        completion_prompt(tokenizer, [ids[0]])
