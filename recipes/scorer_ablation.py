"""Scorer ablation at equal size: which importance scorer leaves the best model, right after pruning and after the
same recovery?

    python -m recipes.scorer_ablation --out runs/scorer_ablation           # the cached tiny teacher: 26 minutes on 2 CPU cores
    python -m recipes.scorer_ablation --config recipes/configs/scorer_ablation.yaml --out runs/scorer_ablation
    python -m recipes.scorer_ablation --out runs/abl --set seeds=[0] --set recover.train.steps=10   # a quick look

The teacher (the recipe's `teacher` stage: the cached tiny teacher, trained only if missing) is pruned to one layer
shape by every layer scorer (one-shot, and iterative for the scorers computed from the model), and separately to one
width shape by every neuron scorer, so all models of a group have the same parameter count and each scorer works on
the same input. Every pruned model is recovered with the same `train` stage (same steps, data and teacher for
distillation) once per seed; the seed orders the recovery's data, and the random scorer draws its units with it too,
so random gets a fresh draw per seed. Every model is measured with the same evaluation (by default the main job's
held-out corpus_ppl bits per byte).

Each prune, recovery and evaluation is a stage directory under --out through the stage contract, so a killed run
resumes and a rerun skips what is finished:

    teacher/  teacher-eval/                          the input and its bits per byte
    layers/<scorer>[-iterative]/prune[-seed<N>]/     a deterministic scorer prunes once, random once per seed
    layers/<scorer>[-iterative]/recover-seed<N>/     recovery of that prune with data-order seed N
    .../<stage>-eval/                                the evaluation of each of them
    neurons/<scorer>/...                             the same for the neuron scorers
    results.json  report.md  ablation.png            per scorer: parameters, bits/byte pruned and recovered
                                                     (mean ± standard error over seeds), what was kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from core.config import from_dict, load_config, merge, to_dict
from core.errors import UserError, main_guard
from core.stage import Manifest
from eval.gate import GateConfig, GateResult
from eval.taskdata import TaskDataConfig
from pretrain.corpus import CorpusConfig

CONFIGS = Path(__file__).parent / "configs"
EVAL_SUFFIX = "-eval"
ITERATIVE_SCORERS = ("block_influence", "angular_distance", "skip_loss")
"""Layer scorers computed from the model, which rescoring after each removal can change; random and the V2 rule
give the same ranking again."""


def main_job_task_data() -> TaskDataConfig:
    """The task data of recipes/configs/openba_v2_tiny.yaml's gates: the same held-out texts, the same cache."""
    return TaskDataConfig(probe_kinds=("needle",), probe_lengths=(500, 1000, 2000, 4000),
                          probe_depths=(0.0, 0.5, 1.0), probe_samples=2)


@dataclasses.dataclass
class LayerShape:
    """The one layer shape every layer scorer prunes to."""

    remove: dict[str, int] = dataclasses.field(default_factory=lambda: {"decoder": 2})
    """Blocks removed per stack (the main job: decoder 6 -> 4)."""
    protect_first_last: bool = True


@dataclasses.dataclass
class NeuronShape:
    """The one width shape every neuron scorer prunes to (the main job: hidden 192 -> 128, FFN 512 -> 256, heads
    8 -> 4). None leaves a unit as it is."""

    hidden: int | None = 128
    ffn_width: int | None = 256
    heads: int | None = 4


def default_recovery() -> dict[str, Any]:
    """Args of the `train` stage kind: the main job's recovery (UL2 + distillation from the teacher) at a third of
    its examples (40 steps x 8 rows against 60 x 16), with one evaluation at the end."""
    return {"objective": "ul2", "input_length": 256, "target_length": 128,
            "distill": {"temperature": 2.0, "kd_weight": 0.5},
            "train": {"steps": 40, "lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 4, "micro_batch_size": 8,
                      "eval_every": 40, "save_every": 20}}


