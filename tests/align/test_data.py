"""Preference data: the asked fact sits in a critical chunk of the shared context, the responses are what the rules
say (gold, a distractor's value, irrelevant text), rows carry provenance, chunk sizes hold, builds are reproducible,
scorers are pluggable, bad rows and settings are clear errors, and the CLI writes a dataset with a manifest."""

import json

import datasets
import pytest

from align.build_data import main
from align.data import (
    RESPONSE_COLUMNS,
    GenerationConfig,
    PreferenceDataConfig,
    build_preference_rows,
    check_rows,
    chunk_text,
    load_rows,
    token_counter,
)
from align.scoring import content_overlap, get_chunk_scorer, register_chunk_scorer
from core.checkpoint import load_model, load_tokenizer
from core.errors import UserError
from tests.align.conftest import DATA_SETTINGS


def small_config(**overrides) -> PreferenceDataConfig:
    settings = {key.split(".")[1]: int(value) for key, value in (s.split("=") for s in DATA_SETTINGS)}
    return PreferenceDataConfig(**{**settings, **overrides})


def test_rows_put_the_fact_in_a_critical_chunk_with_provenance(workspace):
    rows = load_rows(workspace / "data")
    tokenizer = load_tokenizer(workspace / "tokenizer")
    count = token_counter(tokenizer)
    corpus_train = set(datasets.load_from_disk(str(workspace / "corpus"))["train"]["doc_id"])
    assert len(rows) == 8
    for row in rows:
        value = row["answer"].strip()
        fact_chunk = row["fact_chunks"][0]
        assert fact_chunk in row["critical_chunks"]
        assert f"is {value}." in row["chunks"][fact_chunk]
        assert row["chunk_scores"][fact_chunk] == max(row["chunk_scores"])
        assert row["responses"][0] == row["answer"] and row["response_kinds"][0] == "gold"
        assert row["response_kinds"][1] == "partial" and row["responses"][1].strip() != value
        assert row["response_kinds"][2] in ("irrelevant_number", "ignores_question", "hallucinated")
        assert row["chunk_indices"] == sorted(row["chunk_indices"]) and len(row["chunks"]) == 6
        assert max(count(row["chunks"])) <= 128
        assert set(row["source_doc_ids"]) <= corpus_train  # training text only: eval probes read validation
        assert row["generator"] == "rule"
    provenance = json.loads((workspace / "data" / "provenance.json").read_text())
    assert provenance["config"]["data"]["chunk_size"] == 128
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    assert manifest["metrics"]["rows"] == 8


def test_partial_response_is_the_value_of_a_distractor_fact_in_the_context(workspace):
    for row in load_rows(workspace / "data"):
        if row["response_sources"][1].startswith("distractor"):
            assert f"is {row['responses'][1].strip()}." in "".join(row["chunks"]) or -1 in row["fact_chunks"]


def test_same_seed_same_rows_other_seed_other_rows(workspace):
    corpus = datasets.load_from_disk(str(workspace / "corpus"))["train"]
    tokenizer = load_tokenizer(workspace / "tokenizer")
    texts, ids = corpus["text"], corpus["doc_id"]
    a, _ = build_preference_rows(small_config(samples=2), texts, ids, tokenizer)
    b, _ = build_preference_rows(small_config(samples=2), texts, ids, tokenizer)
    c, _ = build_preference_rows(small_config(samples=2, seed=1), texts, ids, tokenizer)
    assert a == b and a != c


def test_near_miss_negatives_change_one_or_two_digits_and_leave_the_rest_of_the_row(workspace):
    corpus = datasets.load_from_disk(str(workspace / "corpus"))["train"]
    tokenizer = load_tokenizer(workspace / "tokenizer")
    texts, ids = corpus["text"], corpus["doc_id"]
    default, _ = build_preference_rows(small_config(samples=4), texts, ids, tokenizer)
    near, _ = build_preference_rows(small_config(samples=4, rule_rejected=["partial", "near_miss"]), texts, ids,
                                    tokenizer)
    assert len(near) == len(default) == 4
    for plain, row in zip(default, near):
        assert row["response_kinds"][1:] == ["partial", "near_miss"] and len(row["responses"]) == 3
        gold, miss = row["responses"][0].strip(), row["responses"][2].strip()
        assert len(miss) == len(gold) and miss.isdigit() and 1 <= sum(a != b for a, b in zip(gold, miss)) <= 2
        # the near miss has its own random stream: context, gold and partial answer are the default row's
        assert {k: v for k, v in row.items() if k not in RESPONSE_COLUMNS} == \
            {k: v for k, v in plain.items() if k not in RESPONSE_COLUMNS}
        assert row["responses"][:2] == plain["responses"][:2]
    only, _ = build_preference_rows(small_config(samples=2, rule_rejected=["near_miss"]), texts, ids, tokenizer)
    assert [r["response_kinds"] for r in only] == [["gold", "near_miss"]] * 2
    check_rows(only, num_rejected=1)
    with pytest.raises(UserError, match="num_rejected"):
        check_rows(only, num_rejected=2)


