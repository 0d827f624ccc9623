"""Preference rows in TRL's layout (`prompt`, `chosen`, `rejected`) mapped onto LOGO's rows, so that `python -m
align.logo --data` trains on data users already have.

The layout is told by the columns: `chunks`, `question` and `responses` are LOGO's own rows (align/data.py);
`prompt`, `chosen` and `rejected` are TRL's explicit-prompt preference rows. Per row:

    chunks      the prompt cut into chunks of at most `position.chunk_size` tokens (align/chunks.py), all but the
                last: the context whose positions are synthesised
    question    the prompt's last chunk, so that the end of the prompt stays next to the responses at the end of
                the window (a prompt of one chunk is cut in two halves)
    responses   [chosen, *rejected]: `rejected` is one answer or a list of them (JSONL rows may mix both and
                differ in length); the loss uses the first `loss.num_rejected` (M), and a row with fewer is refused
                naming the row

TRL's conversational form (`prompt` a list of {role, content} messages, `chosen` and each rejected answer a list of
assistant messages) is rendered with the tokenizer's chat template as TRL renders it: the prompt with the generation
prompt, each answer as what the template adds after the prompt. A tokenizer without a chat template is refused.
TRL's implicit-prompt rows (only `chosen` and `rejected`, the prompt inside both) are refused too.
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets

from align.chunks import cover_chunks
from align.data import token_counter
from core.errors import UserError

TRL_COLUMNS = ("prompt", "chosen", "rejected")
LOGO_COLUMNS = ("chunks", "question", "responses")


def layout(columns: Sequence[str]) -> str:
    """"logo" or "trl" from the columns; TRL's implicit prompt is refused, anything else is left to check_rows."""
    if all(c in columns for c in LOGO_COLUMNS):
        return "logo"
    if all(c in columns for c in TRL_COLUMNS):
        return "trl"
    if "chosen" in columns and "rejected" in columns:
        raise UserError("preference rows with chosen and rejected but no prompt column (TRL's implicit prompt) are "
                        "not supported: put the shared prompt in a prompt column")
    return "logo"


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _answers(rejected: Any) -> list:
    """`rejected` as a list of answers: a string or one conversation is one answer."""
    if isinstance(rejected, str) or _is_conversation(rejected):
        return [rejected]
    return list(rejected or [])


def _render(tokenizer, prompt: Any, answers: list, row: str) -> tuple[str, list[str]]:
    """Prompt and answer texts: strings as they are, conversations through the chat template."""
    conversational = [_is_conversation(x) for x in (prompt, *answers)]
    if not any(conversational):
        if not all(isinstance(x, str) for x in (prompt, *answers)):
            raise UserError(f"row {row}: prompt, chosen and rejected must be text or lists of {{role, content}} "
                            "messages")
        return prompt, answers
    if not all(conversational):
        raise UserError(f"row {row}: prompt, chosen and rejected mix text and message lists; use one form")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"row {row}: conversational TRL rows need a tokenizer with a chat template, and this one has "
                        "none; give text prompts and answers instead")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for answer in answers:
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not whole.startswith(prompt_text):
            raise UserError(f"row {row}: the chat template renders the prompt differently once an answer follows it")
        texts.append(whole[len(prompt_text):])
    return prompt_text, texts


def split_prompt(prompt: str, chunk_size: int, count) -> tuple[list[str], str]:
    """(context chunks, question): the prompt's chunks, the last one being the question."""
    chunks = cover_chunks(prompt, chunk_size, count)
    if len(chunks) > 1:
        return chunks[:-1], chunks[-1]
    halves = cover_chunks(prompt, max(1, count([prompt])[0] // 2), count)
    return ["".join(halves[:-1]) or prompt], "".join(halves[-1:]) if len(halves) > 1 else ""


def trl_to_logo(rows: datasets.Dataset, tokenizer, chunk_size: int) -> datasets.Dataset:
    """LOGO rows (align/data.py columns) from TRL rows; see the module docstring."""
    count = token_counter(tokenizer)
    mapped = []
    for index, row in enumerate(rows):
        row_id = str(row.get("id", f"trl-{index}"))
        rejected = _answers(row["rejected"])
        prompt, responses = _render(tokenizer, row["prompt"], [row["chosen"], *rejected], row_id)
        if not prompt.strip():
            raise UserError(f"row {row_id}: the prompt is empty")
        chunks, question = split_prompt(prompt, chunk_size, count)
        mapped.append({"id": row_id, "chunks": chunks, "question": question, "answer": responses[0],
                       "responses": responses, "response_kinds": ["chosen", *["rejected"] * len(rejected)],
                       "response_sources": ["TRL chosen", *[f"TRL rejected {j}" for j in range(len(rejected))]]})
    return datasets.Dataset.from_list(mapped)


def as_logo_rows(rows: datasets.Dataset, tokenizer, chunk_size: int) -> datasets.Dataset:
    """The rows as LOGO's: unchanged when they are, mapped when they are TRL's."""
    if layout(rows.column_names) == "trl":
        return trl_to_logo(rows, tokenizer, chunk_size)
    return rows
