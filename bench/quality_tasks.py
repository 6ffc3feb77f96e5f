"""Tasks of the quality benchmark (``dkv bench quality``), as final token ids for SmolLM2.

Three kinds, in the task format of ``bench/kvpress_runner.py`` (its docstring)::

    {"id", "kind": "retrieval", "context_ids", "query_ids", "answer", "max_new_tokens",
     "length", "depth", "needle": [start, end]}   (the needle sentence's token positions)
    {"id", "kind": "fidelity", "context_ids", "continuation_ids"}

- **passkey** (retrieval): "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a
  relative depth of a haystack of simple filler sentences, drawn at random (seeded per task)
  from ``FILLER``, so no two haystacks are the same text. Query: a plain continuation prompt,
  ``"\\nWhat is the pass key? The pass key is"``; the answer is the 5-digit key.
- **needle** (retrieval in real English): "The special magic number for <city> is NNNN." inserted
  at a sentence boundary of real prose, the Python Language Reference as shipped in the
  standard library (``pydoc_data.topics``), prose paragraphs only: grammar and code blocks
  (indented), lists, tables and headings are left out and reST markup is stripped. Query:
  ``"\\nWhat is the special magic number for <city>? The special magic number for <city> is"``.
- **fidelity** (real English): ``~FIDELITY_CONTEXT`` tokens of that prose as context and the next
  ``FIDELITY_CONTINUATION`` tokens as the continuation to score, from passages that do not
  overlap the needle haystacks.

Every piece is tokenized on its own and the ids are concatenated at spaces or newlines, so the
needle sits exactly where it was put and lengths are exact to a sentence. No chat template: the
135M model answers these plain-continuation prompts with the full cache (checked by
``dkv bench quality``, which drops a retrieval task the full cache fails and says how many).

``build_tasks(tokenizer, quick=...)`` returns the list; ``short_retrieval_tasks`` passkeys and
needles at 350-1400 tokens, where a fraction of the context is few tokens per head (``dkv bench
decode``'s selection quality); ``python -m dkv.bench.quality_tasks`` prints a
summary (``--json`` the tasks themselves).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass

PASSKEY_QUERY = "\nWhat is the pass key? The pass key is"
NEEDLE_QUERY = "\nWhat is the special magic number for {city}? The special magic number for {city} is"
FIDELITY_CONTEXT = 1000
FIDELITY_CONTINUATION = 64
# New tokens to decode: the answer's own tokens (" 71432" is 6: SmolLM2 splits digits) plus one,
# so an answer that starts right away is always complete. Decoding further cannot turn a found
# answer into a miss, and a model that first says something else has missed it anyway.
EXTRA_NEW_TOKENS = 1

# The classic passkey filler (Mohtashami & Jaggi 2023), its sentences drawn in random order per
# task. Sentences with more content ("A light wind moves through the trees.") made the 135M model
# answer with filler instead of the key at 1-2K tokens, even with the full cache.
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Perth")

# Reference-manual topics that are mostly running prose (few grammar rules and code blocks).
# Needle haystacks and fidelity passages are drawn from disjoint topics.
HAYSTACK_TOPICS = ("execmodel", "naming", "types", "import", "exceptions", "comparisons")
FIDELITY_TOPICS = (
    "compound",
    "specialnames",
    "assignment",
    "attribute-access",
    "calls",
    "objects",
    "binary",
    "function",
    "class",
    "strings",
)

# (length in tokens, depths) of the full run; lengths are of the context (query not included)
PASSKEY_PLAN: tuple[tuple[int, tuple[float, ...]], ...] = (
    (512, (0.1, 0.5, 0.9)),
    (1024, (0.5,)),
    (2048, (0.5,)),
)
NEEDLE_PLAN: tuple[tuple[int, tuple[float, ...]], ...] = ((512, (0.25, 0.75)),)
FIDELITY_PASSAGES = 2
QUICK = {"passkey": ((512, (0.5,)),), "needle": ((512, (0.5,)),), "fidelity": 1, "fidelity_context": 384}
# Short contexts for decode-time selection (``dkv bench decode``): a fraction of a short context
# is few tokens per head, where selection errors show first.
SHORT_PASSKEY_PLAN: tuple[tuple[int, tuple[float, ...]], ...] = (
    (350, (0.2, 0.5, 0.8)),
    (700, (0.1, 0.5, 0.9)),
    (1400, (0.2, 0.5, 0.8)),
)
SHORT_NEEDLE_PLAN: tuple[tuple[int, tuple[float, ...]], ...] = (
    (400, (0.3, 0.7)),
    (700, (0.5,)),
    (1000, (0.25, 0.75)),
)
QUICK_SHORT = {"passkey": ((350, (0.5,)), (1400, (0.5,))), "needle": ((700, (0.5,)),)}


@dataclass(frozen=True)
class Passage:
    topic: str
    text: str


# ------------------------------------------------------------------------------------------- prose


def _prose_paragraphs(raw: str) -> list[str]:
    """The running-text paragraphs of one pydoc topic, reST markup stripped, one line each."""
    lines = raw.splitlines()
    paragraphs, current = [], []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip():
            if current:
                paragraphs.append(current)
            current = []
            continue
        if re.fullmatch(r"[=*\-~^]{3,}", line.strip()):  # heading underline
            continue
        if nxt.strip() and re.fullmatch(r"[=*\-~^]{3,}", nxt.strip()) and len(nxt.strip()) >= len(line.strip()) - 1:
            continue  # heading text
        current.append(line)
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        if any(line[:1].isspace() for line in para):  # grammar, code, continuation of a list item
            continue
        first = para[0].lstrip()
        if first.startswith(
            ("* ", "+", "|", "-", ">>>", "Note:", "See also", "Added in", "Changed in", "Deprecated")
        ) or re.match(r"^\d+\. ", first):
            continue
        text = " ".join(line.strip() for line in para)
        text = re.sub(r"\*\*?([^*]+?)\*\*?", r"\1", text)  # *emphasis*, **strong**
        text = re.sub(r"\[\d+\]", "", text)  # footnote marks
        text = text.replace("’", "'").replace("“", '"').replace("”", '"').replace("…", "...")
        text = re.sub(r"\s+", " ", text).strip()
        if len(text) < 80 or not text.endswith((".", ":", "?")) or text.count('"') % 2:
            continue
        if text.endswith(":"):  # introduces a code block or list that was dropped
            continue
        out.append(text)
    return out


def prose(topics: tuple[str, ...]) -> list[Passage]:
    """Prose paragraphs of ``topics`` from the standard library's copy of the Python reference."""
    from pydoc_data.topics import topics as pydoc_topics

    return [Passage(t, p) for t in topics for p in _prose_paragraphs(pydoc_topics[t])]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?])\s+(?=[A-Z\"(])", text) if s]