@pytest.mark.parametrize("rejected", [[], ["partial", "partial"], ["wrong"]])
def test_bad_rule_rejected_is_a_clear_error(rejected):
    with pytest.raises(UserError, match="rule_rejected"):
        small_config(rule_rejected=rejected)


def test_chunks_end_at_line_ends_and_respect_the_budget(workspace):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    text = "".join(f"line {i} " + "x" * (i % 40) + "\n" for i in range(200)) + "y" * 300 + "\n"
    chunks = chunk_text(text, 64, token_counter(tokenizer))
    assert "".join(chunks) == text
    assert all(n <= 64 for n in token_counter(tokenizer)(chunks))
    assert all(chunk.endswith("\n") or "y" in chunk for chunk in chunks)


def test_scorers_are_pluggable_by_name_or_dotted_path():
    assert content_overlap("The secret number of the teal yak is 123456.",
                           "What is the secret number of the teal yak? 123456") == 5.0
    assert get_chunk_scorer("align.scoring:number_overlap")("id 42 and 7", "42") == 1.0

    @register_chunk_scorer("test_length")
    def by_length(chunk, query):
        return float(len(chunk))

    assert get_chunk_scorer("test_length") is by_length
    with pytest.raises(UserError, match="unknown chunk scorer"):
        get_chunk_scorer("spacy_ner")
    with pytest.raises(UserError, match="cannot load"):
        get_chunk_scorer("align.scoring:missing")


def test_generator_responses_follow_the_full_half_wrong_strategies(workspace):
    corpus = datasets.load_from_disk(str(workspace / "corpus"))["train"]
    tokenizer = load_tokenizer(workspace / "tokenizer")
    generator = load_model(workspace / "llama").eval()
    calls = []
    generate = generator.generate

    def recording_generate(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    generator.generate = recording_generate
    settings = GenerationConfig(min_new_tokens=3, max_new_tokens=4, stop_at_newline=False)
    config = small_config(samples=1, responses="generator", generation=settings)
    rows, _ = build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer, generator)
    row = rows[0]
    assert row["response_kinds"] == ["full", "half", "wrong"]
    assert all(r.strip() for r in row["responses"])
    assert "generated from chunks" in row["response_sources"][2]
    assert {(c["temperature"], c["top_p"], c["do_sample"], c["max_new_tokens"]) for c in calls} == {(0.7, 0.95, True, 4)}
    # each strategy's prompt holds its own chunks: full > half context, wrong a different set
    lengths = [c["input_ids"].shape[1] for c in calls[:3]]
    assert lengths[0] > lengths[1]
    gold = small_config(samples=1, responses="generator", generation=GenerationConfig(
        min_new_tokens=3, max_new_tokens=4, stop_at_newline=False, preferred="gold"))
    rows, _ = build_preference_rows(gold, corpus["text"], corpus["doc_id"], tokenizer, generator)
    assert rows[0]["responses"][0] == rows[0]["answer"]
    with pytest.raises(UserError, match="generator"):
        build_preference_rows(config, corpus["text"], corpus["doc_id"], tokenizer, None)


def test_temperature_zero_generates_greedily(workspace):
    """Greedy responses are the model's argmax continuation of each strategy's prompt, the same on every build."""
    import torch

    from align.data import generate_response

    tokenizer = load_tokenizer(workspace / "tokenizer")
    generator = load_model(workspace / "llama").eval()
    greedy = GenerationConfig(temperature=0.0, min_new_tokens=3, max_new_tokens=3, stop_at_newline=False)
    prompt = "def parse(text):\n    return"
    first = generate_response(generator, tokenizer, prompt, greedy, seed=1)
    assert first == generate_response(generator, tokenizer, prompt, greedy, seed=2)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(3):
            token = generator(input_ids=ids).logits[0, -1].argmax()
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    assert first == tokenizer.decode(expected, skip_special_tokens=True)


