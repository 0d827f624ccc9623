"""LOGO rows from a user's long-document QA (`python -m align.build_data --qa`): the gold answer is the preferred
response, the chunks cover the context within the chunk size, the answer-bearing chunk is critical and kept in the
shared context, the rule negatives are what they say (another row's answer, a top chunk's sentence without the
answer), column names and the split are configurable, unusable rows are skipped by reason, and a bad file is one
error line with nothing written."""

import hashlib
import json
import random

import datasets
import pytest

from align.build_data import BuildDataConfig, build, main
from align.chunks import cover_chunks
from align.data import load_rows, token_counter
from core.checkpoint import load_model, load_tokenizer
from core.config import load_config
from core.stage import Manifest

WORDS = ("harbor", "lantern", "meadow", "quarry", "saddle", "thicket", "orchard", "furnace", "gravel", "pasture",
         "cellar", "bramble", "kettle", "parlor", "ledger", "spindle")
COUNTRIES = (("Freedonia", "Zubrowka"), ("Latveria", "Doomstadt"), ("Genovia", "Pyrus"), ("Elbonia", "Mudville"),
             ("Sokovia", "Novi Grad"))
SETTINGS = ["data.chunk_size=128", "data.context_chunks=8", "data.full_chunks=2", "data.half_chunks=2",
            "data.wrong_chunks=2"]


def filler(lines: int, rng: random.Random) -> str:
    """Lines of words no question asks about (none of them a content term of the questions)."""
    return "".join(" ".join(rng.choice(WORDS) for _ in range(6)) + ".\n" for _ in range(lines))


def qa_records(seed: int = 0) -> list[dict]:
    """One row per country: the capital's sentence somewhere in ~700 bytes of filler."""
    rng = random.Random(seed)
    records = []
    for index, (country, capital) in enumerate(COUNTRIES):
        context = filler(rng.randrange(3, 9), rng) + f"The capital of {country} is {capital}.\n" + filler(8, rng)
        records.append({"id": f"doc-{index}", "document": context, "query": f"What is the capital of {country}?",
                        "answers": [capital, capital.upper()]})
    return records


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


COLUMNS = ["--set", "data.qa_columns.context=document", "--set", "data.qa_columns.question=query",
           "--set", "data.qa_columns.answer=answers"]


def test_jsonl_qa_rows_prefer_the_gold_answer_over_chunks_that_cover_the_context(workspace, tmp_path, capsys):
    records = qa_records()
    qa = tmp_path / "qa.jsonl"
    write_jsonl(qa, records)
    out = tmp_path / "data"
    main(["--tokenizer", str(workspace / "tokenizer"), "--qa", str(qa), "--out", str(out), "--no-progress",
          *COLUMNS, *[f"--set={s}" for s in SETTINGS]])
    assert "QA file" in capsys.readouterr().out
    rows = load_rows(out)
    count = token_counter(load_tokenizer(workspace / "tokenizer"))
    assert len(rows) == len(records)
    for row, record, (country, capital) in zip(rows, records, COUNTRIES):
        assert row["responses"][0] == row["answer"] == f" {capital}" and row["response_kinds"][0] == "gold"
        assert row["question"] == f"\nQuestion: What is the capital of {country}?\nAnswer:"
        assert row["source_doc_ids"] == [record["id"]]
        # every chunk fits, and with room for all of them the shared context is the whole document
        assert max(count(row["chunks"])) <= 128 and len(row["chunks"]) > 2
        assert "".join(row["chunks"]) == record["document"]
        answer_chunk = next(i for i, chunk in enumerate(row["chunks"]) if f"capital of {country} is" in chunk)
        assert row["critical_chunks"] == [answer_chunk] == row["fact_chunks"]
        assert row["chunk_scores"][answer_chunk] == max(row["chunk_scores"]) >= 3
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"] == "qa" and provenance["qa"]["format"] == "jsonl"
    assert provenance["qa"]["sha256"] == hashlib.sha256(qa.read_bytes()).hexdigest()
    assert provenance["qa"]["bytes"] == qa.stat().st_size
    assert provenance["qa"]["columns"] == {"context": "document", "question": "query", "answer": "answers"}
    manifest = Manifest.read(out)
    assert manifest.metrics["rows"] == len(records) and manifest.config["data"]["qa"] == str(qa)


