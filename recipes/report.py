"""report.md of a recipe run: the stage table, importance plots, loss curves, gate tables and probe heatmaps.

Everything is read back from the run directory (manifests, gate.json, metrics.jsonl, scores/*.png), so a report can
be rebuilt at any time, also for a run that stopped at a failing gate.
"""

from __future__ import annotations

import json
from pathlib import Path
from core.stage import MANIFEST, Manifest
from core.table import format_table, human_count
from recipes.importance_report import importance_sections
from recipes.spec import RecipeConfig

def stage_manifests(recipe: RecipeConfig, run_dir: Path) -> list[tuple[str, Manifest]]:
    return [(spec.name, Manifest.read(run_dir / spec.name)) for spec in recipe.stages
            if (run_dir / spec.name / MANIFEST).is_file()]


def parameters(manifest: Manifest, side: str = "after") -> int | None:
    """Parameters of the stage's output ("after") or input ("before"), as the stage contract counted them."""
    return (manifest.parameters or {}).get(side)


def gate_metric(run_dir: Path, name: str, task: str, metric: str) -> float | None:
    """A metric from a stage's gate results (e.g. corpus_ppl / bits_per_byte), or None."""
    path = run_dir / name / "gate.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text()).get("results", {}).get("metrics", {})
    value = (results.get(task) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def stage_table(recipe: RecipeConfig, run_dir: Path, markdown: bool = True) -> str:
    manifests = stage_manifests(recipe, run_dir)
    # "removed" counts from the model the recipe started from: the first stage's input (or, for a stage that makes
    # the model, such as the teacher, its output)
    first = next((parameters(m, "before") or parameters(m) for _, m in manifests
                  if parameters(m, "before") or parameters(m)), None)
    rows = []
    for name, manifest in manifests:
        params = parameters(manifest)
        gate = manifest.metrics.get("gate") or {}
        rows.append([
            name, manifest.config.get("kind", ""), human_count(params) if params else "",
            f"{100 * (1 - params / first):.1f}%" if params and first else "",
            _fmt(manifest.metrics.get("val_loss")),
            _fmt(gate_metric(run_dir, name, "corpus_ppl", "bits_per_byte")),
            _fmt(gate_metric(run_dir, name, "corpus_mc", "acc")),
            "pass" if gate.get("passed") else "-",
            f"{manifest.timings.get('seconds', 0):.0f}",
        ])
    headers = ["stage", "kind", "params", "removed", "val loss (own tokens)", "bits/byte", "MC acc", "gate", "seconds"]
    return format_table(rows, headers, markdown=markdown)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def probe_scores(run_dir: Path, name: str) -> dict[str, float]:
    """Exact match per probe task (e.g. probe_needle_2000) from a stage's gate results."""
    path = run_dir / name / "gate.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("results", {}).get("metrics", {})
    return {task: values["exact_match"] for task, values in metrics.items()
            if task.startswith("probe_") and task.count("_") == 2 and "exact_match" in values}


def choice_scores(run_dir: Path, name: str) -> dict[str, dict[str, float]]:
    """Answer log-likelihood and rank per answer-choice task and group (e.g. probe_needle_choices_2000) from a
    stage's gate results."""
    path = run_dir / name / "gate.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("results", {}).get("metrics", {})
    return {task: values for task, values in metrics.items() if task.startswith("probe_") and "gold_rank" in values}


def choice_table(rows_for: list[tuple[str, str]], run_dir: Path) -> list[str]:
    """A row per model: the answer's log-likelihood (nats per character) and mean rank per probe length, and over all
    lengths, for each probe kind whose answer-choice tasks the gates ran."""
    scores = {name: choice_scores(run_dir, name) for _, name in rows_for}
    groups = sorted({t for found in scores.values() for t in found if not t.rsplit("_", 1)[1].isdigit()})
    if not groups:
        return []
    columns = []  # (header, task, metric)
    for group in groups:
        kind = group[len("probe_"):-len("_choices")]
        tasks = sorted({t for found in scores.values() for t in found if t.startswith(group + "_")},
                       key=lambda t: int(t.rsplit("_", 1)[1]))
        for metric, short in (("gold_loglik", "log-lik"), ("gold_rank", "rank")):
            columns += [(f"{kind} {short} @{t.rsplit('_', 1)[1]}", t, metric) for t in tasks]
            columns.append((f"{kind} {short} (all)", group, metric))
    rows = [[label, *[_fmt((scores[name].get(task) or {}).get(metric)) for _, task, metric in columns]]
            for label, name in rows_for]
    return ["The answer among its candidates, where exact match cannot tell the models apart: its log-likelihood "
            "(nats per character of \" value\", higher is better) and its mean rank by total log-likelihood "
            "(1 = best, chance (candidates + 1) / 2); by length x depth in \"Long-context probes\" below.", "",
            format_table(rows, ["model", *[header for header, _, _ in columns]], markdown=True), ""]


def alignment_table(recipe: RecipeConfig, run_dir: Path) -> list[str]:
    """Long-context probes and short-context bits/byte before alignment, after each align stage (LOGO, and an
    SFT baseline branching off the same input), so LOGO's gain can be read against both: exact match, then the
    answer's log-likelihood and rank among candidates where the gates ran the answer-choice tasks."""
    stages = {spec.name: spec for spec in recipe.stages}
    aligned = [spec for spec in recipe.stages if spec.kind == "align" and (run_dir / spec.name / MANIFEST).is_file()]
    if not aligned:
        return []
    names = [spec.name for spec in recipe.stages]
    first = aligned[0]
    before = first.input or names[names.index(first.name) - 1]
    rows_for = [(f"before ({before})", before)] + [
        (f"{spec.name} ({(spec.args.get('logo') or {}).get('loss', {}).get('loss', 'logo')} loss)", spec.name)
        for spec in aligned]
    tasks = sorted({t for _, n in rows_for for t in probe_scores(run_dir, n)}, key=lambda t: int(t.rsplit("_", 1)[1]))
    if not tasks:
        return []
    rows = [[label, *[_fmt(probe_scores(run_dir, n).get(t)) for t in tasks],
             _fmt(gate_metric(run_dir, n, "corpus_ppl", "bits_per_byte"))] for label, n in rows_for]
    logo = stages[first.name].args.get("logo") or {}
    window = (logo.get("position") or {}).get("window")
    return ["## Long-context alignment", "",
            f"Exact match of the retrieval probes by context length in characters (LOGO trained on synthesised "
            f"positions over a window of {window} tokens), and short-context bits per byte.", "",
            format_table(rows, ["model", *tasks, "bits/byte"], markdown=True), "", *choice_table(rows_for, run_dir)]


def comparison(recipe: RecipeConfig, run_dir: Path) -> list[str]:
    """Teacher vs final model vs the same shape trained from scratch for the same steps (bits per byte)."""
    stages = {spec.name: spec for spec in recipe.stages}
    baseline = stages.get(recipe.baseline_stage) if recipe.baseline_stage else None
    if baseline is None or not (run_dir / baseline.name / MANIFEST).is_file():
        return []
    names = list(stages)
    # the model the baseline is compared with: the stage it branches off (its shape), else the main chain's end
    final = baseline.input or next(n for n in reversed(names) if n != baseline.name and stages[n].input is None)
    done = [name for name in names if (run_dir / name / MANIFEST).is_file()]
    if final not in done:
        return []
    rows = []
    for label, name in (("teacher (input)", done[0]), ("pruned + recovered", final),
                        ("same shape from scratch, same steps", baseline.name)):
        manifest = Manifest.read(run_dir / name)
        params = parameters(manifest)
        rows.append([label, name, human_count(params) if params else "",
                     _fmt(gate_metric(run_dir, name, "corpus_ppl", "bits_per_byte")),
                     _fmt(manifest.metrics.get("val_loss"))])
    return ["## Recovery against the teacher and against training from scratch", "",
            format_table(rows, ["model", "stage", "params", "bits/byte", "val loss (own tokens)"], markdown=True), ""]


def plot_loss_curves(run_dir: Path, names: list[str], out: Path) -> Path | None:
    """Training loss per step of every training stage (from its metrics.jsonl), one line per stage."""
    curves = {}
    for name in names:
        path = run_dir / name / "metrics.jsonl"
        if path.is_file():
            points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            points = [p for p in points if "loss" in p and "step" in p]
            if points:
                curves[name] = ([p["step"] for p in points], [p["loss"] for p in points])
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, (steps, losses) in curves.items():
        axis.plot(steps, losses, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (nats/token)")
    axis.set_title("Training loss per stage")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def gate_sections(run_dir: Path, names: list[str]) -> list[str]:
    """Metrics by stage and long-context heatmaps (drawn by eval.report into run_dir/eval), then each gate's table."""
    from eval.report import CHOICE_NOTE, choice_stages, load_stage, write_report as write_eval_report

    gated = [(name, load_stage(run_dir / name / "gate.json")) for name in names if (run_dir / name / "gate.json").is_file()]
    if not gated:
        return []
    eval_dir = run_dir / "eval"
    write_eval_report(gated, eval_dir, title="Gates by stage")
    lines = ["## Gate metrics by stage", ""]
    if (eval_dir / "metrics_by_stage.png").is_file():
        lines += ["![metrics by stage](eval/metrics_by_stage.png)", ""]
    heatmaps = sorted(eval_dir.glob("probes_*.png"))
    if heatmaps:
        lines += ["## Long-context probes (exact match by length x depth)", ""]
        lines += [f"![{p.stem}](eval/{p.name})" for p in heatmaps] + [""]
    if choice_stages(gated):
        lines += ["## Long-context probes (answer log-likelihood and rank by length x depth)", "", CHOICE_NOTE, "",
                  "![answer log-likelihood and rank](eval/probe_choices.png)", ""]
    for name, _ in gated:
        lines += [f"## Gate after {name}", "", (run_dir / name / "gate.md").read_text().strip(), ""]
    return lines


def write_report(recipe: RecipeConfig, run_dir: Path, extra_sections: list[str] | None = None) -> Path:
    run_dir = Path(run_dir)
    names = [spec.name for spec in recipe.stages]
    lines = [f"# {recipe.name}: run report", "", "## Stages", "", stage_table(recipe, run_dir), ""]
    lines += ["`val loss` is each stage's own validation loss (nats per token of its own tokenizer: not comparable "
              "across vocabulary pruning); `bits/byte` is from the gate's held-out perplexity task and compares "
              "across every stage.", ""]
    lines += comparison(recipe, run_dir)
    lines += alignment_table(recipe, run_dir)
    curve = plot_loss_curves(run_dir, names, run_dir / "loss_curves.png")
    if curve:
        lines += ["## Loss curves", "", f"![loss curves]({curve.name})", ""]
    for name in names:
        plots = sorted((run_dir / name / "scores").glob("*.png")) if (run_dir / name / "scores").is_dir() else []
        if plots:
            lines += [f"## Importance scores: {name}", ""]
            lines += [f"![{p.stem}]({p.relative_to(run_dir)})" for p in plots] + [""]
    lines += importance_sections(recipe, run_dir)
    lines += gate_sections(run_dir, names)
    lines += extra_sections or []
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
