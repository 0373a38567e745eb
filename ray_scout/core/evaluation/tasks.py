"""Tasks: the extractive-QA samples that every quality figure is measured on.

What lives here: the ``Sample`` value (context, question, gold answers, where the evidence
sits), a synthetic generator in the spirit of RULER (single needle, several keyed needles,
multi-hop chains with look-alike distractors) that hits a target context length in tokens,
and loaders for SQuAD-v2 JSON and a plain JSONL format so users bring real data sets. What
it knows: text, character spans and token counts through a caller's tokenizer. What it
leaves to others: prompting and answering (the harness and the actors) and scoring
(``metrics``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

CountTokens = Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One extractive question over one context.

    ``answers`` empty means unanswerable (SQuAD v2). ``meta`` holds what the source knows
    beyond that; for synthetic samples: ``needle_spans`` (character spans ``(start, end)``
    of the sentences needed to answer, in chain order), ``distractor_spans``,
    ``answer_span``, ``hops``, ``depth`` (answer needle start / context length),
    ``context_tokens`` (as counted) and ``target_tokens``.
    """

    sample_id: str
    context: str
    question: str
    answers: tuple[str, ...]
    task: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("sample_id", "context", "question", "task"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Sample.{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.answers, str):
            raise TypeError(f"Sample.answers must be a sequence of strings, got the string "
                            f"{self.answers!r}; wrap a single answer in a tuple")
        answers = tuple(self.answers)
        if not all(isinstance(answer, str) for answer in answers):
            raise TypeError(f"Sample.answers must hold strings only, got {answers!r}")
        object.__setattr__(self, "answers", answers)

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


class TaskDataError(ValueError):
    """A data file that cannot be read as samples; the message names file, place and fix."""


# --------------------------------------------------------------------------- token counting

_WORD_PIECES = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate: one token per word and per punctuation mark.

    English BPE tokenizers (SmolLM2, Qwen2.5) give a few percent more on the generator's
    filler; pass a real tokenizer to ``generate`` where lengths must be exact.
    """
    return len(_WORD_PIECES.findall(text))


def token_counter(tokenizer: Any) -> CountTokens:
    """A ``count_tokens`` callable from a Hugging Face tokenizer (no special tokens)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def _as_counter(count_tokens: CountTokens | Any | None) -> tuple[CountTokens, str]:
    if count_tokens is None:
        return approx_tokens, "approx"
    if hasattr(count_tokens, "convert_ids_to_tokens"):  # a Hugging Face tokenizer
        name = getattr(count_tokens, "name_or_path", "") or type(count_tokens).__name__
        return token_counter(count_tokens), f"tokenizer:{name}"
    if callable(count_tokens):
        return count_tokens, getattr(count_tokens, "__name__", "callable")
    raise TypeError("count_tokens must be a callable str -> int or a Hugging Face tokenizer, "
                    f"got {type(count_tokens).__name__}")


# --------------------------------------------------------------------------- vocabularies
# Fact vocabularies and filler vocabulary are disjoint by construction (no names, digits,
# cities, organizations or code words in filler); ``_Builder`` still checks every sample.

_FIRST = ("Mira", "Tomas", "Elena", "Rafael", "Ingrid", "Kofi", "Yusuf", "Amara", "Lukas",
          "Priya", "Soren", "Nadia", "Mateo", "Hana", "Oskar", "Leila", "Dmitri", "Aiko",
          "Felix", "Zara", "Bruno", "Greta", "Emeka", "Ines")
_LAST = ("Castell", "Reyes", "Lindqvist", "Okafor", "Brandt", "Moreau", "Tanaka", "Novak",
         "Haddad", "Ferreira", "Kowalski", "Andersen", "Mensah", "Petrov", "Quinn", "Varga",
         "Duarte", "Sato", "Holm", "Abara", "Keller", "Rossi")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Tallinn",
           "Marrakesh", "Adelaide", "Bergen", "Cusco", "Dublin", "Hanoi", "Krakow", "Lagos",
           "Seville", "Tbilisi", "Winnipeg", "Zagreb", "Porto", "Bilbao", "Durban")
