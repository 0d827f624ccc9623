"""Gates: rule arithmetic (direction-aware), pass on an unchanged model, fail on a damaged one, bad input, CLI."""

import json
import math

import pytest

from core.errors import UserError
from eval.gate import GateFailed, GateResult, MetricRule, check_comparable, check_rules, main, run_gate
from eval.harness import EvalResult
from tests.eval.conftest import damage, small_gate


def _results(value: float, higher: bool, metric: str = "m", task: str = "t") -> EvalResult:
    return EvalResult({task: {metric: value}}, {task: {metric: higher}}, {task: {"data_sha256": "x"}})


def test_relative_drop_is_direction_aware():
    rule = MetricRule("t", "m", max_rel_drop=0.1)
    lower_better = check_rules([rule], _results(10.9, False), _results(10.0, False))[0]
    assert lower_better.ok and math.isclose(lower_better.bound, 11.0) and math.isclose(lower_better.margin, 0.1)
    worse = check_rules([rule], _results(11.5, False), _results(10.0, False))[0]
    assert not worse.ok and math.isclose(worse.margin, -0.5)
    higher_better = check_rules([rule], _results(0.5, True), _results(0.6, True))[0]
    assert not higher_better.ok and math.isclose(higher_better.bound, 0.54)
    better = check_rules([rule], _results(9.0, False), _results(10.0, False))[0]
    assert better.ok and math.isclose(better.delta, -1.0)


def test_absolute_bounds_and_drops_each_get_a_row():
    rule = MetricRule("t", "m", min=0.3, max=0.9, max_drop=0.05)
    rows = check_rules([rule], _results(0.4, True), _results(0.5, True))
    assert [(r.check, r.ok) for r in rows] == [("min", True), ("max", True), ("max_drop", False)]
    assert math.isclose(rows[2].bound, 0.45) and math.isclose(rows[2].margin, -0.05)


def test_a_value_exactly_at_a_computed_bound_passes_despite_floating_point_noise():
    rule = MetricRule("t", "m", max_drop=0.05)
    at_bound = check_rules([rule], _results(0.225, True), _results(0.275, True))[0]
    assert at_bound.bound != 0.225 and at_bound.margin < 0  # 0.275 - 0.05 is 0.22500000000000003 in binary
    assert at_bound.ok
    below = check_rules([rule], _results(0.2249999, True), _results(0.275, True))[0]
    assert not below.ok  # a real shortfall, however small in practical terms, still fails
    lower_better = check_rules([MetricRule("t", "m", max_rel_drop=0.1)], _results(1.1, False), _results(1.0, False))[0]
    assert lower_better.ok  # 1.0 * 1.1 = 1.1000000000000001


def test_nan_never_passes():
    rows = check_rules([MetricRule("t", "m", max=100.0)], _results(float("nan"), False))
    assert not rows[0].ok


def test_drop_rules_without_baseline_are_skipped_or_required():
    rule = MetricRule("t", "m", max_drop=0.1)
    row = check_rules([rule], _results(0.4, True))[0]
    assert row.ok and row.note == "skipped: no baseline"
    with pytest.raises(UserError, match="no baseline"):
        check_rules([rule], _results(0.4, True), require_baseline=True)


def test_failure_message_names_metric_value_bound_and_margin():
    rows = check_rules([MetricRule("corpus_ppl", "byte_perplexity", max_rel_drop=0.05)],
                       _results(13.0, False, "byte_perplexity", "corpus_ppl"),
                       _results(10.0, False, "byte_perplexity", "corpus_ppl"))
    result = GateResult("offline", False, rows, _results(13.0, False))
    with pytest.raises(GateFailed) as caught:
        result.raise_if_failed()
    message = str(caught.value)
    for part in ("offline", "corpus_ppl/byte_perplexity", "= 13", "above", "10.5", "baseline 10", "by 2.5"):
        assert part in message
    assert isinstance(caught.value, UserError)


def test_a_rule_without_any_bound_is_a_user_error():
    with pytest.raises(UserError, match="gives no bound"):
        MetricRule("t", "m")


def test_gate_passes_unchanged_model_and_fails_damaged_one(llama, tokenizer, task_set, cache_dir):
    gate = small_gate(cache_dir)
    baseline = run_gate(llama, tokenizer, gate, task_set=task_set)
    unchanged = run_gate(llama, tokenizer, gate, baseline=baseline, task_set=task_set)
    assert unchanged.passed, unchanged.to_table()
    assert all(r.delta == 0 for r in unchanged.rows if r.baseline is not None)

    damage(llama)
    damaged = run_gate(llama, tokenizer, gate, baseline=baseline, task_set=task_set)
    assert not damaged.passed
    failed = {(r.task, r.metric) for r in damaged.failures}
    assert ("corpus_ppl", "byte_perplexity") in failed
    ppl = damaged.results.metrics["corpus_ppl"]["byte_perplexity"]
    assert ppl > 1.05 * baseline.results.metrics["corpus_ppl"]["byte_perplexity"]
    assert "FAILED" in damaged.to_markdown() and "corpus_ppl/byte_perplexity" in damaged.to_markdown()


def test_gate_fails_damaged_openba_too(openba, tokenizer, task_set, cache_dir):
    gate = small_gate(cache_dir, rules=[MetricRule("corpus_ppl", "byte_perplexity", max_rel_drop=0.05)])
    baseline = run_gate(openba, tokenizer, gate, task_set=task_set)
    damage(openba)
    assert not run_gate(openba, tokenizer, gate, baseline=baseline, task_set=task_set).passed


