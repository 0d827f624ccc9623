"""A Markdown report of a run's evaluations: gate tables, a metric-per-stage plot, long-context heatmaps.

    write_report([("s0", gate0), ("s1-layer", gate1), ("s2-layer", gate2)], "runs/report")

    python -m eval.report --stage s0=runs/s0-gate/results.json --stage s1=runs/s1-gate/results.json --out runs/report

Writes report.md, metrics_by_stage.png (one panel per gated metric, stages on the x axis), probes_<stage>.png
(exact match by context length x fact depth, one panel per probe kind) and, when the answer-choice tasks ran,
probe_choices.png (the answer's log-likelihood and mean rank among its candidates by length x depth, the stages side
by side on one colour scale per row). Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

from core.errors import UserError, main_guard
from core.table import format_table
from eval.gate import GATE_FORMAT, GateResult
from eval.harness import EvalResult, load_results

MAX_PANELS = 12  # more panels than this make each unreadable; the summary table still lists every metric


def _as_pair(stage) -> tuple[GateResult | None, EvalResult]:
    if isinstance(stage, GateResult):
        return stage, stage.results
    if isinstance(stage, EvalResult):
        return None, stage
    raise UserError(f"a report stage must be a GateResult or EvalResult, got {type(stage).__name__}")


def tracked_metrics(stages: Sequence[tuple[str, GateResult | EvalResult]]) -> list[tuple[str, str]]:
    """(task, metric) pairs to show: the gates' rule metrics first, else every metric the results hold."""
    pairs: dict[tuple[str, str], None] = {}
    for _, stage in stages:
        gate, _ = _as_pair(stage)
        for row in gate.rows if gate else []:
            pairs.setdefault((row.task, row.metric), None)
    if not pairs:
        for _, stage in stages:
            for task, metrics in _as_pair(stage)[1].metrics.items():
                for metric in metrics:
                    pairs.setdefault((task, metric), None)
    return list(pairs)


def probe_matrix(cells: list[dict], kind: str, metric: str = "exact_match",
                 ) -> tuple[list[int], list[float], list[list[float | None]]]:
    """Lengths (columns), depths (rows) and `metric` per cell for one probe kind (None where not measured)."""
    mine = [c for c in cells if c["kind"] == kind and metric in c]
    lengths = sorted({c["length"] for c in mine})
    depths = sorted({c["depth"] for c in mine})
    value = {(c["depth"], c["length"]): c[metric] for c in mine}
    return lengths, depths, [[value.get((d, n)) for n in lengths] for d in depths]


