"""Evaluate an already-loaded model with lm-evaluation-harness, on our offline tasks and on lm-eval's own.

The model goes through lm-eval's own `HFLM` wrapper and `simple_evaluate`, so in-process numbers are the numbers
`lm_eval --model hf` prints for the same checkpoint (tests/eval/test_cli_agreement.py checks it); a recipe gates a
model it holds in memory without saving it first. Encoder-decoders (OpenBA, T5) use HFLM's seq2seq backend.

Results are flattened into an `EvalResult` (task -> metric -> value) that also records, per task, what the numbers
were measured on (task version, data sha256, samples, shots), so that a baseline from other data is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from core.checkpoint import is_encoder_decoder
from core.errors import UserError
from eval.taskdata import MC_TASK, PPL_TASK, TaskSet

RESULTS_FORMAT = "openba-eval-results/1"
# Offline task names: recognised even before a task set exists, to say "generate the task set" rather than "unknown".
OFFLINE_PREFIXES = (PPL_TASK, MC_TASK, "probe_")
# Metrics lm-eval computes when a task YAML has no metric_list, by output type.
DEFAULT_METRICS = {
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "generate_until": ("exact_match",),
}


def metric_key(name: str) -> str:
    """lm-eval's "acc,none" is our "acc"; a filtered metric keeps its filter ("exact_match,get-answer")."""
    metric, _, filter_name = name.partition(",")
    return metric if filter_name in ("", "none") else f"{metric},{filter_name}"


@dataclasses.dataclass
class EvalResult:
    """Flat lm-eval results: what a gate reads, what a report plots, what the next stage's baseline is."""

    metrics: dict[str, dict[str, float]]
    """task or group -> metric -> value."""
    higher_is_better: dict[str, dict[str, bool | None]]
    fingerprints: dict[str, dict[str, Any]]
    """task or group -> what it was measured on; two results are comparable when their fingerprints are equal."""
    probe_cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Long-context probe scores per (kind, length, depth): {kind, length, depth, n} and the mean of each metric
    measured there (`exact_match`; `gold_loglik`, `gold_rank` and `candidates` from the answer-choice tasks)."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def value(self, task: str, metric: str) -> float:
        if task not in self.metrics:
            raise UserError(f"task '{task}' has no results (results hold: {', '.join(sorted(self.metrics)) or 'none'})")
        key = metric_key(metric)
        if key not in self.metrics[task]:
            produced = ", ".join(sorted(self.metrics[task])) or "none"
            raise UserError(f"task '{task}' does not produce metric '{metric}' (it produces: {produced})")
        return self.metrics[task][key]

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_lm_eval(cls, raw: dict[str, Any], info: dict[str, Any] | None = None) -> "EvalResult":
        """From `simple_evaluate`'s return value, or the results JSON the `lm_eval` CLI writes."""
        metrics: dict[str, dict[str, float]] = {}
        for task, values in raw.get("results", {}).items():
            metrics[task] = {}
            for name, value in values.items():
                if "," not in name or "_stderr," in name or isinstance(value, (str, bool)) or value is None:
                    continue
                metrics[task][metric_key(name)] = float(value)
        hib_raw = raw.get("higher_is_better", {})
        higher = {task: {m: hib_raw.get(task, {}).get(m.split(",")[0]) for m in ms} for task, ms in metrics.items()}
        fingerprints: dict[str, dict[str, Any]] = {}
        for task, config in raw.get("configs", {}).items():
            fingerprints[task] = {
                "version": raw.get("versions", {}).get(task),
                "data_sha256": (config.get("metadata") or {}).get("data_sha256"),
                "num_fewshot": raw.get("n-shot", {}).get(task, config.get("num_fewshot")),
                "samples": (raw.get("n-samples", {}).get(task) or {}).get("effective"),
            }
        for group, members in raw.get("group_subtasks", {}).items():
            if members and group not in fingerprints:
                fingerprints[group] = group_fingerprint(members, fingerprints)
        return cls(metrics, higher, fingerprints, probe_cells(raw.get("samples") or {}), dict(info or {}))


