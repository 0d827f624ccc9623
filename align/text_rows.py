"""Plain-text rows in the preference-row format: a few tokens of a document as the context, the tokens after them as
the only response. `align.logo.TextRegulariser` trains on such rows beside the preference loss, and an instruction
stage can mix them into its question rows, so that a model tuned on short answers keeps modelling text."""

from __future__ import annotations

import random
from typing import Sequence

from core.errors import UserError

PROMPT_TOKENS = 4
"""Tokens of context before the response: enough to start a continuation, too few to be a long-context row."""
WINDOW_CHARS = 1500
"""Characters cut from a document per row: more than `tokens` tokens of code or prose need."""
MIN_DOCUMENT_CHARS = 2000


def continuation_rows(texts: Sequence[str], tokenizer, count: int, tokens: int, seed: str) -> list[dict]:
    """`count` rows cut at random places of the long `texts`: PROMPT_TOKENS tokens as the context, the next `tokens`
    tokens as the preferred (and only) response; `seed` (any string) fixes which places."""
    documents = [text for text in texts if len(text) > MIN_DOCUMENT_CHARS]
    if not documents:
        raise UserError(f"no document of more than {MIN_DOCUMENT_CHARS} characters to cut text rows from")
    rng = random.Random(seed)
    rows: list[dict] = []
    for index in range(10 * count):  # a cut of only whitespace is skipped: ten tries per row are plenty
        if len(rows) == count:
            break
        text = rng.choice(documents)
        start = rng.randrange(0, len(text) - WINDOW_CHARS)
        # the first token is dropped: the cut may have split its word
        ids = tokenizer(text[start:start + WINDOW_CHARS], add_special_tokens=False)["input_ids"][1:]
        context = tokenizer.decode(ids[:PROMPT_TOKENS])
        response = tokenizer.decode(ids[PROMPT_TOKENS:PROMPT_TOKENS + tokens])
        if context.strip() and response.strip():
            rows.append({"id": f"text-{index}", "chunks": [context], "question": "", "answer": response,
                         "responses": [response], "response_kinds": ["text"], "response_sources": ["corpus text"]})
    if len(rows) < count:
        raise UserError(f"only {len(rows)} of {count} text rows could be cut from the corpus")
    return rows