_ORG_NAMES = ("Halvorsen", "Brightwater", "Ashcombe", "Redfern", "Kestrel", "Marlowe",
              "Northgate", "Silverline", "Thornbury", "Westbrook", "Calloway", "Everhart",
              "Fairmont", "Greystone", "Larkspur", "Pemberton")
_ORG_KINDS = ("Institute", "Foundation", "Company", "Group", "Laboratory", "Trust")
_PROJECTS = ("Orion", "Basalt", "Meridian", "Cobalt", "Falcon", "Nimbus", "Quartz",
             "Sequoia", "Tundra", "Vortex", "Zephyr", "Aurora", "Granite", "Pioneer",
             "Sapphire", "Helix")
_CODE_WORDS = ("marigold", "saffron", "obsidian", "pelican", "juniper", "lantern",
               "cinnamon", "walrus", "tangerine", "magenta", "hazelnut", "sparrow",
               "thimble", "harpoon", "mandolin", "paprika", "zeppelin", "porcupine",
               "kumquat", "tornado")

_FILLER_SUBJECTS = (
    "the old lighthouse keeper", "a group of students", "the morning train", "our neighbour",
    "the small bakery on the corner", "a tired traveller", "the village choir",
    "the museum guide", "a curious child", "the harbour master", "the gardener",
    "a local painter", "the night nurse", "the committee", "most visitors",
    "the farmer's dog", "an elderly couple", "the school orchestra", "a street musician",
    "the young carpenter", "the librarian", "a flock of geese", "the delivery driver",
    "the retired teacher", "our cousin from the coast",
)
_FILLER_PREDICATES = (
    "spent the afternoon repairing a wooden fence", "talked for hours about the weather",
    "walked slowly along the river path", "forgot to close the kitchen window",
    "planted beans and tomatoes in the back garden", "read an old novel by candlelight",
    "complained about the price of bread", "painted the gate a pale shade of green",
    "waited patiently at the crossing", "found a lost glove near the fountain",
    "baked a loaf that nobody could finish", "argued about the best way to fold a map",
    "listened to the rain on the roof", "carried a basket of apples up the hill",
    "left a note on the table", "watched the boats drift past the pier",
    "tidied the shelves in the storeroom", "sang quietly while sweeping the yard",
    "counted the swallows on the wire", "mended a torn sail with heavy thread",
    "lost track of time in the market", "wrote a long letter to an old friend",
    "rearranged the chairs in the hall", "fed the ducks at the pond",
    "fixed the squeaking hinge on the barn door", "cooked a thick soup with leeks",
    "took a photograph of the frozen lake", "borrowed a ladder from next door",
    "dozed off in a chair by the stove", "polished the brass handles until they shone",
)
_FILLER_ADVERBIALS = (
    "", "", "", "after lunch", "before the storm arrived", "on a windy evening",
    "during the long winter", "while the kettle boiled", "as the sun went down",
    "without saying a word", "for no particular reason", "early in the morning",
    "later that week", "in the middle of the festival", "despite the cold",
)
_FILLER_OPENERS = ("", "", "", "", "Later, ", "Meanwhile, ", "As usual, ", "That year, ",
                   "Once again, ", "By then, ")
_FILLER_STANDALONE = (
    "Nobody remembered who had left the umbrella by the door.",
    "The soup was too salty, but everyone ate it anyway.",
    "It rained for most of the week.",
    "A faint smell of smoke hung over the valley.",
    "The clock in the hall had stopped long ago.",
    "Somewhere a dog barked twice and then fell silent.",
    "The path was muddy after the night's rain.",
    "Fresh snow covered the fields by dawn.",
    "The shop windows were full of paper lanterns.",
    "Nothing much happened for a while.",
    "The bridge creaked whenever a cart rolled over it.",
    "Everyone agreed that the summer had been unusually short.",
)


