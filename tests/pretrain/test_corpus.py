"""The stdlib corpus: disjoint splits, determinism, honest summaries, atomic cache, one-line errors."""

import hashlib
import statistics

import pytest

from core.errors import UserError
from pretrain import corpus as corpus_module
from pretrain.corpus import (
    CorpusConfig, atomic_directory, build_corpus, corpus_fingerprint, corpus_summary, docstrings, format_summary,
    load_or_build_corpus, split_lines,
)

SMALL = CorpusConfig(max_documents=60, max_chars_per_document=20_000, validation_size=0.1, calibration_size=0.1)


@pytest.fixture(scope="session")
def small_corpus():
    return build_corpus(SMALL)


def group_of(doc_id: str) -> str:
    return doc_id.split(":", 1)[1].split(".")[0]


def test_splits_share_no_document_and_no_module_group(small_corpus):
    ids = {split: set(small_corpus[split]["doc_id"]) for split in ("train", "calibration", "validation")}
    assert all(ids.values()), "every split has documents"
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["calibration"]
    assert not ids["validation"] & ids["calibration"]
    groups = {split: {group_of(d) for d in docs} for split, docs in ids.items()}
    assert not groups["train"] & groups["validation"], "a module's docstrings must not leak into another split"


def test_building_twice_gives_identical_texts(small_corpus):
    again = build_corpus(SMALL)
    for split in small_corpus:
        first = hashlib.sha256("\0".join(small_corpus[split]["text"]).encode()).hexdigest()
        assert first == hashlib.sha256("\0".join(again[split]["text"]).encode()).hexdigest()
    assert corpus_fingerprint(again) == corpus_fingerprint(small_corpus)


def test_another_seed_picks_other_documents(small_corpus):
    other = build_corpus(CorpusConfig(**{**SMALL.__dict__, "seed": 1}))
    assert corpus_fingerprint(other) != corpus_fingerprint(small_corpus)


def test_rows_have_the_promised_columns(small_corpus):
    rows = [row for split in small_corpus for row in small_corpus[split]]
    assert {row["source"] for row in rows} == {"code", "prose"}
    for row in rows:
        assert row["doc_id"].startswith(row["source"] + ":")
        assert row["length"] == len(row["text"]) <= SMALL.max_chars_per_document
    assert len({row["doc_id"] for row in rows}) == SMALL.max_documents


def test_code_documents_are_files_under_headers_without_test_suites(small_corpus):
    code = [row["text"] for row in small_corpus["train"] if row["source"] == "code" and row["part"] == 0]
    assert code and all(text.startswith("# file: ") for text in code)
    headers = [line for text in code for line in text.splitlines() if line.startswith("# file: ")]
    assert not [h for h in headers if "/test/" in h or "/tests/" in h or "idle_test" in h]


def test_summary_matches_the_data(small_corpus):
    summary = corpus_summary(small_corpus)
    for split in small_corpus:
        data = small_corpus[split]
        assert summary[split]["all"]["rows"] == len(data)
        assert summary[split]["all"]["chars"] == sum(len(t) for t in data["text"])
        for source in set(data["source"]):
            per_doc = {}
            for row in data:
                if row["source"] == source:
                    per_doc[row["doc_id"]] = per_doc.get(row["doc_id"], 0) + len(row["text"])
            stats = summary[split][source]
            assert stats["documents"] == len(per_doc)
            assert stats["max_chars"] == max(per_doc.values())
            assert stats["median_chars"] == statistics.median(per_doc.values())
    assert "validation" in format_summary(summary)


def test_split_lines_cuts_at_line_ends_and_loses_nothing():
    text = "".join(f"line {i}\twith  spaces\n" for i in range(500)) + "x" * 300
    parts = split_lines(text, 256)
    assert "".join(parts) == text
    assert all(len(p) <= 256 for p in parts)
    assert all(p.endswith("\n") for p in parts[:-2])


