"""Prompts of the OpenAI API as the gateway's (context, query) token ids.

The context is what the store caches and later prompts reuse; the query is decoded on top of it.
For reuse, a later prompt's context must start with an earlier prompt's context token for token
(the store keys entries by chained hashes of token chunks), so where a prompt is cut matters:

- a chat is rendered with the model's chat template and cut where the last user message's text
  begins (its turn header, and every earlier turn, are context). The text is tokenized piece by
  piece, cut where each user message's text begins, so the next turn of the same chat (the same
  messages, an answer and a new user message) tokenizes its shared beginning into the same ids;
- a completion's prompt is the context but for its last token, the query: the same prompt again
  is a full hit, and a prompt that extends it reuses its chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

# Stands for a user message's text while the template renders the conversation up to it: a string of
# private-use characters that no real message is expected to contain.
_MARK = "\ue000dkv-user-text\ue001"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone: a rendered chat template carries its own special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_prompt(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(context ids, query ids) of ``messages`` (``role`` and text ``content`` each) rendered with the
    model's chat template, followed by the assistant's turn.

    Raises ``ValueError`` when the template refuses the conversation (roles out of order, ...).
    """
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        cuts = []
        for i, message in enumerate(messages):
            if message["role"] != "user":
                continue
            upto = tokenizer.apply_chat_template([*messages[:i], {"role": "user", "content": _MARK}], tokenize=False)
            cut = upto.find(_MARK)
            # a template that renders the beginning of a conversation differently once it goes on
            # (one that moves the system prompt, say) gets no cut there
            if cut > (cuts[-1] if cuts else 0) and text.startswith(upto[:cut]):
                cuts.append(cut)
    except TemplateError as e:
        raise ValueError(f"the model's chat template refused these messages: {e}") from None
    if not cuts:
        return _split_last_token(encode(tokenizer, text))
    context = [token for start, end in zip([0, *cuts], cuts) for token in encode(tokenizer, text[start:end])]
    return context, encode(tokenizer, text[cuts[-1] :])


def completion_prompt(tokenizer, prompt: str | Sequence[int]) -> tuple[list[int], list[int]]:
    """(context ids, query ids) of a completion's prompt: text, or token ids as they are."""
    return _split_last_token(encode(tokenizer, prompt) if isinstance(prompt, str) else list(prompt))


def _split_last_token(ids: list[int]) -> tuple[list[int], list[int]]:
    if len(ids) < 2:
        raise ValueError(
            f"the prompt has {len(ids)} token(s); it needs at least 2: a context and a last token to decode from"
        )
    return ids[:-1], ids[-1:]