def _filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(_FILLER_STANDALONE)
    opener = rng.choice(_FILLER_OPENERS)
    subject = rng.choice(_FILLER_SUBJECTS)
    clause = f"{subject} {rng.choice(_FILLER_PREDICATES)}"
    adverbial = rng.choice(_FILLER_ADVERBIALS)
    if adverbial:
        clause = f"{clause} {adverbial}"
    text = f"{opener}{clause}." if opener else f"{clause}."
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------- facts


@dataclasses.dataclass(frozen=True)
class _Fact:
    sentence: str
    evidence: bool  # needed to answer (else a distractor)


@dataclasses.dataclass(frozen=True)
class _Puzzle:
    facts: tuple[_Fact, ...]  # evidence facts first, in chain order
    question: str
    answer: str
    hops: int


def _people(rng: random.Random, k: int) -> list[str]:
    # Distinct first and last names, so that no two people in one context share a name part.
    return [f"{first} {last}" for first, last in zip(rng.sample(_FIRST, k), rng.sample(_LAST, k))]


def _keyed_facts(rng: random.Random, k: int) -> tuple[list[str], list[str], list[str]]:
    """``k`` facts of one drawn kind: (sentences, questions, answers), keys all distinct."""
    kind = rng.choice(("code_word", "number", "city"))
    if kind == "code_word":
        keys, values = rng.sample(_PROJECTS, k), rng.sample(_CODE_WORDS, k)
        return ([f"The secret code word for the {key} project is {value}." for key, value in
                 zip(keys, values)],
                [f"What is the secret code word for the {key} project?" for key in keys],
                values)
    if kind == "number":
        keys = _people(rng, k)
        values = [str(v) for v in rng.sample(range(10_000, 100_000), k)]
        return ([f"The badge number of {key} is {value}." for key, value in zip(keys, values)],
                [f"What is the badge number of {key}?" for key in keys],
                values)
    keys, values = _people(rng, k), rng.sample(_CITIES, k)
    return ([f"{key} was born in the city of {value}." for key, value in zip(keys, values)],
            [f"In which city was {key} born?" for key in keys],
            values)


def _needles(rng: random.Random, num_needles: int) -> _Puzzle:
    sentences, questions, answers = _keyed_facts(rng, num_needles)
    asked = rng.randrange(num_needles)
    facts = [_Fact(sentences[asked], True)]
    facts += [_Fact(s, False) for i, s in enumerate(sentences) if i != asked]
    return _Puzzle(tuple(facts), questions[asked], answers[asked], hops=1)


def _single_needle(rng: random.Random) -> _Puzzle:
    return _needles(rng, 1)


def _multi_needle(rng: random.Random, num_needles: int = 4) -> _Puzzle:
    if not 2 <= num_needles <= len(_PROJECTS):
        raise ValueError(f"multi_needle needs 2..{len(_PROJECTS)} needles, got {num_needles}")
    return _needles(rng, num_needles)