def test_docstrings_are_read_without_importing_and_short_ones_dropped():
    source = '"""Module doc that is long enough to keep."""\nimport not_a_real_module\n' \
             'def f():\n    """Short."""\nclass C:\n    """Class doc that is also long enough to keep."""\n'
    assert docstrings(source, min_chars=20) == [
        "Module doc that is long enough to keep.", "Class doc that is also long enough to keep."
    ]


def test_cache_builds_once_then_loads(tmp_path, monkeypatch):
    config = CorpusConfig(max_documents=12, validation_size=1, calibration_size=1)
    first = load_or_build_corpus(config, tmp_path)
    monkeypatch.setattr(corpus_module, "build_corpus", lambda *_: pytest.fail("cache was not used"))
    second = load_or_build_corpus(config, tmp_path)
    assert corpus_fingerprint(first) == corpus_fingerprint(second)
    assert [p.name for p in tmp_path.iterdir()] == [f"corpus-{config.fingerprint()}"], "no partial dirs left"


def test_atomic_directory_keeps_the_old_output_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("bad", [{"sources": ("audio",)}, {"validation_size": 1.5}, {"max_documents": 0},
                                 {"extra_packages": ("surely_not_installed_pkg",)}])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        build_corpus(CorpusConfig(**bad))


def test_holding_out_every_group_is_a_user_error():
    with pytest.raises(UserError, match="leave none"):
        build_corpus(CorpusConfig(max_documents=3, validation_size=5, calibration_size=5))


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        corpus_module.main(["--help"])
    assert "examples:\n  python -m pretrain.corpus --out" in capsys.readouterr().out


def test_the_command_saves_the_corpus_under_the_stage_contract_and_skips_a_rerun(tmp_path, capsys):
    import datasets

    from core.stage import Manifest

    out = tmp_path / "corpus"
    corpus_module.main(["--out", str(out), "--max-documents", "12", "--sources", "code", "--seed", "1"])
    manifest = Manifest.read(out)
    assert manifest.stage == "corpus" and manifest.config["sources"] == ["code"]
    assert manifest.parameters == {"before": None, "after": None}  # data, not a model
    saved = datasets.load_from_disk(str(out))
    assert manifest.metrics["fingerprint"] == corpus_fingerprint(saved)
    assert set(saved["train"]["source"]) == {"code"}
    assert "fingerprint" in capsys.readouterr().out
    corpus_module.main(["--out", str(out), "--max-documents", "12", "--sources", "code", "--seed", "1"])
    assert Manifest.read(out).timings == manifest.timings


@pytest.mark.parametrize("case", ["users folder", "unknown package", "bad size", "a file"])
def test_bad_input_is_one_error_and_nothing_is_written(case, tmp_path, capsys):
    from tests.core.test_out_policy import refused

    out, extra = tmp_path / "corpus", ["--max-documents", "12"]
    if case == "users folder":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
        expected = "already holds files this stage did not write (thesis.tex)"
    elif case == "unknown package":
        extra, expected = ["--extra-package", "surely_not_installed_pkg"], "is not installed"
    elif case == "bad size":
        extra, expected = ["--validation-size", "1.5"], "validation_size must be a fraction"
    else:
        out.write_text("notes")
        expected = "exists and is not a directory"

    def corpus(_model, output):
        corpus_module.main(["--out", str(output), *extra])

    assert expected in refused(corpus, None, out, tmp_path, capsys)


def test_extra_dirs_become_groups_without_their_test_suites(tmp_path):
    package = tmp_path / "mypkg"
    (package / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text('"""My package, documented at enough length to be kept."""\n')
    (package / "a.py").write_text("def a():\n    return 1\n")
    (package / "tests" / "test_a.py").write_text("assert True\n")
    dsd = build_corpus(CorpusConfig(sources=("code",), extra_dirs=(str(package),), min_chars=1))
    rows = [row for split in dsd for row in dsd[split] if row["doc_id"] == "code:mypkg"]
    assert len(rows) == 1
    assert "# file: mypkg/a.py\ndef a():" in rows[0]["text"] and "test_a" not in rows[0]["text"]