def test_rule_negatives_are_another_rows_answer_and_a_top_chunk_sentence_without_the_answer(workspace, tmp_path):
    records = qa_records()
    qa = tmp_path / "qa.jsonl"
    write_jsonl(qa, records)
    config = load_config(BuildDataConfig, None, [f"tokenizer={workspace / 'tokenizer'}", f"data.qa={qa}",
                                                 "data.qa_columns.context=document", "data.qa_columns.question=query",
                                                 "data.qa_columns.answer=answers", "data.context_chunks=2",
                                                 *SETTINGS[:1], *SETTINGS[2:]])
    build(config, tmp_path / "data", progress=False)
    golds = {f" {capital}" for _, capital in COUNTRIES}
    for row in load_rows(tmp_path / "data"):
        assert row["response_kinds"] == ["gold", "on_topic_sentence", "other_answer"]
        gold, partial, other = row["responses"]
        assert other in golds - {gold} and row["response_sources"][2].startswith("gold answer of QA row")
        assert gold.strip().lower() not in partial.lower() and partial.strip() in "".join(row["chunks"])
        # two chunks of context: the answer's chunk (critical) and one other, in document order
        assert len(row["chunks"]) == 2 and row["chunk_indices"] == sorted(row["chunk_indices"])
        assert row["critical_chunks"] and gold.strip() in row["chunks"][row["critical_chunks"][0]]


def test_a_datasets_folder_is_read_at_the_configured_split_and_unusable_rows_are_skipped_by_reason(workspace,
                                                                                                  tmp_path):
    records = [{"context": r["document"], "question": r["query"], "answer": r["answers"][0]} for r in qa_records()]
    unsupported = {"context": filler(12, random.Random(5)), "question": "What is the capital of Narnia?",
                   "answer": "Cair Paravel"}
    too_long = {**records[0], "question": "Why? " * 60}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1]),
                                   "test": datasets.Dataset.from_list([*records, unsupported, too_long])})
    splits.save_to_disk(str(tmp_path / "qa"))
    config = load_config(BuildDataConfig, None, [f"tokenizer={workspace / 'tokenizer'}", f"data.qa={tmp_path / 'qa'}",
                                                 "data.qa_split=test", *SETTINGS])
    manifest = build(config, tmp_path / "data", progress=False)
    rows = load_rows(tmp_path / "data")
    assert [row["answer"] for row in rows] == [f" {capital}" for _, capital in COUNTRIES]
    assert manifest.metrics["skipped"] == {"no critical chunk (the context does not support the answer)": 1,
                                           "question and answer longer than chunk_size": 1}
    provenance = json.loads((tmp_path / "data" / "provenance.json").read_text())
    assert (provenance["qa"]["format"], provenance["qa"]["split"], provenance["qa"]["rows"]) == ("datasets", "test", 7)


@pytest.mark.parametrize("case", ["missing column", "bad JSON line", "empty file", "dict answers", "missing split",
                                  "near miss"])