def test_metric_a_task_does_not_produce_fails_before_evaluating(tokenizer, task_set, cache_dir):
    gate = small_gate(cache_dir, rules=[MetricRule("corpus_mc", "word_perplexity", max=10.0)])
    with pytest.raises(UserError, match="'corpus_mc' does not produce metric 'word_perplexity'"):
        run_gate(None, tokenizer, gate, task_set=task_set)  # no model needed: nothing is evaluated


def test_baseline_from_another_task_set_is_refused(tokenizer, task_set, cache_dir):
    gate = small_gate(cache_dir)
    other = EvalResult({"corpus_ppl": {"byte_perplexity": 9.0}, "corpus_mc": {"acc_norm": 0.5}}, {},
                       {"corpus_ppl": {"data_sha256": "0" * 64}, "corpus_mc": {"data_sha256": "1" * 64}})
    with pytest.raises(UserError, match="another task set: task 'corpus_ppl'"):
        run_gate(None, tokenizer, gate, baseline=other, task_set=task_set)
    missing = EvalResult({"hellaswag": {"acc": 0.3}}, {}, {})
    with pytest.raises(UserError, match="another task set: it has no results for task 'corpus_ppl'"):
        run_gate(None, tokenizer, gate, baseline=missing, task_set=task_set)


def test_baseline_measured_with_another_limit_is_refused():
    rule = MetricRule("corpus_ppl", "byte_perplexity", max_rel_drop=0.05)
    now = EvalResult({"corpus_ppl": {"byte_perplexity": 9.0}}, {}, {"corpus_ppl": {"data_sha256": "a", "samples": 4}})
    then = EvalResult({"corpus_ppl": {"byte_perplexity": 9.0}}, {}, {"corpus_ppl": {"data_sha256": "a", "samples": 2}})
    check_comparable(now, now, [rule])
    with pytest.raises(UserError, match="another task set: task 'corpus_ppl' differs \\(samples 2 vs now 4\\)"):
        check_comparable(then, now, [rule])


def _gate_yaml(tmp_path, cache_dir):
    from core.config import save_config

    path = tmp_path / "gate.yaml"
    save_config(small_gate(cache_dir), path)
    return path


def test_cli_exit_codes_results_json_and_manifest(llama_dir, tokenizer, trained_llama, tmp_path, cache_dir, capsys):
    from core.checkpoint import save_checkpoint
    from core.stage import Manifest

    gate_yaml = _gate_yaml(tmp_path, cache_dir)
    main(["--model", str(llama_dir), "--gate", str(gate_yaml), "--out", str(tmp_path / "base")])
    results = tmp_path / "base" / "results.json"
    assert json.loads(results.read_text())["passed"] is True
    assert Manifest.read(tmp_path / "base").metrics["passed"] is True
    assert "gate 'small' passed" in capsys.readouterr().out

    import copy
    broken = copy.deepcopy(trained_llama)
    damage(broken)
    broken_dir = save_checkpoint(broken, tokenizer, tmp_path / "broken")
    with pytest.raises(SystemExit) as caught:
        main(["--model", str(broken_dir), "--gate", str(gate_yaml), "--baseline", str(results),
              "--out", str(tmp_path / "after")])
    assert caught.value.code == 1
    assert "corpus_ppl/byte_perplexity" in capsys.readouterr().err
    assert json.loads((tmp_path / "after" / "results.json").read_text())["passed"] is False


@pytest.mark.parametrize("problem", ["missing model", "not a checkpoint", "unknown key", "unknown task",
                                     "inside the model", "users folder", "out holds the baseline", "truncated weights"])
def test_cli_bad_input_exits_2_before_writing(problem, llama_dir, tmp_path, cache_dir, capsys):
    import shutil

    from tests.core.test_out_policy import refused

    gate_yaml = _gate_yaml(tmp_path, cache_dir)
    model, root, out, extra = llama_dir, tmp_path, tmp_path / "out", []
    if problem == "missing model":
        model, expected = tmp_path / "nowhere", "does not exist"
    elif problem == "not a checkpoint":
        model, expected = tmp_path / "empty", "no config.json"
        model.mkdir()
    elif problem == "unknown key":
        extra, expected = ["limt=3"], "did you mean 'limit'"
    elif problem == "unknown task":
        extra, expected = ["tasks=[corpus_mcq]"], "corpus_mcq"
    elif problem == "inside the model":
        root, out, expected = llama_dir, llama_dir / "gate", "lies inside it"
    elif problem == "users folder":
        out.mkdir()
        (out / "results.json").write_text("{}")
        expected = "already holds files this stage did not write (results.json)"
    elif problem == "out holds the baseline":
        (out / "earlier").mkdir(parents=True)
        (out / "earlier" / "results.json").write_text("{}")
        extra, expected = ["--baseline", str(out / "earlier" / "results.json")], "holds the input"
    else:
        model = shutil.copytree(llama_dir, tmp_path / "truncated")
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
        expected = "corrupt safetensors file"

    def gate(model_dir, output):
        main(["--model", str(model_dir), "--gate", str(gate_yaml), "--out", str(output), *extra])

    assert expected in refused(gate, model, out, root, capsys)
