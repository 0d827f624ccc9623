"""`python -m compress.score`: score a checkpoint's layers, heads and FFN channels, save the scores and plots.

Scoring once and pruning many times (different targets, layer then neuron pruning) saves the calibration pass:
every pruning command takes `--scores DIR` with the directory this writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.cli import command
from core.errors import UserError
from core.kind import StageKind, register_kind
from compress.calibration import CalibrationConfig

UNITS = ("layers", "heads", "channels")


@dataclass
class ScoreConfig:
    """Which scorer per unit ("none" or null: that unit is not scored) and the calibration data they see."""

    layers: str | None = "block_influence"
    """Layer scorer: block_influence (ShortGPT), angular_distance (Gromov et al.), skip_loss (exact, one pass per
    block), v2_heuristic (OpenBA-V2's rule), random, pkg.module:function, or none."""
    heads: str | None = None
    """Head scorer (default: not scored): activation (Minitron), wanda, taylor (needs a backward pass), random, or a
    dotted path."""
    channels: str | None = None
    """FFN channel scorer (default: not scored): activation, wanda, taylor, random, or a dotted path."""
    seed: int = 0
    """Seed for the random scorers."""
    calib: str | None = None
    """Calibration data: a saved dataset (python -m pretrain.corpus), a directory of text files, or a file."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        for unit in UNITS:  # "none" on the command line turns off a unit scored by default
            if isinstance(getattr(self, unit), str) and getattr(self, unit).strip().lower() == "none":
                setattr(self, unit, None)

    def chosen(self) -> dict[str, str]:
        return {unit: getattr(self, unit) for unit in UNITS if getattr(self, unit)}


def summary_rows(scores) -> list[list]:
    rows = []
    for unit in ("layers", "heads", "channels", "tokens"):
        names = scores.names(unit)
        if not names:
            continue
        summary = scores.summary()
        values = [summary[n] for n in names]
        rows.append([unit, scores.meta.get("scorers", {}).get(unit, "?"), len(names),
                     sum(v["shape"][0] for v in values), min(v["min"] for v in values),
                     sum(v["mean"] for v in values) / len(values), max(v["max"] for v in values),
                     "yes" if all(v["finite"] for v in values) else "NO"])
    return rows


def prepare(config: ScoreConfig, model_dir: str | Path, progress: bool = True):
    """Load the model and data and score them: an unknown or failing scorer (a user's too) and missing data stop
    here, before the output directory exists. Returns the scores."""
    from core.adapters import get_adapter
    from compress.calibration import calibration_batches
    from compress.layer import load_inputs
    from compress.scorers import get_scorer
    from compress.scoring import score_model

    chosen = config.chosen()
    if not chosen:
        raise UserError("nothing to score: name a scorer for --layers, --heads or --channels")
    scorers = {unit: get_scorer(unit, name) for unit, name in chosen.items()}  # unknown names fail before loading
    if any(scorer.needs for scorer in scorers.values()) and config.calib is None:
        raise UserError("these scorers need calibration data: give --calib DATA")
    model, tokenizer = load_inputs(str(model_dir), config.tokenizer)
    get_adapter(model)
    calib = None
    if config.calib is not None:
        calib = calibration_batches(config.calib, tokenizer, model=model, config=config.calibration)
    return score_model(model, calib, chosen, seed=config.seed, progress=progress)


def write_scores(scores, work_dir: Path) -> dict:
    from compress.plots import plot_scores

    scores.save(work_dir)
    plots = plot_scores(scores, work_dir)
    return {"scorers": dict(scores.meta.get("scorers", {})), "tensors": len(scores),
            "calibration_tokens": scores.meta["num_tokens"], "calibration_loss": scores.meta["calibration_loss"],
            "plots": [p.name for p in plots], "summary": summary_rows(scores)}


def summary(manifest) -> str:
    from core.table import format_table

    return format_table(manifest.metrics["summary"],
                        ["unit", "scorer", "tensors", "units", "min", "mean", "max", "finite"])


KIND = register_kind(StageKind(
    name="score",
    writes_checkpoint=False,
    stage="score",
    module="compress.score",
    config_cls=ScoreConfig,
    prepare=lambda config, inputs, progress: prepare(config, inputs["model"], progress),
    run=lambda scores, work_dir: write_scores(scores, work_dir),
    description="Score layers / attention heads / FFN channels of a checkpoint in one calibration pass; write "
                "scores.safetensors, scores.json, one PNG per stack and a manifest.",
    examples=(
        "python -m compress.score --model ckpt --calib runs/corpus --out runs/scores --layers block_influence "
        "--heads wanda --channels activation",
        "python -m compress.score --model ckpt --calib runs/corpus --out runs/head-scores --layers none --heads taylor",
    ),
    summary=summary,
))
main = command(KIND)


if __name__ == "__main__":
    main()


def score_checkpoint(directory: Path, request, progress: bool = True) -> dict:
    """Score the checkpoint a stage just wrote into `directory` (a `core.kind.ScoreRequest`) and save the scores and
    their plots in `directory/importance/`: the scoring hook every stage kind offers."""
    from compress.calibration import CalibrationConfig, calibration_batches
    from compress.plots import plot_scores
    from compress.scoring import score_model
    from core.checkpoint import load_model, load_tokenizer

    if request.calib is None:
        raise UserError("scoring a stage's output needs calibration data: set score.calib")
    model, tokenizer = load_model(directory).eval(), load_tokenizer(directory)
    calibration = CalibrationConfig(num_samples=request.num_samples, seq_len=request.seq_len)
    batches = calibration_batches(request.calib, tokenizer, model=model, config=calibration)
    scores = score_model(model, batches, dict(request.scorers), seed=request.seed, progress=progress)
    target = Path(directory) / "importance"
    scores.save(target)
    plots = plot_scores(scores, target)
    return {"scorers": dict(request.scorers), "saved": "importance/", "plots": [p.name for p in plots],
            "calibration_loss": scores.meta.get("calibration_loss")}