def test_a_bad_qa_file_is_one_error_line_and_nothing_is_written(case, workspace, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    records = qa_records()
    extra = COLUMNS
    if case == "missing column":
        extra, expected = COLUMNS[:-2] + ["--set", "data.qa_columns.answer=gold"], "has no column 'gold'"
    elif case == "bad JSON line":
        qa.write_text(json.dumps(records[0]) + "\n" + '{"document": "x", "query": \n')
        expected = "line 2 is not valid JSON"
    elif case == "empty file":
        qa.write_text("\n")
        expected = "holds no QA rows"
    elif case == "dict answers":
        records[1]["answers"] = {"text": ["Doomstadt"], "answer_start": [3]}
        expected = "column 'answers' of row 1 holds dict values"
    elif case == "missing split":
        qa = tmp_path / "qa"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(qa))
        extra, expected = [*COLUMNS, "--set", "data.qa_split=validation"], "has no split 'validation' (splits: train)"
    else:
        extra, expected = [*COLUMNS, "--set", "data.rule_rejected=[near_miss]"], "cannot be made for QA rows"
    if case in ("missing column", "dict answers", "near miss"):
        write_jsonl(qa, records)
    out = tmp_path / "data"
    capsys.readouterr()  # what writing the file printed
    with pytest.raises(SystemExit) as exit_info:
        main(["--tokenizer", str(workspace / "tokenizer"), "--qa", str(qa), "--out", str(out), *extra,
              *[f"--set={s}" for s in SETTINGS]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "data.partial").exists()


def test_the_output_is_never_the_qa_files_folder(workspace, tmp_path, capsys):
    qa = tmp_path / "mine" / "qa.jsonl"
    qa.parent.mkdir()
    write_jsonl(qa, qa_records())
    with pytest.raises(SystemExit):
        main(["--tokenizer", str(workspace / "tokenizer"), "--qa", str(qa), "--out", str(qa.parent), *COLUMNS])
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in qa.parent.iterdir()) == ["qa.jsonl"]


def test_own_mistakes_and_generated_answers_for_qa_rows(workspace, tmp_path):
    """The generator's own answer at synthesised positions is kept when it lacks the gold answer (else another
    row's answer stands in); generated responses follow the half and wrong strategies with the gold preferred."""
    from align.qa import build_qa_rows, read_qa

    qa = tmp_path / "qa.jsonl"
    write_jsonl(qa, qa_records())
    tokenizer = load_tokenizer(workspace / "tokenizer")
    generator = load_model(workspace / "llama").eval()
    config = load_config(BuildDataConfig, None, [f"data.qa={qa}", "data.qa_columns.context=document",
                                                 "data.qa_columns.question=query", "data.qa_columns.answer=answers",
                                                 "data.rule_rejected=[own_mistake,irrelevant]",
                                                 "data.mistake_window=2048", "data.generation.max_new_tokens=4",
                                                 "data.samples=2", *SETTINGS]).data
    records, _ = read_qa(config)
    rows, _ = build_qa_rows(config, records, tokenizer, generator)
    for row in rows:
        kind = row["response_kinds"][1]
        assert kind in ("own_mistake", "other_answer") and row["generator"].startswith("rule + ")
        assert row["answer"].strip().lower() not in row["responses"][1].lower()
    generated = load_config(BuildDataConfig, None, [f"data.qa={qa}", "data.qa_columns.context=document",
                                                    "data.qa_columns.question=query", "data.qa_columns.answer=answers",
                                                    "data.responses=generator", "data.generation.preferred=gold",
                                                    "data.generation.min_new_tokens=2",
                                                    "data.generation.max_new_tokens=3", "data.samples=1",
                                                    *SETTINGS]).data
    rows, _ = build_qa_rows(generated, records, tokenizer, generator)
    assert rows[0]["response_kinds"] == ["gold", "half", "wrong"] and rows[0]["responses"][0] == " Zubrowka"


def test_chunks_cover_a_text_without_line_breaks_cut_at_sentence_ends(workspace):
    count = token_counter(load_tokenizer(workspace / "tokenizer"))
    text = " ".join(f"Sentence number {i} says {'x' * (i % 30)}." for i in range(60)) + " " + "y" * 300
    chunks = cover_chunks(text, 64, count)
    assert "".join(chunks) == text and max(count(chunks)) <= 64
    sentence_chunks = [chunk for chunk in chunks if "y" * 20 not in chunk]
    assert all(chunk.endswith(". ") for chunk in sentence_chunks[:-1])  # cut where a sentence ends