# ------------------------------------------------------------------------------------------- build


class _Ids:
    """Token ids of text pieces, each tokenized alone (no special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]


def _haystack(ids: _Ids, sentences: list[str], length: int, needle: str, depth: float) -> tuple[list[int], int]:
    """``sentences`` (joined by spaces) until ``length`` tokens, with ``needle`` at ``depth``; and
    where the needle's tokens start."""
    needle_ids = ids(" " + needle)
    budget = length - len(needle_ids)
    pieces: list[list[int]] = []
    total = 0
    for s in sentences:
        piece = ids(" " + s)  # every piece (the first too) starts at a space: ids concatenate cleanly
        if total + len(piece) > budget:
            break
        pieces.append(piece)
        total += len(piece)
    if total < budget - 128:
        raise ValueError(f"not enough text for a {length}-token haystack ({total} tokens)")
    # insert after the sentence whose end is closest to depth * total
    ends, acc = [0], 0
    for p in pieces:
        acc += len(p)
        ends.append(acc)
    at = min(range(len(ends)), key=lambda k: abs(ends[k] - depth * total))
    out: list[int] = []
    for p in pieces[:at]:
        out += p
    start = len(out)
    out += needle_ids
    for p in pieces[at:]:
        out += p
    return out, start


def passkey_tasks(ids: _Ids, plan, seed: int = 0) -> list[dict]:
    tasks = []
    rng = random.Random(seed)
    for length, depths in plan:
        for depth in depths:
            key = f"{rng.randrange(10000, 100000)}"
            filler = [rng.choice(FILLER) for _ in range(length)]  # more than enough sentences
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            context, start = _haystack(ids, filler, length, needle, depth)
            tasks.append(
                {
                    "id": f"passkey-{length}-{depth}",
                    "kind": "retrieval",
                    "context_ids": context,
                    "query_ids": ids(PASSKEY_QUERY),
                    "answer": key,
                    "max_new_tokens": len(ids(" " + key)) + EXTRA_NEW_TOKENS,
                    "length": length,
                    "depth": depth,
                    "needle": [start, start + len(ids(" " + needle))],
                }
            )
    return tasks