@dataclasses.dataclass
class AblationConfig:
    """What is compared and how; the defaults are the tiny main job's shapes and data."""

    model: str | None = None
    """Checkpoint to prune; None: the recipe's teacher stage (the cached tiny teacher, trained if missing)."""
    teacher: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Args of the `teacher` stage kind (pretrain.teacher.TeacherConfig) when `model` is None; {} is the main
    job's teacher, found in the cache."""
    cache_dir: str | None = None
    """Cache of corpus, tokenizer and teacher (default: $OPENBA_CACHE or ~/.cache/openba_v2)."""
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    """Calibration and recovery text when `model` is given (with the teacher: the teacher's own corpus, as in the
    recipe). Built once into the cache."""
    layer_scorers: list[str] = dataclasses.field(default_factory=lambda: [
        "random", "v2_heuristic", "block_influence", "angular_distance", "skip_loss"])
    iterative: list[str] = dataclasses.field(default_factory=lambda: list(ITERATIVE_SCORERS))
    """Layer scorers also run iteratively (remove one block, rescore the smaller model, repeat)."""
    neuron_scorers: list[str] = dataclasses.field(default_factory=lambda: ["random", "activation", "wanda", "taylor"])
    """Head and FFN-channel scorers; the hidden dimension goes by residual activation, by random scores for random
    (compress.neuron's `hidden_scorer` default)."""
    layers: LayerShape = dataclasses.field(default_factory=LayerShape)
    neurons: NeuronShape = dataclasses.field(default_factory=NeuronShape)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    """compress.calibration.CalibrationConfig fields for every prune ({}: the pruners' defaults, as the main job)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """One recovery per seed for every pruned model (the recovery's data order); random prunes once per seed."""
    recover: dict[str, Any] = dataclasses.field(default_factory=default_recovery)
    """Args of the `train` stage kind for every recovery (the seed is set per run: `seed`, `data.seed`,
    `train.seed`); the teacher for distillation and the corpus are filled in as the recipe does."""
    eval: GateConfig = dataclasses.field(default_factory=lambda: GateConfig(
        name="scorer_ablation", tasks=["corpus_ppl"], limit=60, task_data=main_job_task_data()))
    """The evaluation of every model (an eval.gate config without rules): by default the held-out texts, limit and
    cache of the main job's gates."""
    task: str = "corpus_ppl"
    metric: str = "bits_per_byte"
    """The compared number: `metric` of `task` in every evaluation."""

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if not self.layer_scorers and not self.neuron_scorers:
            raise UserError("nothing to compare: give layer_scorers or neuron_scorers")
        odd = [name for name in self.iterative if name not in ITERATIVE_SCORERS]
        if odd:
            raise UserError(f"iterative pruning changes nothing for {odd}: it applies to "
                            f"{', '.join(ITERATIVE_SCORERS)} (rescored after each removal)")
        for group in (self.layer_scorers, self.neuron_scorers, self.iterative):
            if len(set(group)) != len(group):
                raise UserError(f"a scorer is listed twice in {group}")
        if self.task not in self.eval.all_tasks():
            raise UserError(f"task '{self.task}' is not evaluated: add it to eval.tasks ({self.eval.all_tasks()})")


# ---------------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Step:
    """One stage: its directory relative to the run directory, kind, resolved config and input directory."""

    name: str
    kind: str
    config: Any
    input: Path | None
    inputs: dict[str, Path | None]


@dataclasses.dataclass
class Run:
    """One seed of one scorer: the prune it recovers from and its recovery (directories relative to --out)."""

    seed: int
    prune: str
    recover: str


@dataclasses.dataclass
class Variant:
    """One row of the table: a scorer of a group, one-shot or iterative, and its runs (one per seed)."""

    group: str
    scorer: str
    iterative: bool
    runs: list[Run]

    @property
    def label(self) -> str:
        return f"{self.scorer} (iterative)" if self.iterative else self.scorer

    @property
    def directory(self) -> str:
        return f"{self.group}/{self.scorer}" + ("-iterative" if self.iterative else "")


def check_scorers(config: AblationConfig) -> None:
    """Unknown scorer names fail before anything runs, with the registry's list."""
    from compress.scorers import get_scorer

    for name in config.layer_scorers:
        get_scorer("layers", name)
    for name in config.neuron_scorers:
        for unit in units_cut(config.neurons):
            get_scorer(unit, name)


def units_cut(shape: NeuronShape) -> list[str]:
    return [unit for unit, value in (("channels", shape.ffn_width), ("heads", shape.heads)) if value is not None]


def variants(config: AblationConfig) -> list[Variant]:
    """Every compared row with its runs: a deterministic scorer shares one prune across seeds, random prunes per
    seed."""
    found = []
    layer_rows = [(name, False) for name in config.layer_scorers]
    layer_rows += [(name, True) for name in config.iterative]
    for group, rows in (("layers", layer_rows), ("neurons", [(n, False) for n in config.neuron_scorers])):
        for scorer, iterative in rows:
            variant = Variant(group, scorer, iterative, [])
            for seed in config.seeds:
                prune = f"{variant.directory}/prune" + (f"-seed{seed}" if scorer == "random" else "")
                variant.runs.append(Run(seed, prune, f"{variant.directory}/recover-seed{seed}"))
            found.append(variant)
    return found


def prune_args(config: AblationConfig, variant: Variant, seed: int) -> dict[str, Any]:
    common = {"scorer": variant.scorer, "seed": seed if variant.scorer == "random" else 0}
    if config.calibration:
        common["calibration"] = dict(config.calibration)
    if variant.group == "layers":
        return {**common, "remove": dict(config.layers.remove), "protect_first_last": config.layers.protect_first_last,
                "iterative": variant.iterative}
    return {**common, **{k: v for k, v in to_dict(config.neurons).items() if v is not None}}


def recovery_args(config: AblationConfig, seed: int) -> dict[str, Any]:
    args = json.loads(json.dumps(config.recover))  # a deep copy: every run merges its own seed
    return merge(args, {"seed": seed, "data": {"seed": seed}, "train": {"seed": seed}})


def plan(config: AblationConfig, run_dir: Path, context) -> tuple[list[Step], list[Variant], str]:
    """Every stage with its config resolved through the recipe's kinds (so a typo fails before anything runs),
    the table's rows, and the directory of the model every prune reads."""
    from eval.gate import GateRun
    from recipes.kinds import recipe_kind, resolve_config

    steps: list[Step] = []
    gate = from_dict(GateRun, to_dict(config.eval), prefix="eval.")

    def add(name: str, kind: str, args: dict[str, Any], input_dir: Path | None, prefix: str) -> None:
        resolved = resolve_config(kind, args, context, prefix=prefix)
        steps.append(Step(name, kind, resolved, input_dir, dict(recipe_kind(kind).inputs(resolved, context))))
        steps.append(Step(name + EVAL_SUFFIX, "gate", gate, run_dir / name, {}))

    if config.model is None:
        add("teacher", "teacher", dict(config.teacher), None, "teacher.")
        source, source_dir = "teacher", run_dir / "teacher"
    else:
        source, source_dir = "model", Path(config.model)
        steps.append(Step(source + EVAL_SUFFIX, "gate", gate, source_dir, {}))
    rows = variants(config)
    for variant in rows:
        kind = "layer_prune" if variant.group == "layers" else "neuron_prune"
        for run in variant.runs:
            if not any(step.name == run.prune for step in steps):  # one prune for every seed of a fixed scorer
                add(run.prune, kind, prune_args(config, variant, run.seed), source_dir, "")
            add(run.recover, "train", recovery_args(config, run.seed), run_dir / run.prune, "recover.")
    return steps, rows, source


def make_context(config: AblationConfig, run_dir: Path):
    """What the recipe's kinds fill in: calibration and training corpus, the teacher for distillation, the cache
    (as recipes.openba_v2.make_context: the teacher's corpus and the teacher stage's output, or the given model)."""
    from pretrain.teacher import DEFAULT_CACHE, TeacherConfig
    from recipes.kinds import Context

    cache_dir = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE
    context = Context(run_dir=run_dir, cache_dir=cache_dir)
    if config.model is None:
        teacher = from_dict(TeacherConfig, dict(config.teacher), prefix="teacher.")
        context.corpus_dir = (Path(teacher.corpus_dir) if teacher.corpus_dir is not None
                              else cache_dir / "corpus" / f"corpus-{teacher.corpus.fingerprint()}")
        context.teacher_dir = run_dir / "teacher"
        corpus = None if teacher.corpus_dir is not None else teacher.corpus
    else:
        if not Path(config.model).is_dir():
            raise UserError(f"the model {config.model} does not exist")
        context.corpus_dir = cache_dir / "corpus" / f"corpus-{config.corpus.fingerprint()}"
        context.teacher_dir = Path(config.model)
        corpus = config.corpus
    return context, corpus


# ---------------------------------------------------------------------------------------------------- running


def run_step(step: Step, run_dir: Path) -> Manifest:
    from core.kind import execute, get_kind
    from recipes.kinds import recipe_kind

    kind = get_kind("gate") if step.kind == "gate" else recipe_kind(step.kind).kind
    inputs = dict(step.inputs)
    if kind.checkpoint_input:
        inputs[kind.checkpoint_input] = step.input
    return execute(kind, step.config, inputs, run_dir / step.name, progress=False)


def run_all(steps: list[Step], run_dir: Path) -> dict[str, Any]:
    """Every stage in order (a finished one is skipped by the stage contract); the load average after each."""
    loads, ran = [], 0
    for number, step in enumerate(steps, 1):
        started = time.time()
        print(f"[{number}/{len(steps)}] {step.name} ...", flush=True)
        manifest = run_step(step, run_dir)
        finished_before = _timestamp(manifest.timings.get("finished")) < started
        loads.append(os.getloadavg()[0])
        ran += not finished_before
        note = "done earlier, skipped" if finished_before else f"{time.time() - started:.0f}s"
        print(f"[{number}/{len(steps)}] {step.name}: {note}", flush=True)
    return {"load_1min_mean": round(sum(loads) / len(loads), 2), "load_1min_max": round(max(loads), 2),
            "stages_run": ran}


def _timestamp(iso: str | None) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp() if iso else 0.0


# ---------------------------------------------------------------------------------------------------- results


def evaluation(run_dir: Path, name: str, config: AblationConfig) -> float:
    """The compared number of one stage's output, read from its evaluation's results.json."""
    record = json.loads((run_dir / (name + EVAL_SUFFIX) / "results.json").read_text())
    return float(GateResult.from_dict(record).results.value(config.task, config.metric))


def mean_se(values: list[float]) -> dict[str, Any]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"values": values, "mean": mean, "se": se, "n": n}