def _multi_hop(rng: random.Random, hops: int = 2, distractor_chains: int = 3) -> _Puzzle:
    """A chain person (-> manager) -> organization -> city, plus look-alike chains."""
    if hops not in (2, 3):
        raise ValueError(f"multi_hop supports hops=2 or hops=3, got {hops}")
    if not 0 <= distractor_chains <= 5:
        raise ValueError(f"multi_hop supports 0..5 distractor chains, got {distractor_chains}")
    chains = distractor_chains + 1
    people = _people(rng, chains * (hops - 1))
    orgs = [f"the {name} {kind}" for name, kind in
            zip(rng.sample(_ORG_NAMES, chains), rng.choices(_ORG_KINDS, k=chains))]
    cities = rng.sample(_CITIES, chains)
    facts: list[_Fact] = []
    for chain in range(chains):
        evidence = chain == 0
        person = people[chain * (hops - 1)]
        org, city = orgs[chain], cities[chain]
        if hops == 3:
            manager = people[chain * (hops - 1) + 1]
            facts.append(_Fact(f"{person} reports directly to {manager}.", evidence))
            facts.append(_Fact(f"{manager} works for {org}.", evidence))
        else:
            facts.append(_Fact(f"{person} works for {org}.", evidence))
        facts.append(_Fact(f"{org[0].upper()}{org[1:]} has its headquarters in {city}.",
                           evidence))
    facts.sort(key=lambda fact: not fact.evidence)  # stable: evidence first, in chain order
    asked = people[0]
    if hops == 3:
        question = (f"In which city is the headquarters of the organization that "
                    f"{asked}'s manager works for?")
    else:
        question = f"In which city is the headquarters of the organization {asked} works for?"
    return _Puzzle(tuple(facts), question, cities[0], hops=hops)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A synthetic task: its puzzle builder and the options it accepts."""

    name: str
    build: Callable[..., _Puzzle]
    options: tuple[str, ...]
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec("single_needle", _single_needle, (),
                 "one keyed fact (code word, badge number or birth city) in filler"),
        TaskSpec("multi_needle", _multi_needle, ("num_needles",),
                 "several facts of the same form with different keys; one is asked"),
        TaskSpec("multi_hop", _multi_hop, ("hops", "distractor_chains"),
                 "a chain of 2-3 facts to follow, among look-alike distractor chains"),
    )
}


# --------------------------------------------------------------------------- assembly

_PARAGRAPH_BREAK = 0.12  # chance that a sentence boundary is a paragraph break


def _assemble(filler: Sequence[str], breaks: Sequence[str], facts: Sequence[str],
              slots: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Join filler with facts inserted before filler index ``slots[i]``; return fact spans."""
    order = sorted(range(len(facts)), key=lambda i: (slots[i], i))
    pieces: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(facts)
    length = 0
    cursor = 0

    def add(text: str, separator: str) -> tuple[int, int]:
        nonlocal length
        if pieces:
            pieces.append(separator)
            length += len(separator)
        pieces.append(text)
        start = length
        length += len(text)
        return start, length

    for index in order:
        while cursor < min(slots[index], len(filler)):
            add(filler[cursor], breaks[cursor])
            cursor += 1
        spans[index] = add(facts[index], " ")
    while cursor < len(filler):
        add(filler[cursor], breaks[cursor])
        cursor += 1
    return "".join(pieces), spans


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text, flags=re.IGNORECASE) is not None


def _fact_terms(puzzle: _Puzzle) -> set[str]:
    # The capitalized words and numbers of the facts: names, cities, organizations, codes.
    terms: set[str] = {puzzle.answer}
    for fact in puzzle.facts:
        for word in re.findall(r"\b[A-Z][a-z]+\b|\b\d+\b", fact.sentence):
            if word not in {"The", "In", "What"}:
                terms.add(word)
    return terms


