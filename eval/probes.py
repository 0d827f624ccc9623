"""Long-context probes: put a fact into a long context at a chosen depth, ask for it back at the end.

Three kinds, all answered by greedy generation and scored by exact match:

- `needle`: one sentence ("The secret number of the amber heron is 482913.") inserted at a line boundary of held-out
  corpus text (needle in a haystack; the haystack is real code and prose, not repeated filler).
- `needles`: the same with `DISTRACTORS` more secret-number sentences of other names at random depths (RULER's
  multi-key needle): the model must pick the fact the question names, not any number that looks like an answer,
  which is what LOGO's preference rows train against (a distractor fact's value as the dis-preferred answer).
- `kv`: a JSON object of random 8-hex-digit keys and values that fills the whole context; the asked pair sits at the
  depth (key-value retrieval as in "Lost in the Middle" and LongBench's kv_retrieval: no semantic shortcut at all).

Every row also carries `candidates`: the answer and `CANDIDATES - 1` other values of its format, sorted (so the
answer's place among them says nothing). The others come from the context first (the distractor facts' values of
`needles`, other values of the JSON object for `kv`), then from seeded fresh draws (all of them for `needle`). The
answer-choice tasks rank the answer among them by log-likelihood, which moves long before exact match does.

Lengths are in characters of context before the question, not tokens: the same rows then serve every tokenizer, so
a gate can compare stages across vocabulary pruning. `token_lengths` measures them in a given tokenizer's tokens.
Depth is the fraction of the context before the fact (0 = first line, 1 = last line, just before the question).
"""

from __future__ import annotations

import random
from typing import Sequence

PROBE_KINDS = ("needle", "needles", "kv")
DISTRACTORS = 3
CANDIDATES = 8
"""Answer candidates per row, the answer included: chance is a mean rank of 4.5 and a rank-1 share of 1/8."""

_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "nimble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "urban", "vivid", "wary", "young",
)
_NOUNS = (
    "heron", "otter", "falcon", "badger", "lynx", "marten", "beetle", "walrus", "gecko", "ibis", "jackal", "koala",
    "lemur", "moose", "newt", "oriole", "puffin", "quail", "raven", "stoat", "tapir", "urchin", "viper", "wombat",
)


def haystack(texts: Sequence[str], length: int, rng: random.Random) -> str:
    """About `length` characters of the texts, starting at a random line of a random text, cut at a line end."""
    start_text = rng.randrange(len(texts))
    first = texts[start_text]
    lines = first.splitlines(keepends=True)
    pieces = ["".join(lines[rng.randrange(len(lines)):])] if lines else []
    index = start_text
    while sum(map(len, pieces)) < length:
        index = (index + 1) % len(texts)
        pieces.append(texts[index] if texts[index].endswith("\n") else texts[index] + "\n")
    text = "".join(pieces)[: length + 1]
    cut = text.rfind("\n", 0, length)
    return text[: cut + 1] if cut > 0 else text[:length]


def _line_start_near(text: str, position: int) -> int:
    """The start of the line nearest to `position` (0 or len(text) at the ends)."""
    if position <= 0:
        return 0
    if position >= len(text):
        return len(text)
    before = text.rfind("\n", 0, position)
    after = text.find("\n", position)
    candidates = [before + 1] + ([after + 1] if after != -1 else [len(text)])
    return min(candidates, key=lambda p: abs(p - position))


def _secret_number(rng: random.Random) -> str:
    return str(rng.randrange(100_000, 1_000_000))


def _hex_value(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}"


def _draw_fact(rng: random.Random) -> tuple[str, str]:
    """A random name and six-digit secret number."""
    name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return name, _secret_number(rng)


def answer_candidates(answer: str, context_values: Sequence[str], draw, count: int,
                      rng: random.Random) -> list[str]:
    """`count` distinct values, sorted: `answer`, up to `count - 1` of `context_values` (a seeded sample of them),
    then fresh `draw(rng)` values of the same format until there are `count`."""
    others = [v for v in dict.fromkeys(context_values) if v != answer]
    picked = rng.sample(others, min(len(others), count - 1))
    taken = {answer, *picked}
    while len(taken) < count:
        value = draw(rng)
        if value not in taken:
            taken.add(value)
    return sorted(taken)


def _fact_sentence(name: str, value: str) -> str:
    return f"The secret number of the {name} is {value}.\n"