def kept_hidden(run_dir: Path, prune: str, manifest: Manifest) -> list[int] | None:
    """The hidden dimensions a neuron prune kept, from the scores it saved (the top `hidden_after`)."""
    from compress.neuron import HIDDEN_FILE, HIDDEN_SCORES, top_k

    path = run_dir / prune / "scores" / HIDDEN_FILE
    if not path.is_file() or manifest.metrics.get("hidden_after") == manifest.metrics.get("hidden_before"):
        return None
    from safetensors.torch import load_file

    return top_k(load_file(str(path))[HIDDEN_SCORES], manifest.metrics["hidden_after"]).tolist()


def describe_kept(group: str, manifest: Manifest) -> str:
    metrics = manifest.metrics
    if group == "layers":
        removed = {stack: blocks for stack, blocks in metrics["removed"].items() if blocks}
        return "; ".join(f"{stack} -{','.join(map(str, blocks))}" for stack, blocks in removed.items()) or "none"
    before, after = metrics["widths_before"], metrics["widths_after"]
    stack = next(iter(before))
    return (f"hidden {metrics['hidden_after']}/{metrics['hidden_before']}, FFN {after[stack]['ffn'][0]}/"
            f"{before[stack]['ffn'][0]}, heads {after[stack]['heads'][0]}/{before[stack]['heads'][0]}")


