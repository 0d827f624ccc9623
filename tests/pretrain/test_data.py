"""Data: local files and saved corpora through `datasets`, streaming, token-share mixtures, errors on bad input, and
batch iterators that resume exactly."""

import json

import datasets
import numpy as np
import pytest
import torch

from core.errors import UserError
from pretrain.data import DataConfig, SourceMixture, TokenizedDocuments, load_documents, load_text_dataset
from pretrain.objectives import CausalLM, ObjectiveMixture, SpecialIds, objective_batches, ul2_mixture

IDS = SpecialIds(tuple(range(1000, 1100)), {"R": 1100, "S": 1101, "X": 1102}, eos=1, pad=0)


class CharTokenizer:
    """One id per character (offset past the special ids): enough to test the plumbing without a trained model."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 900) for c in text]}


ROWS = [{"text": "a" * n, "source": "code" if i % 3 else "prose"} for i, n in enumerate(range(5, 65, 3))]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def texts(documents, count):
    return ["".join(chr(t - 3) for t in next(documents)) for _ in range(count)]


def test_loads_jsonl_text_parquet_and_saved_datasets(tmp_path, jsonl):
    assert load_text_dataset([str(jsonl)])["text"] == [r["text"] for r in ROWS]
    (tmp_path / "lines.txt").write_text("first line\nsecond line\n")
    assert load_text_dataset(str(tmp_path / "lines.txt"))["text"] == ["first line", "second line"]
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "docs.parquet"))
    assert len(load_text_dataset(str(tmp_path / "docs.parquet"))) == len(ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_text_dataset(str(tmp_path / "saved"), split="train")) == len(ROWS)
    with pytest.raises(UserError, match="no split"):
        load_text_dataset(str(tmp_path / "saved"), split="validation")


def test_bad_paths_are_user_errors(tmp_path, jsonl):
    with pytest.raises(UserError, match="not found"):
        load_text_dataset([str(tmp_path / "missing.jsonl")])
    (tmp_path / "data.csvx").write_text("x")
    with pytest.raises(UserError, match="unsupported"):
        load_text_dataset([str(tmp_path / "data.csvx")])
    (tmp_path / "lines.txt").write_text("x\n")
    with pytest.raises(UserError, match="mix kinds"):
        load_text_dataset([str(jsonl), str(tmp_path / "lines.txt")])


def test_csv_rows_load_and_a_bad_row_or_column_is_a_user_error_naming_the_setting(tmp_path, jsonl):
    datasets.Dataset.from_list(ROWS).to_csv(str(tmp_path / "docs.csv"), index=False)
    assert load_text_dataset(str(tmp_path / "docs.csv"))["text"] == [r["text"] for r in ROWS]
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"cannot read the data files .*bad.jsonl: JSON parse error"):
        load_text_dataset(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match=r"no column 'body'; columns are \['text', 'source'\] .*data.text_column"):
        load_documents(DataConfig(paths=[str(jsonl)], text_column="body"), CharTokenizer())
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match=r"no split 'validation'.*data.split, validation_split"):
        load_text_dataset(str(tmp_path / "saved"), split="validation")


def test_empty_datasets_fail_before_training(tmp_path):
    empty = datasets.Dataset.from_dict({"text": [], "source": []})
    with pytest.raises(UserError, match="empty"):
        TokenizedDocuments(empty, CharTokenizer())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_documents(DataConfig(paths=[str(tmp_path / "empty.jsonl")], streaming=True), CharTokenizer())
    with pytest.raises(UserError, match="empty"):  # a source that filters to nothing
        load_documents(DataConfig(source_weights={"books": 1.0}), CharTokenizer(),
                       dataset=datasets.Dataset.from_list(ROWS))
    with pytest.raises(UserError, match="empty"):
        objective_batches([], ObjectiveMixture([CausalLM()]), batch_size=1, input_length=8, encoder_decoder=False)


def test_streaming_yields_the_same_documents_as_map_style_and_resumes(jsonl):
    config = DataConfig(paths=[str(jsonl)], shuffle=False)
    in_memory = load_documents(config, CharTokenizer())
    streamed = load_documents(DataConfig(paths=[str(jsonl)], streaming=True), CharTokenizer())
    assert isinstance(streamed.dataset, datasets.IterableDataset)
    assert texts(in_memory, len(ROWS)) == texts(streamed, len(ROWS)) == [r["text"] for r in ROWS]
    # past the end: a new epoch
    assert texts(streamed, 1) == [ROWS[0]["text"]] and streamed.epoch == 1
    state = json.loads(json.dumps(streamed.state_dict()))
    expected = texts(streamed, 5)
    resumed = load_documents(DataConfig(paths=[str(jsonl)], streaming=True), CharTokenizer())
    resumed.load_state_dict(state)
    assert texts(resumed, 5) == expected


def test_map_style_order_is_a_seeded_permutation_per_epoch():
    dataset = datasets.Dataset.from_list(ROWS)
    documents = TokenizedDocuments(dataset, CharTokenizer(), seed=3)
    first, second = texts(documents, len(ROWS)), texts(documents, len(ROWS))
    assert sorted(first) == sorted(second) == sorted(r["text"] for r in ROWS)
    assert first != second  # reshuffled per epoch
    again = TokenizedDocuments(dataset, CharTokenizer(), seed=3)
    assert texts(again, len(ROWS)) == first
    once = TokenizedDocuments(dataset, CharTokenizer(), repeat=False)
    assert len(list(once)) == len(ROWS)


def test_source_mixture_holds_token_shares_within_one_document():
    dataset = datasets.Dataset.from_list(ROWS * 5)
    mixture = load_documents(DataConfig(source_weights={"code": 0.3, "prose": 0.7}), CharTokenizer(),
                             dataset=dataset)
    assert isinstance(mixture, SourceMixture)
    for _ in range(200):
        next(mixture)
    taken = sum(mixture.taken.values())
    assert abs(mixture.taken["code"] - 0.3 * taken) <= 65 and abs(mixture.taken["prose"] - 0.7 * taken) <= 65
    assert mixture.token_shares()["code"] == pytest.approx(0.3, abs=0.01)
    with pytest.raises(UserError, match="unknown"):
        SourceMixture({"code": mixture.sources["code"]}, {"books": 1.0})
    with pytest.raises(UserError, match="positive"):
        SourceMixture({"code": mixture.sources["code"]}, {"code": 0.0})


@pytest.mark.slow  # builds the whole stdlib corpus (~8 s)
def test_embedded_corpus_is_the_default_source():
    documents = load_documents(DataConfig(split="validation", source_weights={"code": 0.5, "prose": 0.5}),
                               CharTokenizer())
    assert len(next(documents)) > 0


def batches_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("encoder_decoder", [True, False], ids=["enc-dec", "decoder-only"])
def test_batches_resume_exactly_from_a_saved_state(packed, encoder_decoder):
    def build(seed=0):
        documents = load_documents(DataConfig(source_weights={"code": 0.6, "prose": 0.4}), CharTokenizer(),
                                   dataset=datasets.Dataset.from_list(ROWS * 4))
        return objective_batches(documents, ul2_mixture(IDS, [1] * 7), batch_size=2, input_length=48,
                                 target_length=32 if encoder_decoder else None, encoder_decoder=encoder_decoder,
                                 packed=packed, seed=seed)

    run = build()
    for _ in range(7):
        next(run)
    run.mixture.set_weights([1, 2, 3, 4, 5, 6, 7])  # as D-UL2 would: the weights travel with the data state
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON (or torch.save) round trip
    expected = [next(run) for _ in range(6)]
    resumed = build(seed=99)
    resumed.load_state_dict(state)
    assert resumed.mixture.weights == pytest.approx(run.mixture.weights)
    assert all(batches_equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))
    assert {b["objective"] for b in expected} <= set(run.mixture.names)


def test_a_long_document_gives_several_examples_and_the_budget_is_checked():
    document = list(np.arange(3, 503))
    batches = objective_batches([document], ObjectiveMixture([CausalLM()]), batch_size=1, input_length=100,
                                encoder_decoder=False)
    rows = [next(batches)["input_ids"][0].tolist() for _ in range(5)]
    assert sum(rows, []) == document
    with pytest.raises(UserError, match="cannot fit"):
        objective_batches([document], ul2_mixture(IDS), batch_size=1, input_length=2, target_length=2)