def _needle(texts: Sequence[str], length: int, depth: float, rng: random.Random) -> tuple[str, str, str, str]:
    """(a haystack with the needle sentence at `depth`, the needle sentence, its name, its value)."""
    name, value = _draw_fact(rng)
    needle = _fact_sentence(name, value)
    context = haystack(texts, max(length - len(needle), 1), rng)
    at = _line_start_near(context, round(depth * len(context)))
    return context[:at] + needle + context[at:], needle, name, value


def _asking(context: str, needle: str, name: str, value: str) -> dict:
    """The row: the context and the question about `name`, whose answer is `value` in the `needle` sentence."""
    question = f"\nQuestion: What is the secret number of the {name}?\nAnswer:"
    return {"prompt": context + question, "answer": value, "fact_at": context.index(needle),
            "context_chars": len(context)}


def needle_row(texts: Sequence[str], length: int, depth: float, rng: random.Random,
               candidates: int = CANDIDATES) -> dict:
    """A haystack of corpus text with one secret-number sentence at `depth`, and the question about it."""
    row = _asking(*_needle(texts, length, depth, rng))
    return {**row, "candidates": answer_candidates(row["answer"], (), _secret_number, candidates, rng)}


def needles_row(texts: Sequence[str], length: int, depth: float, rng: random.Random,
                distractors: int = DISTRACTORS, candidates: int = CANDIDATES) -> dict:
    """A needle row plus `distractors` secret-number sentences of other names (and other values) at random line
    starts; the question names the needle at `depth`; the distractors' values are answer candidates."""
    context, needle, asked, answer = _needle(texts, length, depth, rng)
    names, values = {asked}, {answer}
    for _ in range(distractors):
        name, value = _draw_fact(rng)
        while name in names or value in values:
            name, value = _draw_fact(rng)
        names.add(name), values.add(value)
        cut = _line_start_near(context, rng.randrange(len(context) + 1))
        context = context[:cut] + _fact_sentence(name, value) + context[cut:]
    others = sorted(values - {answer})  # sorted: a set's order is not a function of the seed
    return {**_asking(context, needle, asked, answer),
            "candidates": answer_candidates(answer, others, _secret_number, candidates, rng)}


def kv_row(length: int, depth: float, rng: random.Random, candidates: int = CANDIDATES) -> dict:
    """A JSON object of random hex key-value pairs about `length` characters long; asks for the pair at `depth`."""
    pair_chars = len('"0123abcd": "0123abcd",\n')
    count = max(2, (length - 4) // pair_chars)
    keys: dict[str, None] = {}  # distinct keys, or the question would have two answers; in draw order, since a
    while len(keys) < count:    # set's order changes with the process' hash seed and the rows would too
        keys.setdefault(f"{rng.getrandbits(32):08x}")
    pairs = [(key, _hex_value(rng)) for key in keys]
    asked = min(count - 1, round(depth * (count - 1)))
    lines = [f'"{key}": "{value}"' for key, value in pairs]
    context = "{\n" + ",\n".join(lines) + "\n}\n"
    key, answer = pairs[asked]
    question = f'\nQuestion: What is the value of the key "{key}" in the JSON object above?\nAnswer:'
    return {"prompt": context + question, "answer": answer, "fact_at": context.index(f'"{key}"'),
            "context_chars": len(context),
            "candidates": answer_candidates(answer, [v for _, v in pairs], _hex_value, candidates, rng)}


def probe_rows(kind: str, texts: Sequence[str], length: int, depths: Sequence[float], samples: int,
               seed: int, candidates: int = CANDIDATES) -> list[dict]:
    """All rows of one (kind, length) task: `samples` rows per depth, each from its own seeded generator."""
    rows = []
    for sample in range(samples):  # sample-major, so that lm-eval's --limit keeps every depth
        for depth in depths:
            rng = random.Random(f"{seed}:probe:{kind}:{length}:{depth}:{sample}")
            row = (needle_row(texts, length, depth, rng, candidates) if kind == "needle" else
                   needles_row(texts, length, depth, rng, candidates=candidates) if kind == "needles" else
                   kv_row(length, depth, rng, candidates))
            rows.append({"kind": kind, "length": length, "depth": depth, "sample": sample, **row})
    return rows


def token_lengths(rows: Sequence[dict], tokenizer) -> dict[int, float]:
    """Mean prompt length in `tokenizer`'s tokens per character length: what a probe length means for a model."""
    totals: dict[int, list[int]] = {}
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        totals.setdefault(row["length"], []).append(len(ids))
    return {length: sum(counts) / len(counts) for length, counts in sorted(totals.items())}