def collect(config: AblationConfig, run_dir: Path, rows: list[Variant], source: str) -> dict[str, Any]:
    """results.json's content, every number read back from the stage directories."""
    source_dir = run_dir / "teacher" if source == "teacher" else Path(config.model)
    reference = {"name": source, "directory": str(source_dir),
                 "parameters": Manifest.read(run_dir / (source + EVAL_SUFFIX)).parameters.get("before"),
                 config.metric: evaluation(run_dir, source, config)}
    table = []
    for variant in rows:
        runs, pruned, recovered, kept = [], {}, [], []
        for run in variant.runs:
            prune = Manifest.read(run_dir / run.prune)
            recover = Manifest.read(run_dir / run.recover)
            pruned[run.prune] = evaluation(run_dir, run.prune, config)
            recovered.append(evaluation(run_dir, run.recover, config))
            description = describe_kept(variant.group, prune)
            if description not in kept:
                kept.append(description)
            record = {"seed": run.seed, "prune": run.prune, "recover": run.recover,
                      "pruned": pruned[run.prune], "recovered": recovered[-1],
                      "parameters": prune.parameters.get("after"), "kept": description,
                      "prune_seconds": prune.timings.get("seconds"), "recover_seconds": recover.timings.get("seconds"),
                      "recover_val_loss": recover.metrics.get("val_loss")}
            if variant.group == "layers":
                record["removed"] = prune.metrics["removed"]
            else:
                record["kept_hidden"] = kept_hidden(run_dir, run.prune, prune)
            runs.append(record)
        parameters = sorted({r["parameters"] for r in runs})
        table.append({"group": variant.group, "scorer": variant.scorer, "iterative": variant.iterative,
                      "label": variant.label, "parameters": parameters[0] if len(parameters) == 1 else parameters,
                      "kept": kept, "pruned": mean_se(list(pruned.values())), "recovered": mean_se(recovered),
                      "runs": runs})
    return {"task": config.task, "metric": config.metric, "reference": reference, "rows": table}


