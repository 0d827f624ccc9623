"""Gates: a list of lm-eval tasks with a rule per metric, checked after every stage of a recipe (or alone, in CI).

A rule bounds one metric of one task: an absolute floor/ceiling (`min`/`max`), or a largest allowed drop from a
baseline (`max_drop` in the metric's units, `max_rel_drop` as a fraction of the baseline). Drops are direction-aware:
lm-eval says whether higher is better (perplexity: lower), so "a drop" is always "got worse". Every bound a rule
gives is its own row of the result table, so a failure names exactly which bound broke.

    result = run_gate(model, tokenizer, load_config(GateConfig, "eval/gates/offline.yaml"), baseline=previous)
    result.raise_if_failed()

    python -m eval.gate --model runs/s1 --gate eval/gates/offline.yaml \
        --baseline runs/s0-gate/results.json --out runs/s1-gate

The command is the stage kind `gate`: its output directory holds results.json (the next gate's baseline) and
gate.md; a gate that fails still publishes them, and the command then exits 1 (bad input exits 2, before anything
is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cli import command
from core.errors import UserError
from core.kind import Input, StageKind, register_kind
from core.table import format_table
from eval.harness import EvalResult, declared_metrics, evaluate, is_offline_name, load_results, metric_key, task_manager
from eval.taskdata import TaskDataConfig, TaskSet, ensure_task_set, load_task_set

GATE_FORMAT = "openba-gate/1"
CHECKS = ("min", "max", "max_drop", "max_rel_drop")


@dataclass
class MetricRule:
    """Bounds on one metric of one task; give one or more of min / max / max_drop / max_rel_drop."""

    task: str
    """A task or group name: ours (corpus_ppl, corpus_mc, probe_needle, ...) or lm-eval's (hellaswag, mmlu, ...)."""
    metric: str
    """As lm-eval names it, without ",none" ("acc_norm", "byte_perplexity"); a filtered one keeps its filter
    ("exact_match,get-answer")."""
    min: float | None = None
    """Absolute floor, e.g. accuracy well above chance (0.25 on 4 choices) after a stage that must not break the
    model. Applies whatever the direction of the metric."""
    max: float | None = None
    """Absolute ceiling, e.g. a perplexity a working model never exceeds."""
    max_drop: float | None = None
    """Largest allowed change for the worse against the baseline, in the metric's units (0.02 = two accuracy
    points). Needs a baseline; without one the row is reported as skipped."""
    max_rel_drop: float | None = None
    """Largest allowed change for the worse as a fraction of the baseline (0.05 = 5% higher perplexity or 5%
    lower accuracy). Suits perplexities, whose scale differs between models and tokenizers."""
    higher_is_better: bool | None = None
    """Direction of the metric; None asks lm-eval (each metric declares it). Set it for a custom metric."""

    def __post_init__(self):
        given = [c for c in CHECKS if getattr(self, c) is not None]
        if not given:
            raise UserError(f"rule on {self.task}/{self.metric} gives no bound: set one of {', '.join(CHECKS)}")
        for name in ("max_drop", "max_rel_drop"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"rule on {self.task}/{self.metric}: {name} must be >= 0, got {getattr(self, name)}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise UserError(f"rule on {self.task}/{self.metric}: min {self.min} is above max {self.max}")


@dataclass
class GateConfig:
    """A gate: the tasks to run and the rules their metrics must pass. Ships in eval/gates/*.yaml."""

    name: str = "gate"
    """Shown in tables, reports and failure messages."""
    rules: list[MetricRule] = field(default_factory=list)
    """Checks on the results; a gate with no rules only evaluates (and always passes)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to evaluate besides those the rules name (reported, never failing the gate)."""
    limit: int | None = None
    """Documents per task (per member of a group). None runs all: right for real runs, slow on CPU."""
    num_fewshot: int | None = None
    """Shots for every task; None keeps each task's own default (0 for ours)."""
    batch_size: int = 4
    """Requests per forward pass of lm-eval."""
    max_length: int | None = None
    """Token window lm-eval uses (context truncation, rolling perplexity windows); None reads it from the model
    config (2048 when the config does not say, as for OpenBA). Set it to the length a stage trains at."""
    require_baseline: bool = False
    """Fail with an error rather than skip drop rules when no baseline is given (recipes after the first stage)."""
    task_data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """How the offline tasks are generated; every stage of a run must use the same, or baselines will not match."""
    cache_dir: str = "runs/cache"
    """Where the corpus and generated task sets are cached."""

    def all_tasks(self) -> list[str]:
        return list(dict.fromkeys([*self.tasks, *(rule.task for rule in self.rules)]))


@dataclass
class GateRow:
    """One bound of one rule, checked."""

    task: str
    metric: str
    check: str
    higher_is_better: bool | None
    value: float | None
    baseline: float | None = None
    bound: float | None = None
    ok: bool = True
    margin: float | None = None
    """Distance from the bound in the metric's units: positive inside, negative outside (by how much it failed)."""
    note: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.value is None else self.value - self.baseline

    def bound_text(self) -> str:
        if self.bound is None:
            return self.note
        op = ">=" if self.check == "min" or (self.check in ("max_drop", "max_rel_drop") and self.higher_is_better) \
            else "<="
        return f"{op} {self.bound:.4g}"

    def describe_failure(self) -> str:
        """One clause: metric, value, which bound (and why), and by how much it was missed."""
        if self.value is None or not math.isfinite(self.value):
            return f"{self.task}/{self.metric} = {self.value} is not a finite number ({self.check} {self.bound_text()})"
        direction = "below" if self.bound_text().startswith(">=") else "above"
        if self.check == "min":
            why = f"its floor {self.bound:.4g}"
        elif self.check == "max":
            why = f"its ceiling {self.bound:.4g}"
        else:
            why = f"its bound {self.bound:.4g} (baseline {self.baseline:.4g}, {self.check} {self.note})"
        relative = f" ({abs(self.margin) / abs(self.bound):.1%})" if self.bound else ""
        return f"{self.task}/{self.metric} = {self.value:.4g} is {direction} {why} by {abs(self.margin):.4g}{relative}"


@dataclass
class GateResult:
    """Pass/fail with its table; `to_dict()` goes into a stage manifest and is a valid baseline for the next."""

    gate: str
    passed: bool
    rows: list[GateRow]
    results: EvalResult
    baseline_source: str | None = None

    @property
    def failures(self) -> list[GateRow]:
        return [row for row in self.rows if not row.ok]

    HEADERS = ("task", "metric", "check", "baseline", "value", "delta", "bound", "ok")

    def table_rows(self) -> list[tuple]:
        return [(r.task, r.metric, r.check, r.baseline, r.value, r.delta, r.bound_text(),
                 "yes" if r.ok else "FAIL") for r in self.rows]

    def to_table(self) -> str:
        return format_table(self.table_rows(), self.HEADERS)

    def to_markdown(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({len(self.failures)} of {len(self.rows)} checks)"
        lines = [f"**Gate `{self.gate}`: {verdict}**", ""]
        if self.baseline_source:
            lines += [f"Baseline: {self.baseline_source}", ""]
        lines.append(format_table(self.table_rows(), self.HEADERS, markdown=True) if self.rows else "(no rules)")
        if not self.passed:
            lines += ["", *(f"- {row.describe_failure()}" for row in self.failures)]
        return "\n".join(lines) + "\n"

    def failure_message(self) -> str:
        return f"gate '{self.gate}' failed: " + "; ".join(row.describe_failure() for row in self.failures)

    def raise_if_failed(self) -> "GateResult":
        if not self.passed:
            raise GateFailed(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        rows = [{**dataclasses.asdict(r), "delta": r.delta} for r in self.rows]
        return {"format": GATE_FORMAT, "gate": self.gate, "passed": self.passed, "baseline": self.baseline_source,
                "rows": rows, "results": self.results.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateResult":
        names = {f.name for f in dataclasses.fields(GateRow)}
        rows = [GateRow(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
        return cls(data["gate"], data["passed"], rows, EvalResult.from_dict(data["results"]), data.get("baseline"))


class GateFailed(UserError):
    """A gate did not pass; the message names every failing metric, its value, its bound and the margin."""

    def __init__(self, result: GateResult):
        super().__init__(result.failure_message())
        self.result = result


def coerce_baseline(baseline) -> tuple[EvalResult | None, str | None]:
    """Accept results in any form a caller holds them: EvalResult, GateResult, their dicts, or a JSON path."""
    if baseline is None:
        return None, None
    if isinstance(baseline, EvalResult):
        return baseline, "in-memory results"
    if isinstance(baseline, GateResult):
        return baseline.results, f"gate '{baseline.gate}'"
    if isinstance(baseline, dict):
        if baseline.get("format") == GATE_FORMAT:
            return EvalResult.from_dict(baseline["results"]), f"gate '{baseline.get('gate')}'"
        return EvalResult.from_dict(baseline), "results dict"
    if isinstance(baseline, (str, Path)):
        return load_results(baseline), str(baseline)
    raise UserError("baseline must be results, a gate result or a path to a results JSON, "
                    f"got {type(baseline).__name__}")


def _direction(rule: MetricRule, results: EvalResult) -> bool:
    if rule.higher_is_better is not None:
        return rule.higher_is_better
    known = results.higher_is_better.get(rule.task, {}).get(metric_key(rule.metric))
    if known is None:
        raise UserError(f"lm-eval does not say whether higher {rule.task}/{rule.metric} is better; set "
                        "higher_is_better in the rule")
    return bool(known)


BOUND_RELATIVE_TOLERANCE = 1e-9
"""A value this close to its bound (relative to their size) is at the bound: a bound computed from a baseline
(0.275 - 0.05 = 0.22500000000000003) must not fail a value of 0.225 by floating-point noise. Metrics carry no
meaning at 1e-9 relative, so no real regression hides inside it."""


def bound_tolerance(value: float, bound: float) -> float:
    return BOUND_RELATIVE_TOLERANCE * max(1.0, abs(value), abs(bound)) if math.isfinite(value) else 0.0


def check_rules(rules: list[MetricRule], results: EvalResult, baseline: EvalResult | None = None,
                require_baseline: bool = False) -> list[GateRow]:
    """Every bound of every rule against `results` (and `baseline` for drops): one row each."""
    rows = []
    for rule in rules:
        value = results.value(rule.task, rule.metric)
        higher = _direction(rule, results)
        sign = 1.0 if higher else -1.0  # multiplies "value - bound" so that positive means inside the bound
        base = None
        if rule.max_drop is not None or rule.max_rel_drop is not None:
            if baseline is None:
                if require_baseline:
                    raise UserError(f"rule on {rule.task}/{rule.metric} bounds a drop but no baseline was given")
            else:
                base = _baseline_value(baseline, rule)
        for check in CHECKS:
            limit = getattr(rule, check)
            if limit is None:
                continue
            row = GateRow(rule.task, rule.metric, check, higher, value, baseline=base)
            if check == "min":
                row.bound, row.margin = limit, value - limit
            elif check == "max":
                row.bound, row.margin = limit, limit - value
            elif base is None:
                row.note = "skipped: no baseline"
                rows.append(row)
                continue
            else:
                allowed = limit if check == "max_drop" else limit * abs(base)
                row.bound = base - sign * allowed
                row.margin = sign * (value - row.bound)
                row.note = f"{limit:g}" if check == "max_drop" else f"{limit:.1%}"
            row.ok = math.isfinite(value) and row.margin >= -bound_tolerance(value, row.bound)
            rows.append(row)
    return rows


def _baseline_value(baseline: EvalResult, rule: MetricRule) -> float:
    if rule.task not in baseline.metrics:
        raise UserError(f"the baseline is from another task set: it has no results for task '{rule.task}' "
                        f"(it has: {', '.join(sorted(baseline.metrics)) or 'none'})")
    if metric_key(rule.metric) not in baseline.metrics[rule.task]:
        raise UserError(f"the baseline has no metric '{rule.metric}' for task '{rule.task}'")
    return baseline.metrics[rule.task][metric_key(rule.metric)]


def check_comparable(baseline: EvalResult, results: EvalResult, rules: list[MetricRule]) -> None:
    """Refuse a baseline measured on other data: per task of a drop rule, versions, data hashes, sample counts and
    shots must match (for a group, every member's)."""
    for rule in rules:
        if rule.max_drop is None and rule.max_rel_drop is None:
            continue
        _baseline_value(baseline, rule)
        for task in _leaves(rule.task, results):
            then, now = baseline.fingerprints.get(task), results.fingerprints.get(task)
            if then is None or now is None or then == now:
                continue
            differ = [f"{key} {then.get(key)} vs now {now.get(key)}" for key in sorted(set(then) | set(now))
                      if then.get(key) != now.get(key)]
            raise UserError(f"the baseline is from another task set: task '{task}' differs ({'; '.join(differ)}); "
                            "evaluate the baseline with the same gate config (tasks, task_data, limit)")


def _leaves(task: str, results: EvalResult) -> list[str]:
    members = (results.fingerprints.get(task) or {}).get("members")
    return list(members) if members else [task]


@dataclass
class PreparedGate:
    """A gate whose inputs were all checked (task names, metrics, baseline data) before any model work."""

    config: GateConfig
    task_set: TaskSet | None
    manager: Any
    baseline: EvalResult | None
    baseline_source: str | None


def prepare_gate(gate: GateConfig, baseline=None, task_set: TaskSet | None = None) -> PreparedGate:
    """Check everything that can be wrong with a gate's input, cheaply, before evaluating; raises UserError."""
    tasks = gate.all_tasks()
    if not tasks:
        raise UserError(f"gate '{gate.name}' names no tasks (give rules or tasks)")
    base, source = coerce_baseline(baseline)
    if gate.require_baseline and base is None:
        raise UserError(f"gate '{gate.name}' requires a baseline (the previous stage's results); none was given")
    if task_set is None and any(is_offline_name(t) for t in tasks):
        task_set = ensure_task_set(gate.task_data, gate.cache_dir)
    manager = task_manager(tasks, task_set)
    for rule in gate.rules:
        produced = declared_metrics(rule.task, task_set, manager)
        if produced is not None and metric_key(rule.metric) not in produced:
            raise UserError(f"task '{rule.task}' does not produce metric '{rule.metric}' "
                            f"(it produces: {', '.join(sorted(produced))})")
        if base is not None and (rule.max_drop is not None or rule.max_rel_drop is not None):
            _baseline_value(base, rule)
            if task_set is not None and rule.task in task_set.tasks:
                for leaf in task_set.members(rule.task):
                    then = (base.fingerprints.get(leaf) or {}).get("data_sha256")
                    now = task_set.tasks[leaf]["sha256"]
                    if then != now:
                        raise UserError(
                            f"the baseline is from another task set: task '{leaf}' was measured on data "
                            f"{str(then)[:12]}, this gate's data is {now[:12]} (same task_data config needed)")
    return PreparedGate(gate, task_set, manager, base, source)


def run_gate(model, tokenizer, gate: GateConfig, baseline=None, task_set: TaskSet | None = None,
             prepared: PreparedGate | None = None) -> GateResult:
    """Evaluate `model` on the gate's tasks in process and check its rules; never raises on failure (see
    `GateResult.raise_if_failed`), raises UserError on bad input before evaluating."""
    prepared = prepared or prepare_gate(gate, baseline, task_set)
    results = evaluate(model, tokenizer, gate.all_tasks(), task_set=prepared.task_set, limit=gate.limit,
                       num_fewshot=gate.num_fewshot, batch_size=gate.batch_size, max_length=gate.max_length,
                       manager=prepared.manager)
    if prepared.baseline is not None:
        check_comparable(prepared.baseline, results, gate.rules)
    rows = check_rules(gate.rules, results, prepared.baseline, gate.require_baseline)
    return GateResult(gate.name, all(row.ok for row in rows), rows, results, prepared.baseline_source)


# ---------------------------------------------------------------------------------------------------- the kind


@dataclass
class GateRun(GateConfig):
    """The command's settings: a gate (its YAML is --gate or --config), and what it reads besides the model."""

    baseline: str | None = None
    """Results JSON of an earlier run (eval.gate's results.json or lm_eval's) for the drop rules."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    task_set: str | None = None
    """An existing task set (python -m eval.taskdata) instead of the cached one."""


@dataclass
class PreparedGateRun:
    config: GateRun
    gate: PreparedGate
    model: Any
    tokenizer: Any


def prepare(config: GateRun, inputs: dict[str, Path | None], progress: bool = True) -> PreparedGateRun:
    """The checkpoint's files first (cheap), then the gate (task names, metrics, baseline data), then the model."""
    from core.checkpoint import check_weights, load_model, load_tokenizer, read_model_config

    model_dir = inputs["model"]
    read_model_config(model_dir)
    check_weights(model_dir)
    task_set = load_task_set(config.task_set) if config.task_set else None
    gate = prepare_gate(config, config.baseline, task_set)
    tokenizer = load_tokenizer(config.tokenizer or model_dir)
    return PreparedGateRun(config, gate, load_model(model_dir), tokenizer)


def write_results(prepared: PreparedGateRun, work_dir: Path) -> dict[str, Any]:
    """Evaluate, write results.json and gate.md; the manifest's metrics carry the verdict and its table rows."""
    result = run_gate(prepared.model, prepared.tokenizer, prepared.config, prepared=prepared.gate)
    record = result.to_dict()
    (work_dir / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (work_dir / "gate.md").write_text(result.to_markdown())
    return {"gate": result.gate, "passed": result.passed, "failures": len(result.failures),
            "failure": None if result.passed else result.failure_message(), "rows": record["rows"]}


def summary(manifest) -> str:
    metrics = manifest.metrics
    names = {f.name for f in dataclasses.fields(GateRow)}
    rows = [GateRow(**{k: v for k, v in row.items() if k in names}) for row in metrics["rows"]]
    table = GateResult(metrics["gate"], metrics["passed"], rows, EvalResult({}, {}, {})).to_table()
    verdict = f"gate '{metrics['gate']}' passed ({len(rows)} checks)" if metrics["passed"] else \
        f"gate '{metrics['gate']}' FAILED ({metrics['failures']} of {len(rows)} checks)"
    return f"{table}\n{verdict}"


class _Overrides(argparse.Action):
    """Trailing `key=value` words: the same as --set key=value."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.set = list(getattr(namespace, "set", None) or []) + list(values)


def _gate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gate", dest="config", metavar="YAML", help="gate YAML (GateConfig), e.g. eval/gates/offline.yaml; the same "
                        "as --config")
    parser.add_argument("overrides", nargs="*", action=_Overrides, metavar="key=value",
                        help="gate config overrides, e.g. limit=20 (the same as --set)")


KIND = register_kind(StageKind(
    name="gate",
    writes_checkpoint=False,
    stage="gate",
    module="eval.gate",
    config_cls=GateRun,
    prepare=prepare,
    run=write_results,
    description="Evaluate a checkpoint on a gate's lm-eval tasks and check its rules. Exit status: 0 passed, 1 failed, "
                "2 bad input. Writes results.json (a baseline for the next run) and gate.md to --out.",
    examples=("python -m eval.gate --model runs/s1 --gate eval/gates/offline.yaml "
              "--baseline runs/s0-gate/results.json --out runs/s1-gate limit=50",),
    inputs=(Input("model", "checkpoint directory (safetensors)"),
            Input("baseline", "results JSON of an earlier run (eval.gate's results.json or lm_eval's)",
                  required=False, is_checkpoint=False),
            Input("tokenizer", "tokenizer directory (default: the model directory)", required=False,
                  is_checkpoint=False),
            Input("task_set", "an existing task set (python -m eval.taskdata) instead of the cached one",
                  required=False, is_checkpoint=False)),
    summary=summary,
    flags=_gate_flags,
    flag_values=lambda args: {"baseline": args.baseline, "tokenizer": args.tokenizer, "task_set": args.task_set},
    verdict=lambda manifest: manifest.metrics["failure"],
))
main = command(KIND)


if __name__ == "__main__":
    main()