def needle_tasks(ids: _Ids, plan, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    paragraphs = prose(HAYSTACK_TOPICS)
    sentences = [s for p in paragraphs for s in _sentences(p.text)]
    tasks, k = [], 0
    for length, depths in plan:
        for depth in depths:
            city = CITIES[k % len(CITIES)]
            number = f"{rng.randrange(1000, 10000)}"
            start = rng.randrange(0, max(1, len(sentences) // 2))  # a different stretch of prose each time
            needle = f"The special magic number for {city} is {number}."
            context, at = _haystack(ids, sentences[start:], length, needle, depth)
            tasks.append(
                {
                    "id": f"needle-{length}-{depth}",
                    "kind": "retrieval",
                    "context_ids": context,
                    "query_ids": ids(NEEDLE_QUERY.format(city=city)),
                    "answer": number,
                    "max_new_tokens": len(ids(" " + number)) + EXTRA_NEW_TOKENS,
                    "length": length,
                    "depth": depth,
                    "needle": [at, at + len(ids(" " + needle))],
                }
            )
            k += 1
    return tasks


def fidelity_tasks(
    ids: _Ids, n: int, context: int = FIDELITY_CONTEXT, continuation: int = FIDELITY_CONTINUATION
) -> list[dict]:
    """``n`` disjoint passages of ``context + continuation`` tokens, each starting at a paragraph.

    The prose of ``FIDELITY_TOPICS`` is one stream of paragraphs (joined by blank lines); a
    passage takes paragraphs from where the previous one ended until it has enough tokens.
    """
    paragraphs = prose(FIDELITY_TOPICS)
    need = context + continuation
    tasks, i = [], 0
    while len(tasks) < n and i < len(paragraphs):
        first = paragraphs[i]
        pieces = [ids(first.text)]
        i += 1
        while sum(map(len, pieces)) < need and i < len(paragraphs):
            pieces.append(ids("\n\n" + paragraphs[i].text))
            i += 1
        all_ids = [t for piece in pieces for t in piece]
        if len(all_ids) < need:
            break
        tasks.append(
            {
                "id": f"fidelity-{first.topic}-{len(tasks)}",
                "kind": "fidelity",
                "context_ids": all_ids[:context],
                "continuation_ids": all_ids[context:need],
                "length": context,
            }
        )
    if len(tasks) < n:
        raise ValueError(f"only {len(tasks)} of {n} fidelity passages of {need} tokens in {FIDELITY_TOPICS}")
    return tasks


def build_tasks(tokenizer, quick: bool = False) -> list[dict]:
    """The task list (see the module docstring); ``quick``: one task of each kind, 512 tokens."""
    ids = _Ids(tokenizer)
    if quick:
        return (
            passkey_tasks(ids, QUICK["passkey"])
            + needle_tasks(ids, QUICK["needle"])
            + fidelity_tasks(ids, QUICK["fidelity"], context=QUICK["fidelity_context"])
        )
    return passkey_tasks(ids, PASSKEY_PLAN) + needle_tasks(ids, NEEDLE_PLAN) + fidelity_tasks(ids, FIDELITY_PASSAGES)


def short_retrieval_tasks(tokenizer, quick: bool = False) -> list[dict]:
    """Passkeys and needles at 350-1400 tokens, several depths (``quick``: three of them)."""
    ids = _Ids(tokenizer)
    plans = (QUICK_SHORT["passkey"], QUICK_SHORT["needle"]) if quick else (SHORT_PASSKEY_PLAN, SHORT_NEEDLE_PLAN)
    return passkey_tasks(ids, plans[0], seed=2) + needle_tasks(ids, plans[1], seed=3)


def summary(tasks: list[dict]) -> list[str]:
    return [
        f"{t['id']}: {len(t['context_ids'])} context tokens"
        + (f", answer {t['answer']}" if t["kind"] == "retrieval" else f", {len(t['continuation_ids'])} to score")
        for t in tasks
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the quality-benchmark tasks (token ids for SmolLM2).")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the task file (kvpress_runner format)")
    args = parser.parse_args(argv)
    from dkv.workers.model import DEFAULT_MODEL, cache_root, load_model

    tokenizer = None
    path = cache_root() / DEFAULT_MODEL
    if (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = load_model()[1]
    tasks = build_tasks(tokenizer, quick=args.quick)
    if args.json:
        json.dump({"tasks": tasks}, sys.stdout)
    else:
        print("\n".join(summary(tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