def test_rows_without_dispreferred_responses_are_rejected():
    good = {"id": "a", "chunks": ["x\n"], "question": "q", "responses": ["yes", "no", "maybe"]}
    check_rows([good], num_rejected=2)
    with pytest.raises(UserError, match="row b has 0 dis-preferred"):
        check_rows([good, {**good, "id": "b", "responses": ["yes"]}], num_rejected=1)
    with pytest.raises(UserError, match="empty response"):
        check_rows([{**good, "responses": ["yes", " "]}], num_rejected=1)
    with pytest.raises(UserError, match="lacks column"):
        check_rows([{"id": "c", "text": "x"}])


def test_cli_writes_a_dataset_and_refuses_bad_settings_before_writing(workspace, tmp_path, capsys):
    out = tmp_path / "data"
    main(["--tokenizer", str(workspace / "tokenizer"), "--corpus", str(workspace / "corpus"), "--out", str(out),
          *[f"--set={s}" for s in DATA_SETTINGS], "--set", "data.samples=2"])
    assert "rows" in capsys.readouterr().out
    assert len(load_rows(out)) == 2 and (out / "manifest.json").is_file()
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["--tokenizer", str(workspace / "tokenizer"), "--corpus", str(workspace / "corpus"), "--out", str(bad),
              "--set", "data.chunk_size=40"])
    assert exit_info.value.code == 2
    assert "leaves no room" in capsys.readouterr().err
    assert not bad.exists() and not (tmp_path / "bad.partial").exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["inside the tokenizer", "no tokenizer", "missing corpus", "generator needed",
                                  "users folder", "missing tokenizer"])
def test_bad_input_is_one_error_and_nothing_is_written(case, workspace, tmp_path, capsys):
    from tests.core.test_out_policy import refused

    root, out = tmp_path, tmp_path / "data"
    sources = {"tokenizer": str(workspace / "tokenizer"), "corpus": str(workspace / "corpus")}
    extra: list[str] = []
    if case == "inside the tokenizer":
        root, out, expected = workspace / "tokenizer", workspace / "tokenizer" / "data", "lies inside it"
    elif case == "no tokenizer":
        del sources["tokenizer"]
        expected = "no tokenizer given (--tokenizer DIR)"
    elif case == "missing tokenizer":
        sources["tokenizer"], expected = str(tmp_path / "nowhere"), "does not exist"
    elif case == "missing corpus":
        sources["corpus"], expected = str(tmp_path / "nowhere"), "corpus directory not found"
    elif case == "generator needed":
        extra, expected = ["--set", "data.responses=generator"], "need --generator DIR"
    else:
        out.mkdir()
        (out / "rows.jsonl").write_text("{}\n")
        expected = "already holds files this stage did not write (rows.jsonl)"

    def build_data(_model, output):
        main([*[f"--{name}={path}" for name, path in sources.items()], "--out", str(output),
              *[f"--set={s}" for s in DATA_SETTINGS], *extra])

    assert expected in refused(build_data, None, out, root, capsys)


def test_a_build_from_another_tokenizer_is_not_taken_for_the_finished_one(workspace, tmp_path):
    """The inputs are config fields: a finished output is reused only for the same tokenizer and corpus."""
    import shutil

    from core.stage import Manifest

    out = tmp_path / "data"
    arguments = ["--corpus", str(workspace / "corpus"), "--out", str(out), *[f"--set={s}" for s in DATA_SETTINGS],
                 "--set", "data.samples=2"]
    main(["--tokenizer", str(workspace / "tokenizer"), *arguments])
    first = Manifest.read(out)
    main(["--tokenizer", str(workspace / "tokenizer"), *arguments])
    assert Manifest.read(out).timings == first.timings
    other = shutil.copytree(workspace / "tokenizer", tmp_path / "other-tokenizer")
    main(["--tokenizer", str(other), *arguments])
    assert Manifest.read(out).config["tokenizer"] == str(other) != first.config["tokenizer"]
