"""report.md's "Importance across stages": layer and head importance of every scored stage, at the teacher's indices.

A stage with a `score:` section saves the importance of its output in `STAGE/importance/` (core.kind.ScoreRequest).
Pruned models number their blocks and heads afresh, so each stage's scores are mapped back to the first model of the
pruning chain through what the pruners record in the config: `original_layer_indices` (compress.layer) and
`original_head_indices` (compress.neuron). A pruned unit is blank, and a stage without `importance/` (an older run,
or no `score:`) is left out, so the section shows where recovery, continual training and LOGO / SFT move importance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from core.table import format_table
from recipes.spec import RecipeConfig

IMPORTANCE_DIR = "importance"
OUT_DIR = "importance_across_stages"
LAYER_PLOT = "layers.png"
HEAD_PLOT = "heads.png"

Group = tuple[str, str]  # (stack, attention kind): heads.encoder.self.*, heads.decoder.cross.*
Head = tuple[int, int]  # (original layer, original head)


@dataclasses.dataclass
class StageImportance:
    """One stage's raw scores at the first model's indices (missing keys: units the stage no longer has)."""

    name: str
    scorers: dict[str, str]
    layers: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    """stack -> original block -> score."""
    heads: dict[Group, dict[Head, float]] = dataclasses.field(default_factory=dict)
    """(stack, kind) -> (original layer, original head) -> score."""
    unmapped: list[str] = dataclasses.field(default_factory=list)
    """Units left out because the stage's config does not say where they came from (pruned before records)."""


@dataclasses.dataclass
class _RawStage:
    name: str
    tensors: dict[str, list[float]]
    scorers: dict[str, str]
    config: dict


def _read(stage_dir: Path, name: str) -> _RawStage | None:
    """A stage's importance tensors and config, or None when the stage saved no importance scores."""
    from compress.scoring import SCORES_FILE, ImportanceScores

    if not (stage_dir / IMPORTANCE_DIR / SCORES_FILE).is_file():
        return None
    scores = ImportanceScores.load(stage_dir / IMPORTANCE_DIR)
    config_path = stage_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return _RawStage(name, {n: t.tolist() for n, t in scores.tensors.items()},
                     dict(scores.meta.get("scorers", {})), config)


def _head_groups(tensors: dict[str, list[float]]) -> dict[Group, dict[int, list[float]]]:
    """heads.{stack}.{kind}.{layer} -> (stack, kind) -> current layer -> per-head scores."""
    groups: dict[Group, dict[int, list[float]]] = {}
    for name, values in tensors.items():
        parts = name.split(".")
        if parts[0] == "heads" and len(parts) == 4 and parts[3].isdigit():
            groups.setdefault((parts[1], parts[2]), {})[int(parts[3])] = values
    return groups


def map_stage(raw: _RawStage, widest: dict[Group, int]) -> StageImportance:
    """Scores of `raw` at original indices; `widest` is each attention group's largest head count in the run, which
    stands for the unpruned count where a config has no head record."""
    layer_record = raw.config.get("original_layer_indices") or {}
    head_record = raw.config.get("original_head_indices") or {}
    stage = StageImportance(raw.name, raw.scorers)
    origin: dict[str, list[int]] = {}
    for name, values in raw.tensors.items():
        if name.startswith("layers."):
            stack = name.split(".", 1)[1]
            origin[stack] = list(layer_record.get(stack) or range(len(values)))
            if len(origin[stack]) != len(values):
                stage.unmapped.append(f"{stack} layers")
                continue
            stage.layers[stack] = dict(zip(origin[stack], values))
    for (stack, kind), rows in _head_groups(raw.tensors).items():
        blocks = list(layer_record.get(stack) or origin.get(stack) or range(max(rows) + 1))
        kept = ((head_record.get(stack) or {}).get(kind) or {})
        mapped: dict[Head, float] = {}
        for layer, values in rows.items():
            original_layer = blocks[layer] if layer < len(blocks) else None
            heads = kept.get(str(original_layer))
            if heads is None and len(values) == widest[(stack, kind)]:
                heads = list(range(len(values)))
            if original_layer is None or heads is None or len(heads) != len(values):
                stage.unmapped.append(f"{stack} {kind}-attention heads of block {layer}")
                continue
            mapped.update({(original_layer, head): value for head, value in zip(heads, values)})
        if mapped:
            stage.heads[(stack, kind)] = mapped
    return stage


def collect(run_dir: Path, names: list[str]) -> list[StageImportance]:
    """Every stage in `names` that saved importance scores, in order, mapped to the first model's indices."""
    raws = [raw for name in names if (raw := _read(run_dir / name, name)) is not None]
    widest: dict[Group, int] = {}
    for raw in raws:
        for group, rows in _head_groups(raw.tensors).items():
            widest[group] = max([widest.get(group, 0), *map(len, rows.values())])
    return [map_stage(raw, widest) for raw in raws]


