"""`python -m compress.score`: score a checkpoint's layers, heads and FFN channels, save the scores and plots.

Scoring once and pruning many times (different targets, layer then neuron pruning) saves the calibration pass:
every pruning command takes `--scores DIR` with the directory this writes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError, main_guard
from compress.calibration import CalibrationConfig


@dataclass
class ScoreConfig:
    """Which scorer per unit (None: that unit is not scored) and the calibration data they see."""

    layers: str | None = "block_influence"
    """Layer scorer: block_influence (ShortGPT), angular_distance (Gromov et al.), skip_loss (exact, one pass per
    block), v2_heuristic (OpenBA-V2's rule), random, or pkg.module:function."""
    heads: str | None = None
    """Head scorer: activation (Minitron), wanda, taylor (needs a backward pass), random, or a dotted path."""
    channels: str | None = None
    """FFN channel scorer: activation, wanda, taylor, random, or a dotted path."""
    seed: int = 0
    """Seed for the random scorers."""
    calib: str | None = None
    """Calibration data: a saved dataset (python -m pretrain.corpus), a directory of text files, or a file."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compress.score",
        description="Score layers / attention heads / FFN channels of a checkpoint in one calibration pass; write "
                    "scores.safetensors, scores.json, one PNG per stack and a manifest.",
        epilog="example:\n  python -m compress.score --model ckpt --calib runs/corpus --out runs/scores "
               "--layers block_influence --heads wanda --channels activation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (any supported family)")
    parser.add_argument("--out", required=True, help="directory for the scores (written atomically)")
    parser.add_argument("--calib", help="calibration data: saved dataset, directory of text files, or a file")
    parser.add_argument("--layers", help="layer scorer (default block_influence; 'none' to skip)")
    parser.add_argument("--heads", help="head scorer (default: not scored)")
    parser.add_argument("--channels", help="FFN channel scorer (default: not scored)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--config", help="YAML file with ScoreConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. calibration.seq_len=512")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    from core.config import from_dict, load_config, merge, to_dict

    config = load_config(ScoreConfig, args.config, args.set)
    flags = {"layers": args.layers, "heads": args.heads, "channels": args.channels, "calib": args.calib,
             "tokenizer": args.tokenizer, "seed": args.seed}
    given = {k: (None if v == "none" else v) for k, v in flags.items() if v is not None}
    return from_dict(ScoreConfig, merge(to_dict(config), given))


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


@main_guard
def main(argv: list[str] | None = None) -> None:
    from core.adapters import get_adapter
    from compress.calibration import calibration_batches
    from compress.layer import load_inputs
    from compress.plots import plot_scores
    from compress.scorers import get_scorer
    from compress.scoring import score_model
    from core.stage import Stage, run_stage
    from core.table import format_table

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    chosen = {unit: name for unit, name in (("layers", config.layers), ("heads", config.heads),
                                            ("channels", config.channels)) if name}
    if not chosen:
        raise UserError("nothing to score: name a scorer for --layers, --heads or --channels")
    for unit, name in chosen.items():
        get_scorer(unit, name)  # unknown names fail before the model is loaded
    needs_data = any(get_scorer(u, n).needs for u, n in chosen.items())
    if needs_data and config.calib is None:
        raise UserError("these scorers need calibration data: give --calib DATA")
    model, tokenizer = load_inputs(args.model, config.tokenizer)
    get_adapter(model)
    calib = None
    if config.calib is not None:
        calib = calibration_batches(config.calib, tokenizer, model=model, config=config.calibration)

    # scored before the stage starts, so that a failing (user) scorer leaves nothing behind
    scores = score_model(model, calib, chosen, seed=config.seed, progress=not args.no_progress)

    def run(input_dir, work_dir, cfg):
        scores.save(work_dir)
        plots = plot_scores(scores, work_dir)
        return {"scorers": chosen, "tensors": len(scores), "calibration_tokens": scores.meta["num_tokens"],
                "calibration_loss": scores.meta["calibration_loss"], "plots": [p.name for p in plots]}

    run_stage(Stage("score", run, config), Path(args.model), args.out, force=True)
    print(format_table(summary_rows(scores), ["unit", "scorer", "tensors", "units", "min", "mean", "max", "finite"]))
    print(f"wrote {args.out}")


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
