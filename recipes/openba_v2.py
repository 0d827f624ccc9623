"""OpenBA-V2, then LOGO: prune -> recover -> prune -> recover -> vocabulary prune -> continual -> align, gated.

    python -m recipes.openba_v2                                   # the tiny embedded default, on a laptop CPU
    python -m recipes.openba_v2 --config recipes/configs/openba_v2_15b.yaml --dry-run
    python -m recipes.openba_v2 --only recover_1 --set stages.recover_1.args.train.steps=50

Each stage reads the previous stage's directory under the run directory and writes its own atomically with a
manifest; a rerun skips finished stages and resumes a training stage from its last checkpoint. After every stage
with a gate, the gate evaluates the new checkpoint against the previous gated stage's results; a failing gate stops
the recipe before the stage's output is published, and everything before it stays as it was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from core.config import from_dict, load_config, merge, parse_override, to_dict
from core.errors import UserError, main_guard
from core.launch import launch
from core.stage import Manifest, Stage, run_stages
from eval.gate import GateFailed
from recipes.first_process import on_first_process
from core.kind import ScoreRequest
from recipes.kinds import Context, recipe_kind, resolve_config
from recipes.report import stage_table, write_report
from recipes.spec import RecipeConfig, StageSpec

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "openba_v2_tiny.yaml"
GATE_FILE = "gate.json"


def load_recipe(path: str | Path | None, overrides: list[str]) -> RecipeConfig:
    """The recipe config; `--set stages.NAME.args.key=value` addresses a stage by name (lists are by name here)."""
    path = Path(path or DEFAULT_CONFIG)
    stage_overrides = [o for o in overrides if o.startswith("stages.")]
    recipe = load_config(RecipeConfig, path, [o for o in overrides if not o.startswith("stages.")])
    by_name = {spec.name: spec for spec in recipe.stages}
    if len(by_name) != len(recipe.stages):
        raise UserError("stage names in a recipe must be unique")
    for override in stage_overrides:
        tree = parse_override(override)["stages"]
        for name, fields in tree.items():
            if name not in by_name:
                raise UserError(f"override {override!r} names no stage '{name}' (stages: {', '.join(by_name)})")
            spec_dict = merge(to_dict(by_name[name]), fields)
            by_name[name] = from_dict(StageSpec, spec_dict, prefix=f"stages.{name}.")
    recipe.stages = [by_name[spec.name] for spec in recipe.stages]
    return recipe


def check_recipe(recipe: RecipeConfig, context: Context, require_model: bool = True) -> list[tuple[StageSpec, Any, Any]]:
    """Resolve every stage's config and gate once, before anything runs: a typo in stage 6 fails at start."""
    if not recipe.stages:
        raise UserError("the recipe has no stages: list them under `stages:` (name, kind, args)")
    resolved = []
    for index, spec in enumerate(recipe.stages):
        earlier = [s.name for s in recipe.stages[:index]]
        if spec.input is not None and spec.input not in earlier:
            raise UserError(f"stage '{spec.name}' reads stage '{spec.input}', which does not come before it "
                            f"(earlier stages: {', '.join(earlier) or 'none'})")
        config = resolve_config(spec.kind, spec.args, context, prefix=f"stages.{spec.name}.args.")
        gate = None
        if spec.gate is not None:
            if spec.gate not in recipe.gates:
                raise UserError(f"stage '{spec.name}' names gate '{spec.gate}', which the recipe does not define "
                                f"(gates: {', '.join(recipe.gates) or 'none'})")
            gate = load_gate(recipe.gates[spec.gate], spec.gate)
        if spec.score is not None:
            from_dict(ScoreRequest, dict(spec.score), prefix=f"stages.{spec.name}.score.")
        resolved.append((spec, config, gate))
    if recipe.model is None and (not recipe.stages or recipe.stages[0].kind != "teacher"):
        raise UserError("the recipe has no input: set `model` (a checkpoint directory) or start with a teacher stage")
    if require_model and recipe.model is not None and not Path(recipe.model).is_dir():
        raise UserError(f"the recipe's input model {recipe.model} does not exist")
    return resolved


def load_gate(value: dict[str, Any] | str, name: str):
    """A gate given inline in the recipe, or as the path of a gate YAML (e.g. eval/gates/commonsense.yaml)."""
    from core.config import read_yaml
    from eval.gate import GateConfig

    if isinstance(value, str):
        if not Path(value).expanduser().is_file():
            raise UserError(f"gate '{name}': no gate file {value}")
        value = read_yaml(value)
    elif not isinstance(value, dict):
        raise UserError(f"gate '{name}' must be a mapping (rules, tasks, ...) or the path of a gate YAML, "
                        f"got {value!r}")
    return from_dict(GateConfig, {"name": name, **value}, prefix=f"gates.{name}.")


