"""The gates shipped in eval/gates/ load, and every task and metric they name exists (offline: no hub access)."""

from pathlib import Path

import pytest

from core.config import load_config
from core.errors import UserError
from eval.gate import GateConfig
from eval.harness import declared_metrics, is_offline_name, metric_key, task_manager
from eval.taskdata import task_metrics

GATES = sorted((Path(__file__).resolve().parents[2] / "eval" / "gates").glob("*.yaml"))


def test_the_expected_gates_ship():
    assert {p.stem for p in GATES} >= {"offline", "long_context", "commonsense", "knowledge", "longbench"}


@pytest.mark.parametrize("path", GATES, ids=lambda p: p.stem)
def test_shipped_gate_loads_and_its_offline_rules_name_real_metrics(path):
    gate = load_config(GateConfig, path)
    assert gate.rules
    offline = task_metrics(gate.task_data)
    for rule in gate.rules:
        if is_offline_name(rule.task):
            assert metric_key(rule.metric) in offline[rule.task], (rule.task, rule.metric)


@pytest.mark.slow
def test_shipped_standard_tasks_and_metrics_exist_in_lm_evals_index():
    """Indexes lm-eval's ~15k task YAMLs (seconds, no network): names and declared metrics must match."""
    gates = [load_config(GateConfig, path) for path in GATES]
    standard = sorted({t for gate in gates for t in gate.all_tasks() if not is_offline_name(t)})
    papers = {"hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "sciq", "logiqa", "mmlu"}
    assert papers <= set(standard)
    manager = task_manager(standard, None)
    for gate in gates:
        for rule in gate.rules:
            if not is_offline_name(rule.task):
                declared = declared_metrics(rule.task, None, manager)
                assert declared is not None and metric_key(rule.metric) in declared, (rule.task, rule.metric, declared)
    with pytest.raises(UserError, match="unknown task 'hellaswagg'.*hellaswag"):
        task_manager(["hellaswagg"], None)
