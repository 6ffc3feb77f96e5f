"""Shared documents and the questions users ask about them (the SCBench setting, made up locally).

SCBench (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of Long-Context Methods") tests
KV-cache reuse in two shapes of shared context:

- multi-request: several users ask different questions about the same few documents, so the
  first request of a document pays its prefill and the others should find its cache;
- multi-turn: one conversation whose context grows turn by turn, each turn's prompt starting with
  the previous turn's (document + earlier questions + answers), so only the new tail is prefilled.

The documents here are fact sheets (a product catalogue, a staff directory, a city timeline, a
ship's log) generated from a seed: every locust process, and every run, builds the same texts, so
users in different processes share their caches. Each fact has a question, so answers could be
checked; the load test only needs realistic prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# SmolLM2's tokenizer makes about 1.7 tokens per word (numbers and names split) in these texts
TOKENS_PER_WORD = 1.7

_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "an", "dri", "po", "nex", "ul", "sa", "bri", "ko", "fen"]
_FIRST = [
    "Ada",
    "Bruno",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Luis",
    "Mira",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tomas",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
]
_LAST = [
    "Abbott",
    "Brandt",
    "Costa",
    "Duval",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
    "Quiroga",
    "Rossi",
    "Sato",
    "Tanaka",
    "Varga",
    "Weber",
]
_CITIES = ["Lisbon", "Tallinn", "Porto", "Ghent", "Bergen", "Turku", "Split", "Graz", "Lyon", "Krakow", "Malmo"]
_MATERIALS = ["aluminium", "oak", "steel", "recycled plastic", "bamboo", "glass", "carbon fibre", "ceramic"]
_COLOURS = ["red", "slate grey", "forest green", "navy", "white", "amber", "black", "teal"]
_DEPARTMENTS = ["logistics", "finance", "research", "customer care", "quality", "facilities", "legal", "sales"]
_EVENTS = [
    "a new harbour wall was finished",
    "the old market hall burned down",
    "the first tram line opened",
    "the university was founded",
    "a flood covered the lower town",
    "the central library was rebuilt",
    "the railway reached the city",
    "the cathedral tower was completed",
    "the fish market moved north",
    "the first bridge over the river was built",
    "a textile mill opened by the canal",
]
_CARGO = ["timber", "grain", "salt", "copper ore", "wool", "coffee", "machine parts", "olive oil", "paper"]
_WEATHER = ["calm seas", "a strong westerly gale", "thick fog", "light rain", "a heavy swell", "clear skies"]


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    questions: tuple[str, ...]

    @property
    def approx_tokens(self) -> int:
        return round(len(self.text.split()) * TOKENS_PER_WORD)


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _catalogue(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    brand = _name(rng, 3)
    facts = []
    for _ in range(40):
        product = f"{_name(rng)} {rng.randint(100, 990)}"
        facts.append(
            (
                f"The {product} is made of {rng.choice(_MATERIALS)}, weighs {rng.randint(2, 90) / 10} kg and "
                f"costs {rng.randint(19, 899)} euros; it comes in {rng.choice(_COLOURS)} and was designed by "
                f"{rng.choice(_FIRST)} {rng.choice(_LAST)} in {rng.randint(1998, 2024)}.",
                rng.choice(
                    [
                        f"How much does the {product} cost?",
                        f"Who designed the {product}?",
                        f"What is the {product} made of?",
                        f"How much does the {product} weigh?",
                    ]
                ),
            )
        )
    return f"{brand} product catalogue, spring edition.", facts


def _directory(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    company = _name(rng, 3)
    facts = []
    for _ in range(40):
        person = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        dept = rng.choice(_DEPARTMENTS)
        facts.append(
            (
                f"{person} works in {dept} at the {rng.choice(_CITIES)} office, joined in "
                f"{rng.randint(2005, 2024)}, can be reached at extension {rng.randint(100, 999)} and "
                f"reports to {rng.choice(_FIRST)} {rng.choice(_LAST)}.",
                rng.choice(
                    [
                        f"Which department does {person} work in?",
                        f"What is {person}'s extension?",
                        f"When did {person} join?",
                        f"Who does {person} report to?",
                    ]
                ),
            )
        )
    return f"Staff directory of {company} Ltd.", facts


def _timeline(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    city = _name(rng, 2) + "burg"
    facts = []
    for year in sorted(rng.sample(range(1410, 1990), 40)):
        event = rng.choice(_EVENTS)
        mayor = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        facts.append(
            (
                f"In {year}, {event} in {city}, while {mayor} was mayor and the town counted about "
                f"{rng.randint(2, 90) * 1000} people.",
                rng.choice(
                    [
                        f"What happened in {city} in {year}?",
                        f"Who was mayor of {city} in {year}?",
                        f"How many people lived in {city} in {year}?",
                    ]
                ),
            )
        )
    return f"A short history of {city}.", facts


def _logbook(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    ship = "MV " + _name(rng, 3)
    facts = []
    for day in range(1, 41):
        port = rng.choice(_CITIES)
        facts.append(
            (
                f"Day {day}: the {ship} reached {port} in {rng.choice(_WEATHER)}, loaded "
                f"{rng.randint(5, 400)} tonnes of {rng.choice(_CARGO)} and left with {rng.randint(9, 31)} crew "
                "aboard.",
                rng.choice(
                    [
                        f"Which port did the {ship} reach on day {day}?",
                        f"What cargo was loaded on day {day}?",
                        f"What was the weather on day {day}?",
                    ]
                ),
            )
        )
    return f"Logbook of the {ship}.", facts


_THEMES = (_catalogue, _directory, _timeline, _logbook)


def make_documents(count: int = 4, target_tokens: int = 600, seed: int = 0) -> list[Document]:
    """``count`` documents of about ``target_tokens`` tokens each (varied from 0.5x to 1.5x).

    The same arguments always give the same documents.
    """
    docs = []
    for i in range(count):
        rng = random.Random(f"dkv-loadtest-{seed}-{i}")
        title, facts = _THEMES[i % len(_THEMES)](rng)
        budget = target_tokens * (0.5 + i / max(1, count - 1)) if count > 1 else target_tokens
        lines, questions, words = [title], [], len(title.split())
        for sentence, question in facts:
            if (words + len(sentence.split())) * TOKENS_PER_WORD > budget and questions:
                break
            lines.append(sentence)
            questions.append(question)
            words += len(sentence.split())
        docs.append(
            Document(f"doc{i}-{_THEMES[i % len(_THEMES)].__name__.strip('_')}", " ".join(lines), tuple(questions))
        )
    return docs
