"""Offline task sets: deterministic bytes, hash-checked loading, rows cut from the validation split only."""

import json

import pytest

from core.errors import UserError
from eval.probes import DISTRACTORS, kv_row, needle_row, needles_row, probe_rows
from eval.taskdata import TaskDataConfig, generate_task_set, load_task_set, task_metrics
from tests.eval.conftest import TASK_DATA


def _rows(task_set, name):
    return [json.loads(line) for line in (task_set.directory / task_set.tasks[name]["file"]).open()]


def test_generation_is_deterministic_byte_for_byte(task_set, cache_dir, tmp_path):
    content = generate_task_set(TASK_DATA, tmp_path / "again", cache_dir)
    assert content["fingerprint"] == task_set.fingerprint
    assert content["files"] == task_set.files
    for file in task_set.files:
        assert (tmp_path / "again" / file).read_bytes() == (task_set.directory / file).read_bytes()


def test_another_seed_gives_other_data(task_set, cache_dir, tmp_path):
    other = TaskDataConfig(**{**TASK_DATA.__dict__, "seed": 1})
    content = generate_task_set(other, tmp_path / "seed1", cache_dir)
    assert content["fingerprint"] != task_set.fingerprint


def test_changed_data_file_is_refused_on_load(task_set, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(task_set.directory, copy)
    assert load_task_set(copy).fingerprint == task_set.fingerprint  # a moved copy loads (YAMLs re-pointed)
    assert str(copy.resolve()) in (copy / "corpus_ppl.yaml").read_text()
    path = copy / task_set.tasks["corpus_mc"]["file"]
    rows = path.read_text().splitlines(keepends=True)
    path.write_text("".join(rows[1:] + rows[:1]))  # same rows, another order: still a different file
    with pytest.raises(UserError, match="changed since it was generated"):
        load_task_set(copy)


def test_every_configured_task_and_metric_is_generated(task_set):
    assert set(task_set.tasks) == set(task_metrics(TASK_DATA))
    assert task_set.members("probe_kv") == ["probe_kv_200", "probe_kv_400"]
    yaml_text = (task_set.directory / "corpus_ppl.yaml").read_text()
    assert task_set.tasks["corpus_ppl"]["sha256"] in yaml_text  # results carry the data hash
    assert len(_rows(task_set, "corpus_ppl")) == TASK_DATA.ppl_documents


def test_rows_come_from_the_validation_split_only(task_set, corpus):
    validation = "\n".join(corpus["validation"]["text"])
    train = "\n".join(corpus["train"]["text"])
    for row in _rows(task_set, "corpus_ppl"):
        assert row["text"] in validation
    for row in _rows(task_set, "corpus_mc"):
        assert row["context"] + row["choices"][row["label"]] in validation  # the answer is the real continuation
        assert row["context"] not in train


def test_continuation_distractors_are_distinct_spans_of_other_documents(task_set, corpus):
    by_doc = dict(zip(corpus["validation"]["doc_id"], corpus["validation"]["text"]))
    for row in _rows(task_set, "corpus_mc"):
        assert len(row["choices"]) == TASK_DATA.mc_choices and len(set(row["choices"])) == TASK_DATA.mc_choices
        wrong = [c for i, c in enumerate(row["choices"]) if i != row["label"]]
        assert all(c not in by_doc[row["doc_id"]] for c in wrong)


def test_probe_fact_sits_at_its_depth_and_the_question_at_the_end(task_set):
    for kind in ("needle", "kv"):
        for row in _rows(task_set, f"probe_{kind}_400"):
            prompt, answer = row["prompt"], row["answer"]
            assert prompt.rstrip().endswith("Answer:")
            assert prompt.count(answer) == 1
            context = row["context_chars"]
            assert abs(row["fact_at"] / context - row["depth"]) < 0.25
            assert 0.6 * 400 <= context <= 1.2 * 400


def test_probe_rows_are_a_pure_function_of_their_seed():
    texts = ["alpha line\n" * 30, "beta line\n" * 30]
    assert probe_rows("needle", texts, 300, (0.0, 1.0), 2, 7) == probe_rows("needle", texts, 300, (0.0, 1.0), 2, 7)
    import random

    first, last = kv_row(500, 0.0, random.Random(1)), kv_row(500, 1.0, random.Random(1))
    assert first["fact_at"] < 20 < last["fact_at"]
    assert needle_row(texts, 300, 0.0, random.Random(2))["fact_at"] == 0


def test_probe_rows_do_not_depend_on_the_process_hash_seed():
    """Task data are rebuilt by other processes (a gate run alone, a resumed recipe): Python's per-process string
    hashing must not reach the rows (kv keys once came out of a set in hash order)."""
    import os
    import subprocess
    import sys

    script = ("import json; from eval.probes import probe_rows; texts = ['alpha line\\n' * 30, 'beta line\\n' * 30]; "
              "print(json.dumps([probe_rows(k, texts, 400, (0.0, 1.0), 2, 3) for k in ('needle', 'needles', 'kv')]))")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and json.loads(outputs.pop())


def test_needles_hide_the_asked_fact_among_distractor_facts():
    import random
    import re

    texts = [f"line {i} of some prose\n" * 40 for i in range(3)]
    for depth in (0.0, 0.5, 1.0):
        row = needles_row(texts, 1500, depth, random.Random(depth))
        facts = re.findall(r"The secret number of the (\w+ \w+) is (\d+)\.\n", row["prompt"])
        asked = re.search(r"What is the secret number of the (\w+ \w+)\?", row["prompt"]).group(1)
        assert len(facts) == 1 + DISTRACTORS
        assert len({name for name, _ in facts}) == len({value for _, value in facts}) == len(facts)
        assert dict(facts)[asked] == row["answer"] and row["prompt"].count(row["answer"]) == 1
        assert row["prompt"][row["fact_at"]:].startswith(f"The secret number of the {asked} is")
        assert abs(row["fact_at"] / row["context_chars"] - depth) < 0.2
        assert row["prompt"].rstrip().endswith("Answer:")
    assert probe_rows("needles", texts, 900, (0.5,), 2, 3) == probe_rows("needles", texts, 900, (0.5,), 2, 3)


@pytest.mark.parametrize("field, value, message", [
    ("probe_depths", (0.5, 1.5), "probe_depths"),
    ("probe_kinds", ("needle", "haystack"), "unknown probe kinds"),
    ("probe_lengths", (10,), "at least 64"),
    ("mc_choices", 1, "mc_choices"),
])
def test_bad_task_data_config_is_a_user_error(field, value, message):
    with pytest.raises(UserError, match=message):
        TaskDataConfig(**{field: value})


def test_not_a_task_set_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not an eval task set"):
        load_task_set(tmp_path)