def group_fingerprint(members: Iterable[str], fingerprints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    members = sorted(members)
    blob = json.dumps([[m, fingerprints.get(m)] for m in members], sort_keys=True, default=str)
    return {"members": members, "digest": hashlib.sha256(blob.encode()).hexdigest()[:16]}


PROBE_CELL_METRICS = ("exact_match", "gold_loglik", "gold_rank")


def probe_cells(samples: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Per (kind, length, depth), the mean of every probe metric lm-eval logged there (exact match from the probe
    tasks, gold log-likelihood and rank from their answer-choice companions, which read the same rows); `n` counts
    rows, `candidates` is how many values the answer was ranked among."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    candidates: dict[tuple, int] = {}
    for rows in samples.values():
        for sample in rows:
            doc = sample.get("doc") or {}
            if not {"kind", "length", "depth"} <= doc.keys():
                continue
            key = (doc["kind"], doc["length"], doc["depth"])
            for metric in (m for m in PROBE_CELL_METRICS if m in sample):
                cells.setdefault(key, {}).setdefault(metric, []).append(float(sample[metric]))
            if "gold_rank" in sample:
                candidates[key] = max(candidates.get(key, 0), len(doc["candidates"]))
    return [{"kind": k, "length": n, "depth": d, "n": max(map(len, values.values())),
             **{metric: sum(v) / len(v) for metric, v in values.items()},
             **({"candidates": candidates[(k, n, d)]} if (k, n, d) in candidates else {})}
            for (k, n, d), values in sorted(cells.items())]


def load_results(path: str | Path) -> EvalResult:
    """Results saved by `eval.gate` (or `EvalResult.to_dict`), or a results JSON written by the lm_eval CLI."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("results*.json"))
        if not found:
            raise UserError(f"no results*.json under {path}")
        path = found[-1]
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold evaluation results")
    if data.get("format") == RESULTS_FORMAT:
        return EvalResult.from_dict(data)
    if isinstance(data.get("results"), dict) and data["results"].get("format") == RESULTS_FORMAT:
        return EvalResult.from_dict(data["results"])  # a gate's results.json
    if "results" in data and "configs" in data:
        return EvalResult.from_lm_eval(data, {"source": str(path)})
    raise UserError(f"{path} is neither eval.gate results nor an lm_eval results JSON")


def is_offline_name(name: str) -> bool:
    return name.startswith(OFFLINE_PREFIXES)


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.ERROR):
    """Silence chatty loggers for a block (HFLM warns on every in-memory model that it is not a path)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


def answer_budget_generate(original):
    """Wrap HFLM._model_generate so an encoder-decoder generates at most `max_gen_toks` tokens.

    lm-eval 0.4.x passes `max_length = prompt tokens + max_gen_toks` to `generate` for both backends. For a decoder-
    only model that is the intended budget (the prompt is in the output); for an encoder-decoder the prompt is in
    the encoder, so the decoder may run prompt-length + max_gen_toks steps: a 16K-character probe lets a model that
    never emits the stop string generate ~5000 tokens instead of 16. Capped here, the answer is the same whenever
    the model stops within max_gen_toks, and the time is bounded. It also hands a T5 whose decoder is deeper than
    its encoder the cache stock generation sizes wrongly (core/generation.py). Used in process and by
    eval.lm_eval_cli."""

    def generate(self, context, max_length, stop, **generation_kwargs):
        from core.generation import generate_kwargs

        if self.backend == "seq2seq" and max_length > context.shape[1]:
            max_length = max_length - context.shape[1] + 1  # +1: the decoder start token is part of the output
        generation_kwargs = {**generate_kwargs(self.model), **generation_kwargs}  # a T5 deeper in its decoder
        return original(self, context, max_length, stop, **generation_kwargs)

    generate.answer_budget = True
    return generate


def harness_lm_class():
    """HFLM with the encoder-decoder generation budget fixed (see `answer_budget_generate`)."""
    from lm_eval.models.huggingface import HFLM

    return type("HarnessLM", (HFLM,), {"_model_generate": answer_budget_generate(HFLM._model_generate)})


def make_lm(model, tokenizer, batch_size: int = 4, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory model (seq2seq backend for encoder-decoders); the tokenizer is copied
    because HFLM sets a pad token on the object it is given."""
    backend = "seq2seq" if is_encoder_decoder(model) else "causal"
    with quiet("lm_eval.models.huggingface"):
        return harness_lm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend=backend,
                                  batch_size=batch_size, max_length=max_length, device=str(model.device))


def task_manager(tasks: Sequence[str], task_set: TaskSet | None):
    """A TaskManager that knows every name in `tasks`; lm-eval's ~15k built-in tasks are indexed only when needed
    (indexing them takes seconds). Unknown names fail here, before any model work."""
    from lm_eval.tasks import TaskManager

    ours = set(task_set.names) if task_set else set()
    for name in (t for t in tasks if t not in ours and is_offline_name(t)):
        if task_set is None:
            raise UserError(f"'{name}' is an offline task: generate a task set first "
                            "(eval.taskdata.ensure_task_set, or python -m eval.taskdata --out DIR)")
        close = difflib.get_close_matches(name, sorted(ours), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (it has: {', '.join(sorted(ours))})"
        raise UserError(f"unknown task '{name}': not in the task set in {task_set.directory}{hint}")
    outside = [t for t in tasks if t not in ours]
    include = str(task_set.directory) if task_set else None
    manager = TaskManager(include_path=include, include_defaults=bool(outside))
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | ours), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f"the task set in {task_set.directory} or lm-eval's tasks" if task_set else "lm-eval's tasks"
            raise UserError(f"unknown task '{name}': not in {where}{hint}")
    return manager


def declared_metrics(name: str, task_set: TaskSet | None, manager=None) -> set[str] | None:
    """Metrics a task or group will report (our keys), read from its config without loading data; None when the
    config does not say (a tag, a Python task): such metrics are checked after evaluation instead."""
    if task_set is not None and name in task_set.tasks:
        return set(task_set.tasks[name]["metrics"])
    entry = manager.task_index.get(name) if manager is not None else None
    if entry is None or not isinstance(getattr(entry, "cfg", None), dict):
        return None
    cfg = entry.cfg
    if "group" in cfg:
        listed = cfg.get("aggregate_metric_list") or []
        found = set()
        for item in listed if isinstance(listed, list) else [listed]:
            filters = item.get("filter_list", "none")
            for filter_name in filters if isinstance(filters, list) else [filters]:
                found.add(metric_key(f"{item['metric']},{filter_name}"))
        return found or None
    metric_list = cfg.get("metric_list")
    names = [m["metric"] for m in metric_list if isinstance(m.get("metric"), str)] if metric_list else \
        list(DEFAULT_METRICS.get(cfg.get("output_type"), ()))
    filters = [f["name"] for f in cfg.get("filter_list") or [] if "name" in f] or ["none"]
    return {metric_key(f"{m},{f}") for m in names for f in filters} or None


def evaluate(model, tokenizer, tasks: Sequence[str], *, task_set: TaskSet | None = None, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 4, max_length: int | None = None,
             manager=None) -> EvalResult:
    """Run lm-eval on `tasks` with the model in memory; the model's train/eval mode is restored afterwards.

    `limit` caps documents per task (per member task of a group). Probe samples are logged so that accuracy per
    (length, depth) can be reported."""
    from lm_eval import simple_evaluate

    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise UserError("no tasks to evaluate")
    manager = manager or task_manager(tasks, task_set)
    was_training = model.training  # before HFLM, which switches the model to eval mode
    started = time.time()
    try:
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
        raw = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=True)
    finally:
        model.train(was_training)
    info = {
        "seconds": round(time.time() - started, 2),
        "lm_eval_version": raw.get("lm_eval_version"),
        "task_set": task_set.fingerprint if task_set else None,
        "limit": limit,
        "max_length": lm.max_length,
        "backend": lm.backend,
    }
    return EvalResult.from_lm_eval(raw, info)