def previous_gate(run_dir: Path, names: list[str], index: int) -> Path | None:
    """The gate results of the closest earlier stage that ran a gate: the baseline for this stage's gate."""
    for name in reversed(names[:index]):
        path = run_dir / name / GATE_FILE
        if path.is_file():
            return path
    return None


def protocol_stage(spec: StageSpec, config: Any, gate, context: Context, names: list[str], index: int) -> Stage:
    """The stage of one recipe entry: its kind's `prepare` before anything is written, then `run`, the optional
    importance scores of the output, and the gate; a failing gate raises, so nothing is published.

    Under a launcher every process runs the recipe: training kinds prepare and train on every process (each its
    share of the data, the first one writing the checkpoint), while a prune and every gate run on the first
    process alone and every process leaves with the outcome."""
    recipe_kind_ = recipe_kind(spec.kind)
    kind = recipe_kind_.kind
    score = None
    if spec.score is not None:
        score = from_dict(ScoreRequest, {"calib": str(context.corpus_dir) if context.corpus_dir else None,
                                         **dict(spec.score)})

    def prepare(input_dir: Path | None):
        check_disk(context.run_dir, input_dir, context)
        inputs = {**recipe_kind_.inputs(config, context)}
        if kind.checkpoint_input:
            inputs[kind.checkpoint_input] = input_dir
        if recipe_kind_.shares_work:
            prepared = kind.prepare(config, inputs, True)
        else:  # held by the first process only; a failure there fails every process
            held: dict[str, Any] = {}
            on_first_process(lambda: held.update(prepared=kind.prepare(config, inputs, True)))
            prepared = held.get("prepared")

        def run(_input: Path | None, work_dir: Path, _stage_config) -> dict[str, Any]:
            if recipe_kind_.shares_work:
                metrics = kind.run(prepared, work_dir) or {}
            else:
                metrics = on_first_process(lambda: kind.run(prepared, work_dir) or {})
            if score is not None:
                from compress.score import score_checkpoint

                metrics["importance"] = on_first_process(lambda: score_checkpoint(work_dir, score, True))
            if gate is not None:  # against the stage it read: the previous one, or the one a baseline branches off
                upto = names.index(spec.input) + 1 if spec.input else index
                baseline = previous_gate(context.run_dir, names, upto)
                metrics["gate"] = on_first_process(lambda: run_stage_gate(work_dir, gate, baseline))
            return metrics

        return run

    def unprepared(*_):
        raise RuntimeError("a recipe stage runs through its prepare step")

    stage_config = {"kind": spec.kind, "args": to_dict(config), "gate": to_dict(gate) if gate is not None else None}
    if spec.score is not None:
        stage_config["score"] = to_dict(score)
    return Stage(spec.name, unprepared, stage_config, resumable=kind.resumable, input=spec.input, prepare=prepare)


