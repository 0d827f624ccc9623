"""The stage protocol: what every command and every recipe stage is.

A stage kind declares its config dataclass, the inputs it reads, `prepare(config, inputs, progress)` which loads and
validates everything and writes nothing, `run(prepared, work_dir)` which writes the output into the stage's
temporary directory and returns metrics, a `summary` of the finished manifest for the terminal, and
`shape_after(config, shape, model)` for the dry-run planner. `execute` owns everything else through the stage contract
(core/stage.py): the `--out` policy, the lock, atomic publish, the manifest (parameters before and after, timings,
config hash, inputs, versions) and the model card. The command line (core/cli.py) and the recipe
(recipes/openba_v2.py) both call `execute`, so both fail at the same point: before anything is written.

Any kind can also score its output: `score` (a `ScoreRequest`) runs the registered importance scorers over the
checkpoint the stage wrote, through the same calibration pass the pruners use, and saves the scores and their plots
beside it (`importance/`), so a recipe can follow how importance moves from stage to stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Input:
    """A path a kind reads: becomes `--NAME` on the command line; the recipe fills it from the previous stage."""

    name: str
    help: str
    required: bool = True
    is_checkpoint: bool = True
    """The stage's input checkpoint (its manifest's `inputs` and the model card's base model)."""


@dataclasses.dataclass
class ScoreRequest:
    """Importance scores of a stage's output: `{unit: scorer}` for units layers / heads / channels, over `calib`.

    Saved in `<output>/importance/` (scores.safetensors, scores.json and plots), so reports can show how layer and
    head importance move across stages. A user's scorer is named as `pkg.module:function`.
    """

    scorers: dict[str, str] = dataclasses.field(default_factory=lambda: {"layers": "block_influence",
                                                                         "heads": "activation"})
    calib: str | None = None
    """Calibration data (as the pruners take it); a recipe fills in its corpus."""
    num_samples: int = 16
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.scorers) - {"layers", "heads", "channels"})
        if unknown:
            raise UserError(f"score.scorers names unknown units {unknown}; units: layers, heads, channels")


@dataclasses.dataclass(frozen=True)
class StageKind:
    """One kind of stage: see the module docstring."""

    name: str
    """The recipe's `kind:` (e.g. layer_prune)."""
    stage: str
    """The manifest's stage name (e.g. layer-prune): an output folder is reused only by the stage that wrote it."""
    module: str
    """The command that runs it alone (python -m MODULE)."""
    config_cls: type
    prepare: Callable[[Any, dict[str, Path], bool], Any]
    run: Callable[[Any, Path], dict[str, Any]]
    description: str = ""
    examples: tuple[str, ...] = ()
    inputs: tuple[Input, ...] = (Input("model", "checkpoint directory (any supported family)"),)
    summary: Callable[[Any], str] | None = None
    """Manifest -> text printed after the stage (a table)."""
    shape_after: Callable[[Any, Any, Any], Any] | None = None
    """(config, ModelShape, core.planning.PlannedModel) -> ModelShape, or a core.planning.Estimate where scores or
    data decide the shape, for the dry-run planner (the PlannedModel counts shapes: a budget needs counts); None:
    the kind keeps the shape."""
    resumable: bool = False
    flags: Callable[[Any], None] | None = None
    """Adds flags the generated ones cannot express (e.g. `--drop STACK=I,J`, repeated) to the parser."""
    flag_values: Callable[[Any], dict[str, Any]] | None = None
    """Parsed namespace -> config fields from those flags."""
    exclusive: tuple[tuple[str, ...], ...] = ()
    """Groups of fields of which a command line value replaces the others given in a YAML file (one target)."""
    writes_checkpoint: bool = True
    """The output is a checkpoint (so it can be scored with `--score`); False for data, scores and gate results."""
    verdict: Callable[[Any], str | None] | None = None
    """Manifest -> why the finished stage's outcome is a failure (a gate that did not pass), or None. The command
    prints it as `error: ...` after the summary and exits 1; the output stays published (it is the evidence)."""

    @property
    def checkpoint_input(self) -> str | None:
        return next((i.name for i in self.inputs if i.is_checkpoint), None)


KINDS: dict[str, StageKind] = {}


def register_kind(kind: StageKind) -> StageKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> StageKind:
    """A registered kind by its recipe name (kinds register when their module is imported: recipes/kinds.py
    imports every one)."""
    import difflib

    if name not in KINDS:
        close = difflib.get_close_matches(name, list(KINDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown stage kind '{name}'{hint}; kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def execute(kind: StageKind, config: Any, inputs: dict[str, str | Path | None], out: str | Path,
            force: bool = False, progress: bool = True, score: ScoreRequest | None = None):
    """Run one stage of `kind` into `out` under the stage contract; returns its manifest.

    Order: the `--out` policy (nothing written), then `prepare` (loads and validates; nothing written), then the
    stage contract (lock, partial directory, run, score, manifest, card, publish). A stage already complete for
    this config and input is returned as it is, unless `force`.
    """
    from core.stage import check_output_location, run_stage

    # `--model=~/ckpt` reaches us unexpanded (a shell expands `~` only at the start of a word)
    paths = {name: Path(value).expanduser() if value is not None else None for name, value in inputs.items()}
    out = Path(out).expanduser()
    for spec in kind.inputs:
        if spec.required and paths.get(spec.name) is None:
            raise UserError(f"stage kind '{kind.name}' needs --{spec.name.replace('_', '-')}")
    checkpoint = paths.get(kind.checkpoint_input) if kind.checkpoint_input else None
    # every input, not only the checkpoint run_stage knows of; run_stage then skips a finished stage before prepare
    check_output_location(out, kind.stage, [p for p in paths.values() if p is not None])
    return run_stage(stage_of(kind, config, paths, progress, score), checkpoint, out, force=force)


def stage_of(kind: StageKind, config: Any, inputs: dict[str, Path | None], progress: bool = True,
             score: ScoreRequest | None = None):
    """The stage contract's `Stage` for one kind: `prepare` runs before anything is written (an input left as None
    is the checkpoint the stage reads, known only when it runs)."""
    from core.stage import Stage

    def prepare(input_dir: Path | None):
        given = {key: (input_dir if key == kind.checkpoint_input and value is None else value)
                 for key, value in inputs.items()}
        if kind.checkpoint_input and kind.checkpoint_input not in given:
            given[kind.checkpoint_input] = input_dir
        prepared = kind.prepare(config, given, progress)

        def run(_input, work_dir: Path, _config) -> dict[str, Any]:
            metrics = kind.run(prepared, work_dir) or {}
            if score is not None:
                from compress.score import score_checkpoint  # the scorers are compress's; loaded only when asked

                metrics["importance"] = score_checkpoint(work_dir, score, progress)
            return metrics

        return run

    def unprepared(*_):
        raise RuntimeError("a protocol stage runs through its prepare step")

    return Stage(kind.stage, unprepared, config, resumable=kind.resumable, prepare=prepare)
