"""In-process lm-eval on models held in memory: decoder-only and encoder-decoder (OpenBA), our tasks."""

import math

import pytest

from core.errors import UserError
from eval.harness import EvalResult, evaluate, load_results
from tests.eval.conftest import LIMIT

TASKS = ["corpus_ppl", "corpus_mc", "probe_needle"]


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_in_process_evaluation_reports_every_metric(family, request, tokenizer, task_set):
    model = request.getfixturevalue(family)
    result = evaluate(model, tokenizer, TASKS, task_set=task_set, limit=LIMIT)
    assert result.info["backend"] == ("seq2seq" if family == "openba" else "causal")
    ppl = result.metrics["corpus_ppl"]
    assert 1.0 < ppl["byte_perplexity"] < len(tokenizer)  # trained: far better than uniform over the vocabulary
    assert math.isclose(ppl["bits_per_byte"], math.log2(ppl["byte_perplexity"]), rel_tol=1e-9)
    assert 0.0 <= result.metrics["corpus_mc"]["acc_norm"] <= 1.0
    assert set(result.metrics) >= {"probe_needle", "probe_needle_200", "probe_needle_400"}
    assert result.higher_is_better["corpus_ppl"]["byte_perplexity"] is False
    assert result.fingerprints["corpus_ppl"]["data_sha256"] == task_set.tasks["corpus_ppl"]["sha256"]
    assert result.fingerprints["corpus_ppl"]["samples"] == LIMIT
    cells = {(c["kind"], c["length"], c["depth"]) for c in result.probe_cells}
    assert cells == {("needle", n, d) for n in (200, 400) for d in (0.0, 0.5, 1.0)}


def test_evaluation_restores_train_mode_and_leaves_the_tokenizer_alone(llama, tokenizer, task_set):
    llama.train()
    pad_before = tokenizer.pad_token_id
    evaluate(llama, tokenizer, ["corpus_mc"], task_set=task_set, limit=2)
    assert llama.training
    assert tokenizer.pad_token_id == pad_before


def test_results_round_trip_through_json(llama_results, tmp_path):
    import json

    path = tmp_path / "results.json"
    path.write_text(json.dumps(llama_results.to_dict()))
    again = load_results(path)
    assert again.metrics == llama_results.metrics and again.fingerprints == llama_results.fingerprints
    assert again.probe_cells == llama_results.probe_cells


def test_unknown_offline_task_names_the_task_and_a_close_match(llama, tokenizer, task_set):
    with pytest.raises(UserError, match="unknown task 'corpus_pplx'.*corpus_ppl"):
        evaluate(llama, tokenizer, ["corpus_pplx"], task_set=task_set)


def test_offline_task_without_a_task_set_says_how_to_make_one(llama, tokenizer):
    with pytest.raises(UserError, match="generate a task set"):
        evaluate(llama, tokenizer, ["corpus_ppl"])


def test_missing_metric_names_what_the_task_produces():
    result = EvalResult({"corpus_mc": {"acc": 0.5, "acc_norm": 0.5}}, {"corpus_mc": {"acc": True}}, {})
    with pytest.raises(UserError, match="does not produce metric 'word_perplexity'.*acc, acc_norm"):
        result.value("corpus_mc", "word_perplexity")
