"""The answer-choice probe tasks: each probe row's answer ranked among its candidates by log-likelihood, through
`python -m eval.gate`, equal to a hand-run forward pass; the candidates themselves; and the run report's section."""

import json
import random

import pytest
import torch

from eval.probes import CANDIDATES, answer_candidates, kv_row, needle_row, needles_row, probe_rows
from eval.taskdata import choice_task
from tests.eval.conftest import TASK_DATA
from tests.factory import byte_tokenizer, save_byte_checkpoint

TEXTS = [f"line {i} of some prose\n" * 40 for i in range(3)]


def _hand_logliks(model, tokenizer, row) -> list[float]:
    """Total log-likelihood of " candidate" after the prompt, per candidate, one forward pass each (the byte
    tokenizer adds no special tokens, so lm-eval's tokens are the plain bytes of prompt and continuation)."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    totals = []
    for candidate in row["candidates"]:
        answer = tokenizer(" " + candidate, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0]
            else:
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        totals.append(float(torch.log_softmax(logits.double(), -1)[range(len(answer)), answer].sum()))
    return totals


@pytest.mark.parametrize("family", ["openba", "llama"])
def test_gate_gold_loglik_and_rank_equal_a_hand_computation(family, task_set, cache_dir, tmp_path):
    from core.checkpoint import load_model, load_tokenizer
    from core.config import save_config
    from eval.gate import GateConfig, main

    save_byte_checkpoint(family, tmp_path / family, byte_tokenizer(tmp_path / "tokenizer"))
    gate = GateConfig(name="choices", tasks=["probe_needle_choices_200", "probe_kv_choices_400"], limit=2,
                      task_data=TASK_DATA, cache_dir=str(cache_dir))
    save_config(gate, tmp_path / "gate.yaml")
    main(["--model", str(tmp_path / family), "--gate", str(tmp_path / "gate.yaml"),
          "--task-set", str(task_set.directory), "--out", str(tmp_path / "gate")])
    results = json.loads((tmp_path / "gate" / "results.json").read_text())["results"]
    model, tokenizer = load_model(tmp_path / family), load_tokenizer(tmp_path / family)
    cells = {(c["kind"], c["length"], c["depth"]): c for c in results["probe_cells"]}
    for task, kind in (("probe_needle_200", "needle"), ("probe_kv_400", "kv")):
        with open(task_set.directory / task_set.tasks[task]["file"]) as handle:
            rows = [json.loads(line) for line in handle][:2]  # limit=2: the first two rows (depths 0 and 0.5)
        for row in rows:
            logliks = _hand_logliks(model, tokenizer, row)
            gold = logliks[row["candidates"].index(row["answer"])]
            cell = cells[(kind, row["length"], row["depth"])]  # one row per cell: probe_samples=1
            assert cell["gold_loglik"] == pytest.approx(gold / len(" " + row["answer"]), rel=1e-4)
            assert cell["gold_rank"] == 1 + sum(ll > gold for ll in logliks)
            assert 1 <= cell["gold_rank"] <= cell["candidates"] == TASK_DATA.probe_candidates
        task_metrics = results["metrics"][choice_task(kind, rows[0]["length"])]  # the task's mean over its rows
        assert task_metrics["gold_loglik"] == pytest.approx(
            sum(cells[(kind, r["length"], r["depth"])]["gold_loglik"] for r in rows) / len(rows), rel=1e-6)
    assert results["higher_is_better"]["probe_kv_choices_400"] == {"gold_loglik": True, "gold_rank": False}


def test_candidates_hold_the_answer_once_and_are_a_pure_function_of_the_seed():
    for kind in ("needle", "needles", "kv"):
        rows = probe_rows(kind, TEXTS, 900, (0.0, 0.5, 1.0), 2, seed=3, candidates=6)
        assert rows == probe_rows(kind, TEXTS, 900, (0.0, 0.5, 1.0), 2, seed=3, candidates=6)
        assert rows != probe_rows(kind, TEXTS, 900, (0.0, 0.5, 1.0), 2, seed=4, candidates=6)
        for row in rows:
            candidates = row["candidates"]
            assert len(candidates) == len(set(candidates)) == 6 and candidates.count(row["answer"]) == 1
            assert candidates == sorted(candidates)  # the answer's place says nothing
            assert all(len(c) == len(row["answer"]) for c in candidates)  # same format: 6 digits, 8 hex digits


def test_candidates_come_from_the_context_first():
    import re

    row = needles_row(TEXTS, 1500, 0.5, random.Random(1))
    facts = dict(re.findall(r"The secret number of the (\w+ \w+) is (\d+)\.\n", row["prompt"]))
    assert set(facts.values()) <= set(row["candidates"]) and len(row["candidates"]) == CANDIDATES
    kv = kv_row(2000, 0.5, random.Random(1))
    values = set(re.findall(r'": "([0-9a-f]{8})"', kv["prompt"]))
    assert set(kv["candidates"]) <= values and len(kv["candidates"]) == CANDIDATES
    assert len(answer_candidates("5", ["5", "3", "3"], lambda r: str(r.randrange(10)), 4, random.Random(0))) == 4


def test_the_rows_themselves_do_not_move_with_the_candidates():
    """Candidates are drawn after the row, so the prompts and answers (and exact match) stay as they were."""
    for make in (lambda c: needle_row(TEXTS, 900, 0.5, random.Random(2), candidates=c),
                 lambda c: kv_row(900, 0.5, random.Random(2), candidates=c)):
        few, many = make(2), make(12)
        assert {**few, "candidates": None} == {**many, "candidates": None}
