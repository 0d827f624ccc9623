"""LOGO rows from a user's long-document QA (`python -m align.build_data --qa FILE`, or `data.qa` in a config).

The file is JSONL (one object a line) or a `datasets` folder (save_to_disk: a Dataset, or a DatasetDict read at
`qa_split`), with a context, a question and a gold answer per row (column names: `qa_columns`; an answer column of
lists counts its first answer). Everything is read and checked before anything is written: a missing file or column,
an empty file, a line that is not a JSON object and a value that is not text are one-line errors.

Each row becomes one LOGO row (section 3.2), as align/data.py builds them from synthetic facts:

    chunks      the context cut into chunks of at most `chunk_size` tokens of the tokenizer, covering it exactly
                (align/chunks.py: at line ends, then sentence ends, then between words)
    importance  each chunk scored against question + gold answer with `scorer` (default `content_overlap`,
                align/scoring.py: content terms shared, a lexical stand-in for LOGO's entity overlap); chunks
                scoring at least `critical_threshold` are critical
    context C'  the critical chunks (at least the top `full_chunks`) plus random other chunks, up to
                `context_chunks`, in document order: the one context every response is scored on
    preferred   the gold answer (`answer_template`), or with `responses: generator` and `generation.preferred:
                generated` the generator's answer from the top chunks (LOGO's released code)
    rejected    `responses: generator`: the generator's answers from the top `half_chunks` chunks and from the
                `wrong_chunks` lowest-scoring chunks (LOGO's half and wrong strategies). `responses: rule`, the kinds
                of `rule_rejected` that mean something for real QA:
                  irrelevant   another row's gold answer: fluent, on format, answering another question
                  partial      a sentence of a top-scoring chunk that does not hold the answer: on the question's
                               topic, but not its answer
                  own_mistake  the generator's greedy answer with C' at synthesised positions (align/mistakes.py)
                               when it does not contain the gold answer; another row's answer where it does
                near_miss (digits of a synthetic number changed) is refused for QA rows.

Rows are skipped, and counted by reason in the manifest, when a value is empty, the question and answer take more
than one chunk, no chunk is critical (the context does not support the answer), or a dis-preferred response cannot
be made or equals the preferred one. Rows are taken in file order until `samples` are built.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from pathlib import Path
from typing import Any, Sequence

from align.chunks import Counter, cover_chunks
from align.data import (
    PreferenceDataConfig,
    check_generator,
    collect_rows,
    generated_responses,
    is_saved_dataset,
    load_split,
    model_name,
    token_counter,
)
from align.scoring import get_chunk_scorer
from core.errors import UserError

QA_FIELDS = ("context", "question", "answer")


def check_qa_build(config: PreferenceDataConfig, tokenizer) -> None:
    """The QA build's checks that need the tokenizer: a chunk holds the question and answer templates."""
    template = config.qa_question_template + config.answer_template
    if "{question}" not in config.qa_question_template:
        raise UserError("qa_question_template must contain {question}")
    overhead = token_counter(tokenizer)([template.format(question="", value="")])[0]
    if overhead >= config.chunk_size:
        raise UserError(f"chunk_size {config.chunk_size} leaves no room beside the question and answer templates "
                        f"({overhead} tokens); raise chunk_size")


# ---------------------------------------------------------------------------------------------------- reading