CHOICE_PANELS = (("gold_loglik", "answer log-likelihood (nats/char)", "RdYlGn"),
                 ("gold_rank", "mean rank of the answer (1 = best)", "RdYlGn_r"))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_metrics(stages, pairs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = pairs[:MAX_PANELS]
    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    names = [name for name, _ in stages]
    for ax, (task, metric) in zip(axes.flat, pairs):
        values = [_as_pair(s)[1].metrics.get(task, {}).get(metric) for _, s in stages]
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], marker="o")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probes(cells: list[dict], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in cells if "exact_match" in c]
    kinds = sorted({c["kind"] for c in cells})
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + 1.1 * max(len({c['length'] for c in cells}), 3) * len(kinds),
                                                    3.6), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        lengths, depths, matrix = probe_matrix(cells, kind)
        shown = [[float("nan") if v is None else v for v in row] for row in matrix]
        image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (characters)")
        ax.set_ylabel("fact depth")
        ax.set_title(f"{title}: {kind}", fontsize=9)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probe_choices(stages: Sequence[tuple[str, list[dict]]], path: Path) -> Path:
    """The answer-choice scores by length x depth: a row per (kind, metric), a column per stage, one colour scale
    per row (rank from 1 to the number of candidates), so stages compare cell by cell where exact match is 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({c["kind"] for _, cells in stages for c in cells if "gold_rank" in c})
    rows = [(kind, *panel) for kind in kinds for panel in CHOICE_PANELS]
    fig, axes = plt.subplots(len(rows), len(stages), squeeze=False, layout="constrained",
                             figsize=(0.6 + 3.3 * len(stages), 2.9 * len(rows)))
    for axes_row, (kind, metric, label, cmap) in zip(axes, rows):
        values = [c[metric] for _, cells in stages for c in cells if c["kind"] == kind and metric in c]
        if metric == "gold_rank":
            low, high = 1.0, float(max(c.get("candidates", 1) for _, cells in stages for c in cells
                                       if c["kind"] == kind and metric in c))
        else:
            low, high = (min(values), max(values)) if values else (0.0, 1.0)
        for ax, (name, cells) in zip(axes_row, stages):
            lengths, depths, matrix = probe_matrix(cells, kind, metric)
            shown = [[float("nan") if v is None else v for v in row] for row in matrix]
            image = ax.imshow(shown or [[float("nan")]], vmin=low, vmax=max(high, low + 1e-9), cmap=cmap,
                              aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
            ax.set_xlabel("context length (characters)", fontsize=8)
            ax.set_ylabel("fact depth", fontsize=8)
            ax.set_title(f"{name}: {kind}", fontsize=9)
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    if v is not None:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=list(axes_row), fraction=0.03, pad=0.02, label=label)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def choice_stages(stages) -> list[tuple[str, list[dict]]]:
    """(stage name, probe cells) of the stages whose results hold answer-choice scores."""
    found = [(name, _as_pair(stage)[1].probe_cells) for name, stage in stages]
    return [(name, cells) for name, cells in found if any("gold_rank" in c for c in cells)]


CHOICE_NOTE = ("Each probe row's answer ranked among its candidates (the answer and other values of its format: the "
               "distractor facts' values, other values of the JSON object, seeded random ones) by the total "
               "log-likelihood of \" value\" after the prompt: the answer's log-likelihood in nats per character "
               "(higher is better) and its mean rank (1 = best; chance is (candidates + 1) / 2), by context length "
               "and depth of the fact.")


def render_markdown(stages, pairs, title: str, images: dict[str, str]) -> str:
    names = [name for name, _ in stages]
    lines = [f"# {title}", "", "## Metrics by stage", ""]
    rows = [(f"{task}/{metric}", *(_as_pair(s)[1].metrics.get(task, {}).get(metric) for _, s in stages))
            for task, metric in pairs]
    lines += [format_table(rows, ["metric", *names], markdown=True), ""]
    gates = [(name, _as_pair(s)[0]) for name, s in stages if _as_pair(s)[0] is not None]
    if gates:
        verdicts = [(name, gate.gate, "passed" if gate.passed else "FAILED", len(gate.failures))
                    for name, gate in gates]
        lines += ["## Gates", "", format_table(verdicts, ["stage", "gate", "result", "failures"], markdown=True), ""]
        for name, gate in gates:
            lines += [f"### {name}", "", gate.to_markdown()]
    if "metrics" in images:
        lines += ["## Plots", "", f"![metrics by stage]({images['metrics']})", ""]
    probe_images = [(name, images[f"probes:{name}"]) for name in names if f"probes:{name}" in images]
    if probe_images:
        lines += ["## Long-context probes", "",
                  "Exact match by context length (characters before the question) and depth of the fact.", ""]
        lines += [f"![{name}]({image})\n" for name, image in probe_images]
    if "choices" in images:
        lines += ["## Long-context probes: the answer among candidates", "", CHOICE_NOTE, "",
                  f"![answer log-likelihood and rank]({images['choices']})", ""]
    return "\n".join(lines)


def write_report(stages: Sequence[tuple[str, GateResult | EvalResult]], out_dir: str | Path,
                 title: str = "Evaluation report") -> Path:
    """Write report.md and its PNGs into `out_dir` (created if needed); returns the report's path."""
    stages = list(stages)
    if not stages:
        raise UserError("a report needs at least one stage's results")
    names = [name for name, _ in stages]
    if len(set(names)) != len(names):
        raise UserError(f"stage names repeat in the report: {names}")
    for _, stage in stages:
        _as_pair(stage)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = tracked_metrics(stages)
    images: dict[str, str] = {}
    if pairs:
        images["metrics"] = plot_metrics(stages, pairs, out_dir / "metrics_by_stage.png").name
    for name, stage in stages:
        cells = _as_pair(stage)[1].probe_cells
        if any("exact_match" in c for c in cells):
            images[f"probes:{name}"] = plot_probes(cells, name, out_dir / f"probes_{_slug(name)}.png").name
    if choice_stages(stages):
        images["choices"] = plot_probe_choices(choice_stages(stages), out_dir / "probe_choices.png").name
    path = out_dir / "report.md"
    path.write_text(render_markdown(stages, pairs, title, images))
    return path


def load_stage(path: str | Path) -> GateResult | EvalResult:
    """A gate's results.json becomes a GateResult; any other results JSON an EvalResult."""
    path = Path(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and data.get("format") == GATE_FORMAT:
            return GateResult.from_dict(data)
    return load_results(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report",
        description="Write a Markdown report (gate tables, metric-per-stage plot, long-context heatmaps) from the "
                    "results JSONs of a run's stages, in stage order.",
        epilog="example: python -m eval.report --stage s0=runs/s0-gate/results.json "
               "--stage s1=runs/s1-gate/results.json --out runs/report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stage", action="append", required=True, metavar="NAME=RESULTS_JSON",
                        help="a stage's results (eval.gate's results.json or lm_eval's output); repeat in order")
    parser.add_argument("--out", required=True, help="report directory (written atomically, with a manifest)")
    parser.add_argument("--title", default="Evaluation report")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    from core.stage import Stage, run_stage

    args = parse_args(argv)
    stages = []
    for spec in args.stage:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--stage {spec!r} must look like NAME=path/to/results.json")
        stages.append((name, load_stage(path)))
    config = {"title": args.title, "stages": [spec for spec in args.stage]}
    run_stage(Stage("report", lambda _, work, __: {"report": write_report(stages, work, args.title).name}, config),
              None, args.out, force=True)
    rows = [(name, "passed" if s.passed else "FAILED", len(s.failures)) if isinstance(s, GateResult)
            else (name, "-", "-") for name, s in stages]
    print(format_table(rows, ["stage", "gate", "failures"]))
    print(f"report -> {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