def _make_sample(task: str, index: int, *, context_tokens: int, seed: int,
                 count: CountTokens, counter_name: str, tolerance: float,
                 options: dict[str, Any]) -> Sample:
    spec = TASKS[task]
    # Seeded by (seed, task, index): sample i is the same whatever n is.
    rng = random.Random(f"ray-scout:{task}:{seed}:{index}")
    puzzle = spec.build(rng, **options)
    facts = [fact.sentence for fact in puzzle.facts]
    fact_tokens = sum(count(" " + sentence) for sentence in facts)
    if fact_tokens >= context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} is too small for {task} with {options or 'defaults'}: "
            f"its facts alone take {fact_tokens} tokens; ask for at least {2 * fact_tokens}"
        )
    terms = _fact_terms(puzzle)
    filler: list[str] = []
    filler_tokens: list[int] = []
    breaks: list[str] = []

    def draw() -> None:
        while True:
            sentence = _filler_sentence(rng)
            if not any(_mentions(sentence, term) for term in terms):
                break
        separator = "\n\n" if rng.random() < _PARAGRAPH_BREAK else " "
        filler.append(sentence)
        # Counted with its separator: a paragraph break costs tokens a space does not.
        filler_tokens.append(count(separator + sentence))
        breaks.append(separator)

    while fact_tokens + sum(filler_tokens) < context_tokens:
        draw()
    # Depth of each fact as a fraction of the filler, so slots follow the filler's length.
    # Independent depths: neither the asked needle nor the chain order is given away by
    # position.
    depths = [rng.random() for _ in facts]
    slack = max(tolerance * context_tokens, 4.0)

    def build() -> tuple[str, list[tuple[int, int]], int]:
        slots = [round(depth * len(filler)) for depth in depths]
        text, spans = _assemble(filler, breaks, facts, slots)
        return text, spans, count(text)

    context, spans, measured = build()
    # Per-sentence counts are not exactly additive (merges at boundaries); correct on the
    # real count, trading the last filler sentence for shorter or longer ones.
    for _ in range(200):
        excess = measured - context_tokens
        if abs(excess) <= slack:
            break
        if excess > 0 and filler:
            filler.pop(), filler_tokens.pop(), breaks.pop()
        else:
            draw()
        context, spans, measured = build()
    else:
        raise ValueError(
            f"could not fit {task} sample {index} within {slack:.0f} tokens of "
            f"{context_tokens} with this token counter; pass a larger context_tokens"
        )
    evidence = [span for span, fact in zip(spans, puzzle.facts) if fact.evidence]
    # The answer sits in the last fact of the chain (the only one for needle tasks).
    answer_start = context.index(puzzle.answer, *evidence[-1])
    meta = {
        "needle_spans": tuple(evidence),
        "distractor_spans": tuple(s for s, f in zip(spans, puzzle.facts) if not f.evidence),
        "answer_span": (answer_start, answer_start + len(puzzle.answer)),
        "hops": puzzle.hops,
        "depth": evidence[-1][0] / len(context),
        "context_tokens": measured,
        "target_tokens": context_tokens,
        "token_counter": counter_name,
        "seed": seed,
        "options": dict(options),
    }
    return Sample(
        sample_id=f"{task}-{context_tokens}-s{seed}-{index:05d}",
        context=context,
        question=puzzle.question,
        answers=(puzzle.answer,),
        task=task,
        meta=meta,
    )