def _text(value: Any, column: str, row: int, where: str) -> str:
    """A cell as text: a string, or the first of a list of strings (several gold answers); None is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return value[0] if value else ""
    raise UserError(f"{where}: column {column!r} of row {row} holds {type(value).__name__} values, not text; point "
                    f"data.qa_columns at a column of text (or of lists of text)")


def _fingerprint(path: Path) -> dict[str, Any]:
    """sha256 and size of the file, or of every file of the folder (names included), for the provenance."""
    digest, size = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _jsonl_records(path: Path) -> tuple[list[dict], list[str]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not an object")
            records.append(record)
    columns = list(dict.fromkeys(key for record in records for key in record))
    return records, columns


def read_qa(config: PreferenceDataConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The QA rows as {id, context, question, answer} texts, and the provenance of the file; UserError for anything
    a build could not use."""
    path = Path(config.qa)
    if not path.exists():
        raise UserError(f"QA data not found: {path}")
    wanted = {field: getattr(config.qa_columns, field) for field in QA_FIELDS}
    if path.is_dir():
        if not is_saved_dataset(path):
            raise UserError(f"{path} is a folder but not a saved dataset (save_to_disk); give a JSONL file or one")
        table = load_split(path, config.qa_split)
        records, columns, kind = table, table.column_names, "datasets"
    else:
        records, columns = _jsonl_records(path)
        kind = "jsonl"
    if len(records) == 0:
        raise UserError(f"{path} holds no QA rows")
    missing = [name for name in wanted.values() if name not in columns]
    if missing:
        raise UserError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)}); "
                        "name them with --set data.qa_columns.context=... (question, answer)")
    rows = []
    for index, record in enumerate(records):
        texts = {field: _text(record.get(name), name, index, str(path)) for field, name in wanted.items()}
        rows.append({"id": str(record.get("id", index)), **texts})
    provenance = {"path": str(path), "format": kind, "split": config.qa_split if kind == "datasets" else None,
                  "columns": wanted, "rows": len(rows), **_fingerprint(path)}
    return rows, provenance


# ---------------------------------------------------------------------------------------------------- responses


