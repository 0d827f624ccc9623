"""Chunk importance for a question: how many "entities" a chunk shares with the question and its answer.

LOGO scores a chunk by the entities it shares with the question (spaCy NER; the released code also counts noun and
verb lemmas, and matches against question + answer). spaCy and its models are not available offline here, so the
default scorer, `content_overlap`, approximates that set with what a regular expression can find: numbers,
identifiers (with `_` or digits: code entities), capitalised words, and other content words of three letters or
more outside a stop list, lower-cased. Pluggable: register a scorer with `@register_chunk_scorer("name")`, or name
one by dotted path `package.module:function` in the config; a scorer is `fn(chunk: str, query: str) -> float`.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from core.errors import UserError

ChunkScorer = Callable[[str, str], float]
CHUNK_SCORERS: dict[str, ChunkScorer] = {}

STOP_WORDS = frozenset("""
a an and are as at be been but by can could did do does for from had has have how if in into is it its may might
more most must no not of on or our shall should so than that the their them then there these they this those to
was were what when where which while who whom whose why will with would you your yes also any all each other some
such only own same too very just over under again further once here both few nor off out up down above below
between through during before after about against question answer return self none true false def class import
""".split())

TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?")


def register_chunk_scorer(name: str):
    """Decorator: make `fn(chunk, query) -> float` selectable as `scorer: name`."""
    def decorate(fn: ChunkScorer) -> ChunkScorer:
        CHUNK_SCORERS[name] = fn
        return fn

    return decorate


def content_terms(text: str) -> set[str]:
    """Numbers, identifiers, capitalised words and content words of `text`, lower-cased, stop words removed."""
    terms = set()
    for token in TOKEN.findall(text):
        lowered = token.lower()
        if lowered in STOP_WORDS:
            continue
        if token[0].isdigit() or "_" in token or any(c.isdigit() for c in token) or len(token) >= 3:
            terms.add(lowered)
    return terms


@register_chunk_scorer("content_overlap")
def content_overlap(chunk: str, query: str) -> float:
    """Number of content terms the chunk shares with the query (question + answer)."""
    return float(len(content_terms(chunk) & content_terms(query)))


@register_chunk_scorer("number_overlap")
def number_overlap(chunk: str, query: str) -> float:
    """Numbers shared with the query: the narrowest entity set, for fact-lookup data."""
    numbers = re.compile(r"\d+")
    return float(len(set(numbers.findall(chunk)) & set(numbers.findall(query))))


def get_chunk_scorer(name: str) -> ChunkScorer:
    """A registered scorer by name, or a function by dotted path `package.module:function`."""
    if name in CHUNK_SCORERS:
        return CHUNK_SCORERS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot load chunk scorer {name!r}: {err}") from None
        if not callable(fn):
            raise UserError(f"chunk scorer {name!r} is not callable")
        return fn
    raise UserError(f"unknown chunk scorer {name!r}; registered: {', '.join(sorted(CHUNK_SCORERS))} "
                    "(or give package.module:function)")