def cell(stats: dict[str, Any]) -> str:
    if stats["se"] is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['se']:.3f}"


def recovery_summary(steps: list[Step]) -> dict[str, Any] | None:
    """The recovery every pruned model gets, as the resolved `train` config states it (seed 0's run)."""
    config = next((step.config for step in steps if step.kind == "train"), None)
    if config is None:
        return None
    return {"objective": config.objective, "steps": config.train.steps, "micro_batch_size": config.train.micro_batch_size,
            "input_length": config.input_length, "target_length": config.target_length, "lr": config.train.lr,
            "min_lr": config.train.min_lr, "distill": None if config.distill is None else to_dict(config.distill)}


def recovery_text(recovery: dict[str, Any]) -> str:
    distill = " + distillation from the unpruned model" if recovery["distill"] is not None else ""
    return (f"{recovery['objective']}{distill}, {recovery['steps']} steps x {recovery['micro_batch_size']} rows of "
            f"{recovery['input_length']}/{recovery['target_length']} tokens, lr {recovery['lr']:g} -> "
            f"{recovery['min_lr']:g}")


def markdown_table(results: dict[str, Any]) -> str:
    metric = results["metric"].replace("_", " ")
    lines = [f"| group | scorer | parameters | kept | {metric} pruned | {metric} recovered | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    reference = results["reference"]
    lines.append(f"| - | {reference['name']} (unpruned) | {reference['parameters']:,} | all | "
                 f"{reference[results['metric']]:.3f} | | |")
    for row in results["rows"]:
        best = min(r["recovered"]["mean"] for r in results["rows"] if r["group"] == row["group"])
        recovered = cell(row["recovered"])
        if row["recovered"]["mean"] == best:
            recovered = f"**{recovered}**"
        parameters = row["parameters"] if isinstance(row["parameters"], int) else row["parameters"][0]
        lines.append(f"| {row['group']} | {row['label']} | {parameters:,} | {' / '.join(row['kept'])} | "
                     f"{cell(row['pruned'])} | {recovered} | {row['recovered']['n']} |")
    return "\n".join(lines)


def write_report(config: AblationConfig, run_dir: Path, results: dict[str, Any]) -> Path:
    layer_shape = ", ".join(f"{stack} -{n}" for stack, n in config.layers.remove.items() if n)
    names = {"hidden": "hidden", "ffn_width": "FFN width", "heads": "heads"}
    neuron_shape = ", ".join(f"{names[k]} {v}" for k, v in to_dict(config.neurons).items() if v is not None)
    text = [
        "# Scorer ablation at equal size", "",
        f"Every scorer prunes **{results['reference']['name']}** to the same shape: layers ({layer_shape} blocks"
        f"{', first and last protected' if config.layers.protect_first_last else ''}) or widths ({neuron_shape}). "
        f"Each pruned model is recovered once per seed ({', '.join(map(str, config.seeds))}: the recovery's data "
        "order; the random scorer draws its units with the same seed) with the same recovery: "
        f"{recovery_text(results['recovery'])}. Numbers: `{results['task']}` {results['metric']} (lower is better; "
        f"{config.eval.limit} held-out texts), mean ± standard error over seeds; a deterministic scorer's pruned "
        "model is one model. Bold: the best recovered model of its group.", "",
        markdown_table(results), "",
        "![pruned and recovered bits per byte by scorer](ablation.png)", "",
    ]
    if "seconds" in results:
        text.append(f"Wall time of the last invocation: {results['seconds']:.0f} s; all stages together: "
                    f"{results['stage_seconds']:.0f} s; command: `{results['command']}`.")
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Bars per scorer with standard-error bars: pruned (top row) and recovered (bottom row) per group, each panel
    scaled to its own values so that differences between scorers show; a dashed line at the unpruned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("layers", "neurons") if any(r["group"] == g for r in results["rows"])]
    widest = max(sum(r["group"] == g for r in results["rows"]) for g in groups)
    figure, axes = plt.subplots(2, len(groups), figsize=(len(groups) * (2.5 + 0.7 * widest), 7.5), squeeze=False)
    reference = results["reference"][results["metric"]]
    for column, group in enumerate(groups):
        rows = [r for r in results["rows"] if r["group"] == group]
        for line, (side, colour) in enumerate((("pruned", "#d08770"), ("recovered", "#5e81ac"))):
            axis = axes[line][column]
            means = [r[side]["mean"] for r in rows]
            errors = [r[side]["se"] or 0.0 for r in rows]
            axis.bar(range(len(rows)), means, width=0.6, yerr=errors, capsize=4, color=colour)
            axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="unpruned")
            low = min([m - e for m, e in zip(means, errors)] + [reference])
            high = max([m + e for m, e in zip(means, errors)] + [reference])
            margin = 0.15 * (high - low) or 0.01
            axis.set_ylim(low - margin, high + margin)
            axis.set_xticks(range(len(rows)), [r["label"].replace(" (iterative)", "\n(iterative)") for r in rows],
                            rotation=30, ha="right", fontsize=8)
            axis.set_title(f"{group}, {side}", fontsize=10)
            axis.set_ylabel(f"{results['metric'].replace('_', ' ')} (lower is better)", fontsize=8)
            axis.legend(fontsize=7)
    figure.suptitle(f"{results['task']} {results['metric'].replace('_', ' ')} by scorer at equal size "
                    "(mean ± s.e. over seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- the command


def run_ablation(config: AblationConfig, out: str | Path, command: str = "") -> dict[str, Any]:
    """Plan, run every stage (skipping finished ones), and write results.json, report.md and ablation.png."""
    from pretrain.corpus import load_or_build_corpus

    started = time.time()
    run_dir = Path(out)
    check_scorers(config)
    context, corpus = make_context(config, run_dir)
    steps, rows, source = plan(config, run_dir, context)
    if corpus is not None:
        load_or_build_corpus(corpus, context.cache_dir / "corpus")
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    load = run_all(steps, run_dir)
    results = collect(config, run_dir, rows, source)
    results["seconds"] = round(time.time() - started, 1)
    if not load["stages_run"] and "seconds" in earlier:  # a rerun that ran nothing keeps the run's own figures
        results["seconds"], load = earlier["seconds"], earlier.get("load_average", load)
    results["stage_seconds"] = round(sum(Manifest.read(run_dir / s.name).timings.get("seconds", 0) for s in steps), 1)
    results["load_average"] = load
    results["recovery"] = recovery_summary(steps)
    results["command"] = command
    results["config"] = to_dict(config)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, run_dir / "ablation.png")
    write_report(config, run_dir, results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.scorer_ablation", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with AblationConfig fields (e.g. recipes/configs/scorer_ablation.yaml; "
                        "without it: the defaults, which are that file's settings)")
    parser.add_argument("--out", default="runs/scorer_ablation", help="run directory (default: runs/scorer_ablation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set recover.train.steps=10 (repeatable)")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(AblationConfig, args.config, args.overrides)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "recipes.scorer_ablation", *words])
    results = run_ablation(config, args.out, command)
    print(markdown_table(results))
    print(f"report: {Path(args.out) / 'report.md'}")
    print(f"total wall time: {results['seconds']:.0f} s (all stages: {results['stage_seconds']:.0f} s; 1-minute "
          f"load average mean {results['load_average']['load_1min_mean']}, max {results['load_average']['load_1min_max']})")


if __name__ == "__main__":
    main()
