"""Evaluation between stages: lm-eval on in-memory models, offline tasks, long-context probes, gates, reports.

    from eval import GateConfig, run_gate, ensure_task_set, evaluate
    result = run_gate(model, tokenizer, load_config(GateConfig, "eval/gates/offline.yaml"), baseline=previous)
    result.raise_if_failed()          # GateFailed (a UserError) names the metric, value, bound and margin

Modules: `taskdata` (offline task sets), `probes` (long-context rows), `harness` (lm-eval in process), `gate`
(rules, `python -m eval.gate`), `report` (Markdown + plots), `lm_eval_cli` (the lm_eval CLI with OpenBA registered).
"""

_EXPORTS = {
    "TaskDataConfig": "eval.taskdata", "TaskSet": "eval.taskdata", "ensure_task_set": "eval.taskdata",
    "load_task_set": "eval.taskdata", "EvalResult": "eval.harness", "evaluate": "eval.harness",
    "load_results": "eval.harness", "GateConfig": "eval.gate", "MetricRule": "eval.gate", "GateResult": "eval.gate",
    "GateFailed": "eval.gate", "run_gate": "eval.gate", "check_rules": "eval.gate", "write_report": "eval.report",
}


def __getattr__(name):
    # Lazy, so that `import eval.probes` does not pull in datasets, torch and lm-eval.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