def normalise(values: dict) -> dict:
    """Divide by the mean over the units present, so 1 is an average unit of that stage and scorers whose scale
    drifts with training (activation norms grow) compare across stages; a mean that is not positive (a user's
    scorer) divides by the largest magnitude instead."""
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return dict(values)
    scale = sum(finite) / len(finite)
    if not scale > 0:
        scale = max(abs(v) for v in finite) or 1.0
    return {key: value / scale for key, value in values.items()}


def _layer_columns(stages: list[StageImportance], stack: str) -> list[int]:
    return sorted({block for stage in stages for block in stage.layers.get(stack, {})})


def _head_shape(stages: list[StageImportance], group: Group) -> tuple[list[int], int]:
    units = {unit for stage in stages for unit in stage.heads.get(group, {})}
    return sorted({layer for layer, _ in units}), max(head for _, head in units) + 1


def _stacks(stages: list[StageImportance]) -> list[str]:
    return list(dict.fromkeys(stack for stage in stages for stack in stage.layers))


def _groups(stages: list[StageImportance]) -> list[Group]:
    return list(dict.fromkeys(group for stage in stages for group in stage.heads))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colormap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")  # pruned units: light grey


def plot_layers(stages: list[StageImportance], path: Path) -> Path | None:
    """One heatmap per stack: a row per stage, a column per original block, values written in the cells."""
    import numpy as np

    stacks = _stacks(stages)
    if not stacks:
        return None
    plt = _pyplot()
    widths = [len(_layer_columns(stages, stack)) for stack in stacks]
    rows = [stage for stage in stages if stage.layers]
    figure, axes = plt.subplots(1, len(stacks), figsize=(2.2 + 0.75 * sum(widths), 0.9 + 0.45 * len(rows)),
                                squeeze=False, gridspec_kw={"width_ratios": widths})
    grids = {}
    for stack in stacks:
        columns = _layer_columns(stages, stack)
        grid = np.full((len(rows), len(columns)), np.nan)
        for r, stage in enumerate(rows):
            for block, value in normalise(stage.layers.get(stack, {})).items():
                grid[r, columns.index(block)] = value
        grids[stack] = (columns, grid)
    top = max((float(np.nanmax(g)) for _, g in grids.values() if np.isfinite(g).any()), default=1.0)
    for axis, stack in zip(axes[0], stacks):
        columns, grid = grids[stack]
        image = axis.imshow(np.ma.masked_invalid(grid), cmap=_colormap(), vmin=0.0, vmax=top, aspect="auto")
        for (r, c), value in np.ndenumerate(grid):
            if np.isfinite(value):
                axis.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 * top else "white")
        axis.set_xticks(range(len(columns)), [str(c) for c in columns])
        axis.set_xlabel(f"{stack} block (teacher's numbering)")
        axis.set_yticks(range(len(rows)), [stage.name for stage in rows] if axis is axes[0][0] else [])
        axis.set_title(f"{stack} layers", fontsize=10)
    figure.colorbar(image, ax=list(axes[0]), label="score / stage mean")
    figure.suptitle("Layer importance across stages (grey: pruned)", fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_heads(stages: list[StageImportance], path: Path) -> Path | None:
    """A grid per stage: one panel per attention (stack, kind), original layers down, original heads across."""
    import numpy as np

    groups = _groups(stages)
    rows = [stage for stage in stages if stage.heads]
    if not groups or not rows:
        return None
    plt = _pyplot()
    shapes = {group: _head_shape(stages, group) for group in groups}
    figure, axes = plt.subplots(len(rows), len(groups), figsize=(1.2 + 2.6 * len(groups), 0.6 + 1.9 * len(rows)),
                                squeeze=False)
    grids = {}
    for r, stage in enumerate(rows):
        for group in groups:
            layers, width = shapes[group]
            grid = np.full((len(layers), width), np.nan)
            for (layer, head), value in normalise(stage.heads.get(group, {})).items():
                grid[layers.index(layer), head] = value
            grids[r, group] = grid
    top = max((float(np.nanmax(g)) for g in grids.values() if np.isfinite(g).any()), default=1.0)
    for r, stage in enumerate(rows):
        for c, group in enumerate(groups):
            axis, (layers, width) = axes[r][c], shapes[group]
            image = axis.imshow(np.ma.masked_invalid(grids[r, group]), cmap=_colormap(), vmin=0.0, vmax=top,
                                aspect="auto", interpolation="nearest")
            axis.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
            axis.set_xticks(range(width), [str(h) for h in range(width)], fontsize=7)
            if r == 0:
                axis.set_title(f"{group[0]} {group[1]}-attention", fontsize=9)
            if c == 0:
                axis.set_ylabel(f"{stage.name}\nblock", fontsize=8)
            if r == len(rows) - 1:
                axis.set_xlabel("head (teacher's numbering)", fontsize=8)
    figure.colorbar(image, ax=[a for row in axes for a in row], label="score / stage mean")
    figure.suptitle("Head importance across stages (grey: pruned)", fontsize=10)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _largest_change(before: dict, after: dict, label) -> tuple[str, str]:
    """Mean |change| of the normalised scores over units both stages have, and the unit that moved most."""
    old, new = normalise(before), normalise(after)
    shared = [key for key in new if key in old]
    if not shared:
        return "", ""
    key = max(shared, key=lambda k: abs(new[k] - old[k]))
    mean = sum(abs(new[k] - old[k]) for k in shared) / len(shared)
    return f"{mean:.3f}", f"{label(key)}: {old[key]:.2f} -> {new[key]:.2f}"


def _scored_parent(recipe: RecipeConfig, name: str, scored: set[str]) -> str | None:
    """The closest stage up `name`'s input chain that was scored (its `input`, else the stage before it)."""
    specs = {spec.name: spec for spec in recipe.stages}
    names = list(specs)
    while True:
        spec = specs[name]
        parent = spec.input or (names[names.index(name) - 1] if names.index(name) > 0 else None)
        if parent is None or parent in scored:
            return parent
        name = parent


def change_rows(recipe: RecipeConfig, stages: list[StageImportance]) -> list[list[str]]:
    """Per scored stage: its scorers, the scored stage it is compared with, and how far layers and heads moved."""
    by_name = {stage.name: stage for stage in stages}
    rows = []
    for stage in stages:
        parent = by_name.get(_scored_parent(recipe, stage.name, set(by_name)) or "")
        layer_mean, layer_top, head_mean, head_top = "", "", "", ""
        if parent is not None:
            moved = [(_largest_change(parent.layers[s], stage.layers[s], lambda b, s=s: f"{s} {b}"))
                     for s in stage.layers if s in parent.layers]
            if moved:
                layer_mean, layer_top = max(moved, key=lambda m: float(m[0] or 0))
            moved = [(_largest_change(parent.heads[g], stage.heads[g],
                                      lambda k, g=g: f"{g[0]} {g[1]} {k[0]}.{k[1]}"))
                     for g in stage.heads if g in parent.heads]
            if moved:
                head_mean, head_top = max(moved, key=lambda m: float(m[0] or 0))
        scorers = ", ".join(f"{unit} {name}" for unit, name in stage.scorers.items() if unit in ("layers", "heads"))
        rows.append([stage.name, scorers, parent.name if parent else "-", layer_mean, layer_top, head_mean, head_top])
    return rows


def importance_sections(recipe: RecipeConfig, run_dir: Path) -> list[str]:
    """The report section: both plots and the table of changes; nothing when no stage saved importance scores."""
    run_dir = Path(run_dir)
    stages = collect(run_dir, [spec.name for spec in recipe.stages])
    if not stages:
        return []
    out = run_dir / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    lines = ["## Importance across stages", "",
             f"Layer and head importance of each scored stage's output ({', '.join(s.name for s in stages)}), at the "
             "teacher's block and head numbers (pruned units are grey). Each stage's scores are divided by their mean "
             "over the units that stage has (per stack for layers, per stack and attention kind for heads), so 1 is "
             "an average unit of that stage and stages scored at different activation scales compare; after a prune "
             "the survivors' mean is higher, so a kept unit's value can drop without its raw score changing.", ""]
    for plot, title in ((plot_layers(stages, out / LAYER_PLOT), "layer importance across stages"),
                        (plot_heads(stages, out / HEAD_PLOT), "head importance across stages")):
        if plot is not None:
            lines += [f"![{title}]({plot.relative_to(run_dir)})", ""]
    lines += ["Change from the closest scored stage it descends from (mean absolute change of the normalised scores over "
              "units both have, and the unit that moved most; heads as block.head):", "",
              format_table(change_rows(recipe, stages), ["stage", "scorers", "compared with", "layers: mean abs change",
                                                         "largest layer change", "heads: mean abs change",
                                                         "largest head change"], markdown=True), ""]
    unmapped = [f"{stage.name}: {', '.join(stage.unmapped)}" for stage in stages if stage.unmapped]
    if unmapped:
        lines += ["Left out (the stage's config does not record which teacher units they are): "
                  + "; ".join(unmapped), ""]
    return lines