def generate(
    task: str,
    n: int,
    *,
    context_tokens: int,
    seed: int = 0,
    count_tokens: CountTokens | Any | None = None,
    tolerance: float = 0.02,
    **options: Any,
) -> list[Sample]:
    """``n`` synthetic samples of ``task`` (a key of ``TASKS``), deterministic by seed.

    ``count_tokens`` is a callable ``str -> int`` or a Hugging Face tokenizer; each context
    then counts within ``max(tolerance * context_tokens, 4)`` tokens of ``context_tokens``.
    Without it, lengths follow ``approx_tokens``. ``options`` go to the task:
    ``multi_needle(num_needles=4)``, ``multi_hop(hops=2, distractor_chains=3)``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    unknown = set(options) - set(TASKS[task].options)
    if unknown:
        accepted = ", ".join(TASKS[task].options) or "none"
        raise ValueError(f"{task} does not take {', '.join(sorted(unknown))}; "
                         f"its options: {accepted}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if context_tokens < 32:
        raise ValueError(f"context_tokens must be at least 32, got {context_tokens}")
    if not 0.0 < tolerance < 0.5:
        raise ValueError(f"tolerance is a fraction of context_tokens in (0, 0.5), got {tolerance}")
    count, counter_name = _as_counter(count_tokens)
    return [
        _make_sample(task, index, context_tokens=context_tokens, seed=seed, count=count,
                     counter_name=counter_name, tolerance=tolerance, options=options)
        for index in range(n)
    ]


# --------------------------------------------------------------------------- loaders


def _require(record: Any, field: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise TaskDataError(f"{where}: missing field {field!r}")
    return record[field]


def _require_str(record: Any, field: str, where: str) -> str:
    value = _require(record, field, where)
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: field {field!r} must be a string, got {value!r}")
    return value


def _require_list(record: Any, field: str, where: str) -> list:
    value = _require(record, field, where)
    if not isinstance(value, list):
        raise TaskDataError(f"{where}: field {field!r} must be a list, got {type(value).__name__}")
    return value


def _unique(answers: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(answers))


def load_squad(path: str | Path, *, limit: int | None = None) -> list[Sample]:
    """Questions of a SQuAD-format JSON file (v2.0, or v1.1 without ``is_impossible``).

    ``data -> paragraphs -> qas``; a question with ``is_impossible: true`` gets no answers.
    ``limit`` caps the number of questions read, in file order.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path}: line {error.lineno}, column {error.colno}: not valid "
                            f"JSON ({error.msg})") from None
    articles = _require_list(document, "data", f"{path}: top level")
    samples: list[Sample] = []
    for a, article in enumerate(articles):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, paragraph in enumerate(_require_list(article, "paragraphs", f"{path}: data[{a}]")):
            where_p = f"{path}: data[{a}].paragraphs[{p}]"
            context = _require_str(paragraph, "context", where_p)
            for q, qa in enumerate(_require_list(paragraph, "qas", where_p)):
                if limit is not None and len(samples) >= limit:
                    return samples
                where = f"{where_p}.qas[{q}]"
                impossible = bool(qa.get("is_impossible", False)) if isinstance(qa, dict) else False
                gold = _require_list(qa, "answers", where)
                texts = [_require_str(g, "text", f"{where}.answers[{i}]")
                         for i, g in enumerate(gold)]
                if not impossible and not texts:
                    raise TaskDataError(f"{where}: an answerable question with no answers; "
                                        "add answers or set is_impossible to true")
                samples.append(Sample(
                    sample_id=str(_require(qa, "id", where)),
                    context=context,
                    question=_require_str(qa, "question", where),
                    answers=() if impossible else _unique(texts),
                    task="squad",
                    meta={"title": title,
                          "answer_starts": tuple(g.get("answer_start") for g in gold)},
                ))
    return samples


_JSONL_FIELDS = ("id", "context", "question", "answers", "task", "meta")


def load_jsonl(path: str | Path, *, limit: int | None = None) -> list[Sample]:
    """Samples from JSON Lines: one object per line with ``context``, ``question`` and
    ``answers`` (a list of strings, or one string; empty means unanswerable).

    Optional: ``id`` (default ``<file stem>-<line>``), ``task`` (default ``"jsonl"``),
    ``meta`` (an object); any other fields land in ``meta``. Blank lines are skipped.
    """
    path = Path(path)
    try:
        # Split on newlines only: str.splitlines would also split inside JSON strings that
        # hold U+2028 or other Unicode line separators, which JSON leaves unescaped.
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file") from None
    samples: list[Sample] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(samples) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskDataError(f"{where}: not valid JSON ({error.msg}, column {error.colno})"
                                ) from None
        answers = _require(record, "answers", where)
        if isinstance(answers, str):
            answers = [answers] if answers else []
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise TaskDataError(f"{where}: field 'answers' must be a string or a list of "
                                f"strings, got {answers!r}")
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise TaskDataError(f"{where}: field 'meta' must be an object, got {meta!r}")
        extra = {key: value for key, value in record.items() if key not in _JSONL_FIELDS}
        samples.append(Sample(
            sample_id=str(record.get("id", f"{path.stem}-{number}")),
            context=_require_str(record, "context", where),
            question=_require_str(record, "question", where),
            answers=_unique(a for a in answers if a),
            task=str(record.get("task", "jsonl")),
            meta={**meta, **extra},
        ))
    return samples


def dump_jsonl(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples as JSON Lines that ``load_jsonl`` reads back (tuples become lists)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for sample in samples:
            record = {"id": sample.sample_id, "context": sample.context,
                      "question": sample.question, "answers": list(sample.answers),
                      "task": sample.task, "meta": sample.meta}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
