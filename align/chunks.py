"""Cut a user's text (a QA context, a TRL prompt) into chunks of at most `budget` tokens that cover it exactly.

The synthetic builder (align/data.py `chunk_text`) cuts corpus text at line ends, where a line that does not fit is
cut by characters: fine for code and for text whose lost tail is filler. A user's document is the evidence itself,
and often one long paragraph, so here every character is kept (the chunks joined are the text) and a unit that does
not fit is cut at sentence ends first, then between words, and only then between characters. Token counts are of
each chunk tokenized alone, as align/batches.py tokenizes them.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

Counter = Callable[[Sequence[str]], list[int]]

SPLITS: tuple[Callable[[str], list[str]], ...] = (
    lambda text: re.split(r"(?<=[.!?;:]\s)", text),  # after a sentence end and the space that follows it
    lambda text: re.split(r"(?<=\s)(?=\S)", text),  # between words, each keeping its trailing space
    list,  # characters
)


def units(text: str, budget: int, count: Counter) -> tuple[list[str], list[int]]:
    """Lines of `text`, with those over `budget` tokens cut finer (sentences, words, characters); and their sizes."""
    pieces = text.splitlines(keepends=True)
    sizes = count(pieces)
    for split in SPLITS:
        if not pieces or max(sizes) <= budget:
            break
        finer: list[str] = []
        for piece, size in zip(pieces, sizes):
            finer.extend([part for part in split(piece) if part] if size > budget else [piece])
        pieces = finer
        sizes = count(pieces)
    return pieces, sizes


def cover_chunks(text: str, budget: int, count: Counter) -> list[str]:
    """Chunks of at most `budget` tokens each (tokenized alone) whose concatenation is `text`."""
    pieces, sizes = units(text, budget, count)
    groups: list[list[str]] = []
    used = budget + 1
    for piece, size in zip(pieces, sizes):
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(piece)
        used += size
    chunks = ["".join(group) for group in groups]
    if all(size <= budget for size in count(chunks)):
        return chunks
    # a chunk tokenized as a whole can take more tokens than its pieces did apart: move its tail to the next chunk
    index = 0
    while index < len(groups):
        while len(groups[index]) > 1 and count(["".join(groups[index])])[0] > budget:
            if index + 1 == len(groups):
                groups.append([])
            groups[index + 1].insert(0, groups[index].pop())
        index += 1
    return ["".join(group) for group in groups]