def run_stage_gate(work_dir: Path, gate, baseline: Path | None) -> dict[str, Any]:
    from core.checkpoint import load_model, load_tokenizer
    from eval.gate import GateFailed

    model = load_model(work_dir).eval()
    tokenizer = load_tokenizer(work_dir)
    from eval.gate import run_gate

    result = run_gate(model, tokenizer, gate, baseline=str(baseline) if baseline else None)
    (work_dir / GATE_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    (work_dir / "gate.md").write_text(result.to_markdown())
    print(result.to_table())
    if not result.passed:
        raise GateFailed(result)
    return {"name": gate.name, "passed": True, "checks": len(result.rows)}


def check_disk(work_dir: Path, input_dir: Path | None, context: Context) -> None:
    """Refuse to start a stage that cannot fit its output: about the input checkpoint's size again, plus margin."""
    need = sum(p.stat().st_size for p in Path(input_dir).rglob("*") if p.is_file()) if input_dir else 0
    free = shutil.disk_usage(work_dir).free
    margin = context.min_free_disk_gb * 2**30
    if free < 2 * need + margin:
        raise UserError(f"not enough disk for the next stage in {work_dir}: {free / 2**30:.1f} GiB free, "
                        f"about {(2 * need + margin) / 2**30:.1f} GiB needed")


def build_stages(resolved: list[tuple[StageSpec, Any, Any]], context: Context) -> list[Stage]:
    names = [spec.name for spec, _, _ in resolved]
    return [protocol_stage(spec, config, gate, context, names, index)
            for index, (spec, config, gate) in enumerate(resolved)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.openba_v2", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"recipe YAML (default: {DEFAULT_CONFIG.relative_to(CONFIGS.parent.parent)})")
    parser.add_argument("--run-dir", help="override the config's run_dir")
    parser.add_argument("--from", dest="start", help="first stage to run (earlier stages must have completed)")
    parser.add_argument("--to", dest="stop", help="last stage to run")
    parser.add_argument("--only", help="run just this stage")
    parser.add_argument("--dry-run", action="store_true", help="print the plan on the meta device; load no weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set stages.recover_1.args.train.steps=20 (repeatable)")
    # DeepSpeed's launcher passes --local_rank to every process; the rank is read from LOCAL_RANK (core.launch)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    recipe = load_recipe(args.config, overrides)
    if args.dry_run:
        from recipes.plan import format_plan, plan

        check_recipe(recipe, Context(Path(recipe.run_dir), Path(recipe.run_dir)), require_model=False)
        print(format_plan(plan(recipe), recipe.world_size))
        return
    run_dir = Path(recipe.run_dir)
    context = make_context(recipe, run_dir)
    resolved = check_recipe(recipe, context)  # every stage's config and gate, once, before any work
    check_selection([spec.name for spec in recipe.stages], args.start, args.stop, args.only)
    ensure_corpus(recipe, context)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = build_stages(resolved, context)
    started = time.time()

    first = launch().rank == 0  # under a launcher every process runs the stages; the first reports them

    def done(stage: Stage, manifest: Manifest) -> None:
        if first:
            print(f"[{stage.name}] done in {manifest.timings.get('seconds', 0):.0f}s")

    try:
        run_stages(stages, run_dir, input_dir=recipe.model, start=args.start, stop=args.stop, only=args.only,
                   on_done=done)
    except GateFailed as failed:  # exit 1 as `python -m eval.gate` does; bad input exits 2
        print(f"error: {failed}; the stage's output stays unpublished in its .partial directory", file=sys.stderr)
        raise SystemExit(1) from None
    finally:  # the table and report also show a run that stopped at a failing gate; one process writes them
        if first:
            print(stage_table(recipe, run_dir, markdown=False))
            report = write_report(recipe, run_dir)
    if first:
        print(f"finished in {time.time() - started:.0f}s; report: {report}")


def check_selection(names: list[str], start: str | None, stop: str | None, only: str | None) -> None:
    """--from / --to / --only name stages of this recipe (checked before the run directory exists)."""
    for name in (start, stop, only):
        if name is not None and name not in names:
            raise UserError(f"no stage named '{name}' (stages: {', '.join(names)})")


def teacher_stage_config(recipe: RecipeConfig):
    first = recipe.stages[0] if recipe.stages else None
    if recipe.model is None and first is not None and first.kind == "teacher":
        return first, from_dict(recipe_kind("teacher").kind.config_cls, dict(first.args),
                                prefix=f"stages.{first.name}.args.")
    return first, None


def make_context(recipe: RecipeConfig, run_dir: Path) -> Context:
    """Shared inputs: the offline corpus the teacher trained on (calibration, vocabulary counts, recovery data) and
    the teacher itself (the first stage's output, or the input model) for distillation. Paths only: the corpus is
    built by `ensure_corpus` once every stage has been checked."""
    from pretrain.teacher import DEFAULT_CACHE

    cache_dir = Path(recipe.cache_dir) if recipe.cache_dir else DEFAULT_CACHE
    context = Context(run_dir=run_dir, cache_dir=cache_dir, min_free_disk_gb=recipe.min_free_disk_gb)
    first, teacher = teacher_stage_config(recipe)
    if teacher is not None:
        context.corpus_dir = (Path(teacher.corpus_dir) if teacher.corpus_dir is not None
                              else cache_dir / "corpus" / f"corpus-{teacher.corpus.fingerprint()}")
        context.teacher_dir = run_dir / first.name
    else:
        context.teacher_dir = Path(recipe.model) if recipe.model else None
    return context


def ensure_corpus(recipe: RecipeConfig, context: Context) -> None:
    """Build the embedded corpus in the cache if the recipe's teacher trains on it and it is not there yet."""
    from pretrain.corpus import load_or_build_corpus

    _, teacher = teacher_stage_config(recipe)
    if teacher is not None and teacher.corpus_dir is None:
        load_or_build_corpus(teacher.corpus, context.cache_dir / "corpus")


if __name__ == "__main__":
    main()
