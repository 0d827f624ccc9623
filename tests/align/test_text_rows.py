"""Plain-text continuation rows: a few tokens of context, the tokens after them as the only response, cut from
long documents at places a seed fixes."""

import pytest

from align.text_rows import PROMPT_TOKENS, continuation_rows
from core.errors import UserError
from tests.factory import byte_tokenizer

TEXTS = ["short", "".join(f"line {i}: the value is {i * 7}\n" for i in range(200)),
         "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(150))]


def test_rows_continue_a_long_document_and_the_seed_fixes_where(tmp_path):
    tokenizer = byte_tokenizer(tmp_path / "tokenizer")
    rows = continuation_rows(TEXTS, tokenizer, count=6, tokens=20, seed="0:text")
    assert len(rows) == 6
    for row in rows:
        context, response = row["chunks"][0], row["answer"]
        assert len(tokenizer(context, add_special_tokens=False)["input_ids"]) == PROMPT_TOKENS  # bytes: 1 per char
        assert len(response) == 20 and row["responses"] == [response] and row["response_kinds"] == ["text"]
        assert row["question"] == "" and any(context + response in text for text in TEXTS[1:])
    assert continuation_rows(TEXTS, tokenizer, 6, 20, seed="0:text") == rows
    assert continuation_rows(TEXTS, tokenizer, 6, 20, seed="1:text") != rows


def test_no_long_document_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no document of more than"):
        continuation_rows(["short"], byte_tokenizer(tmp_path / "tokenizer"), 2, 20, seed="0")