def normalized(text: str) -> str:
    """Lower case, no punctuation, single spaces: how answers are compared (SQuAD's normalisation, less articles)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def other_answer(rows: Sequence[dict], index: int, rng: random.Random) -> tuple[str, int] | None:
    """Another row's gold answer that differs from this row's (compared normalized), and its row."""
    gold = normalized(rows[index]["answer"])
    start = rng.randrange(len(rows))
    for offset in range(len(rows)):
        other = (start + offset) % len(rows)
        if other != index and normalized(rows[other]["answer"]) not in ("", gold):
            return rows[other]["answer"].strip(), other
    return None


def on_topic_sentence(chunks: Sequence[str], ranking: Sequence[int], gold: str, half: int,
                      rng: random.Random) -> tuple[str, int] | None:
    """A sentence of the highest-ranked chunk (of the top `half`) that has sentences without the gold answer."""
    for chunk in ranking[:half]:
        sentences = [s.strip() for line in chunks[chunk].splitlines() for s in re.split(r"(?<=[.!?])\s+", line)]
        candidates = [s for s in sentences if 8 <= len(s) <= 300 and normalized(gold) not in normalized(s)]
        if candidates:
            return rng.choice(candidates), chunk
    return None


def rule_qa_responses(config: PreferenceDataConfig, rows: Sequence[dict], index: int, chunks: Sequence[str],
                      ranking: Sequence[int], rng: random.Random) -> tuple[list, list[str], list[str]] | str:
    """The gold answer and the `rule_rejected` kinds (own_mistake left as None: it needs C'), or why not."""
    gold = rows[index]["answer"].strip()
    responses, kinds, sources = [config.answer_template.format(value=gold)], ["gold"], ["dataset answer"]
    for kind in config.rule_rejected:
        if kind == "irrelevant":
            found = other_answer(rows, index, rng)
            if found is None:
                return "no other row's answer differs from this one"
            responses.append(config.answer_template.format(value=found[0]))
            kinds.append("other_answer")
            sources.append(f"gold answer of QA row {found[1]}")
        elif kind == "partial":
            found = on_topic_sentence(chunks, ranking, gold, config.half_chunks, rng)
            if found is None:
                return "no sentence without the answer in the top chunks"
            responses.append(config.answer_template.format(value=found[0]))
            kinds.append("on_topic_sentence")
            sources.append(f"sentence of top chunk {found[1]} without the answer")
        else:  # own_mistake
            responses.append(None)
            kinds.append("own_mistake")
            sources.append("")
    return responses, kinds, sources


# ---------------------------------------------------------------------------------------------------- rows


def build_qa_row(config: PreferenceDataConfig, rows: Sequence[dict], index: int, count: Counter, scorer,
                 generator=None, tokenizer=None) -> tuple[dict | None, str]:
    """One LOGO row from QA row `index` (or None and why it was skipped)."""
    item = rows[index]
    context, gold = item["context"], item["answer"].strip()
    if not context.strip() or not item["question"].strip() or not gold:
        return None, "empty context, question or answer"
    question = config.qa_question_template.format(question=item["question"].strip())
    answer = config.answer_template.format(value=gold)
    if sum(count([question, answer])) > config.chunk_size:
        return None, "question and answer longer than chunk_size"
    chunks = cover_chunks(context, config.chunk_size, count)
    scores = [float(scorer(chunk, item["question"] + "\n" + gold)) for chunk in chunks]
    ranking = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    critical = [i for i in ranking if scores[i] >= config.critical_threshold]
    if not critical:
        return None, "no critical chunk (the context does not support the answer)"
    rng = random.Random(f"{config.seed}:qa-row:{index}")
    if config.responses == "rule":
        made = rule_qa_responses(config, rows, index, chunks, ranking, rng)
        if isinstance(made, str):
            return None, made
        responses, kinds, sources = made
        generator_name = "rule"
    else:
        responses, kinds, sources = generated_responses(config, question, chunks, ranking, answer, generator,
                                                        tokenizer, seed=rng.randrange(2**31))
        generator_name = model_name(generator)

    top = ranking[: min(config.context_chunks, max(config.full_chunks, len(critical)))]
    others = [i for i in range(len(chunks)) if i not in set(top)]
    keep = sorted(set(top) | set(rng.sample(others, k=min(len(others), config.context_chunks - len(top)))))
    if None in responses:
        from align.mistakes import own_mistake
        from align.positions import PositionConfig

        slot = responses.index(None)
        fallback = other_answer(rows, index, random.Random(f"{config.seed}:own-mistake:{index}"))
        if fallback is None:
            return None, "no other row's answer differs from this one"
        positions = PositionConfig(window=config.mistake_window, chunk_size=config.chunk_size,
                                   max_chunks=config.context_chunks)
        responses[slot], kinds[slot], sources[slot] = own_mistake(
            generator, tokenizer, [chunks[i] for i in keep], question, gold, positions,
            config.generation.max_new_tokens, seed=config.seed, index=index,
            fallback=config.answer_template.format(value=fallback[0]),
            is_right=lambda text: normalized(gold) in normalized(text), fallback_kind="other_answer",
            fallback_source=f"gold answer of QA row {fallback[1]} (the generator answered right, or nothing)")
        generator_name = f"rule + {model_name(generator)}"
    if any(not r.strip() for r in responses):
        return None, "an empty response"
    if any(normalized(r) == normalized(responses[0]) for r in responses[1:]):
        return None, "a dis-preferred response equals the preferred one"
    return {
        "id": f"qa-{index}",
        "chunks": [chunks[i] for i in keep],
        "question": question,
        "answer": answer,
        "responses": responses,
        "response_kinds": kinds,
        "response_sources": sources,
        "source_doc_ids": [item["id"]],
        "chunk_indices": keep,
        "chunk_scores": [scores[i] for i in keep],
        "critical_chunks": [keep.index(i) for i in critical if i in keep],
        "fact_chunks": [position for position, i in enumerate(keep) if normalized(gold) in normalized(chunks[i])],
        "generator": generator_name,
    }, "ok"


def build_qa_rows(config: PreferenceDataConfig, rows: Sequence[dict], tokenizer,
                  generator=None) -> tuple[list[dict], dict[str, int]]:
    """Up to `config.samples` LOGO rows from the QA rows in file order; returns them and skip counts by reason."""
    check_generator(config, generator)
    scorer = get_chunk_scorer(config.scorer)
    count = token_counter(tokenizer)
    built, reasons = collect_rows(
        lambda index: build_qa_row(config, rows, index, count, scorer, generator, tokenizer),
        config.samples, len(rows), "preference rows from QA")
    if not built:
        raise UserError(f"no preference row could be built from {config.qa} "
                        f"({', '.join(f'{k}: {v}' for k, v in reasons.items())}); lower critical_threshold or check "
                        "the columns")
    return built, reasons
