"""The stage kinds a recipe strings together: the registered kinds of the commands, plus what a recipe knows.

Every kind is the one its command runs (core/kind.py: config dataclass, `prepare` that writes nothing, `run`); a
recipe only fills in what a standalone command would be told: the calibration corpus, the training corpus, the
teacher for distillation, the run's cache. `align` is the one recipe-only kind: preference rows from the run's
corpus in the model's own tokens (as `python -m align.build_data`), then LOGO on them (as `python -m align.logo`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

# importing a command's module registers its kind
import align.build_data as build_data
import align.logo as logo
import compress.layer  # noqa: F401
import compress.neuron  # noqa: F401
import compress.vocab  # noqa: F401
import pretrain.continual  # noqa: F401
import pretrain.teacher  # noqa: F401
from align.data import PreferenceDataConfig
from core.errors import UserError
from core.kind import Input, StageKind, get_kind, register_kind


@dataclasses.dataclass
class Context:
    """What every stage of one recipe run shares."""

    run_dir: Path
    cache_dir: Path
    corpus_dir: Path | None = None  # the offline corpus saved with save_to_disk (calibration and counting)
    teacher_dir: Path | None = None  # the unpruned model, for distillation
    min_free_disk_gb: float = 1.0


@dataclasses.dataclass(frozen=True)
class RecipeKind:
    """A registered kind as a recipe runs it."""

    kind: StageKind
    defaults: Callable[[dict[str, Any], Context], dict[str, Any]] = lambda args, context: args
    """The stage's args with what the recipe knows filled in (before the config is built)."""
    inputs: Callable[[Any, Context], dict[str, Path | None]] = lambda config, context: {}
    """Inputs other than the checkpoint the stage reads (a teacher, a cache)."""
    shares_work: bool = False
    """Every process of a launched job runs it (training); otherwise the first process alone does."""


def _with_calibration(args: dict[str, Any], context: Context) -> dict[str, Any]:
    if args.get("calib") is None and args.get("scores") is None and context.corpus_dir is not None:
        return {**args, "calib": str(context.corpus_dir)}
    return args


def _with_corpus(args: dict[str, Any], context: Context) -> dict[str, Any]:
    if args.get("corpus") is None and args.get("counts") is None and context.corpus_dir is not None:
        return {**args, "corpus": str(context.corpus_dir)}
    return args


def _with_training_corpus(args: dict[str, Any], context: Context) -> dict[str, Any]:
    data = dict(args.get("data") or {})
    if not data.get("paths") and context.corpus_dir is not None:
        return {**args, "data": {**data, "paths": [str(context.corpus_dir)]}}
    return args


def _with_distillation_teacher(args: dict[str, Any], context: Context) -> dict[str, Any]:
    """Distillation reads the recipe's teacher (its first stage's output, or the input model) unless args name one."""
    args = _with_training_corpus(args, context)
    if args.get("distill") is None or args.get("teacher") is not None or context.teacher_dir is None:
        return args  # without a teacher anywhere, the kind's own check names what is missing
    return {**args, "teacher": str(context.teacher_dir)}


def _teacher_input(config, context: Context) -> dict[str, Path | None]:
    return {"teacher": Path(config.teacher) if config.teacher else None}


@dataclasses.dataclass
class AlignStageConfig:
    """LOGO as a recipe stage: preference rows built from the run's corpus in the model's own tokens (`data`, as
    `python -m align.build_data`), then LOGO training on them (`logo`, as `python -m align.logo`)."""

    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    logo: logo.LogoConfig = dataclasses.field(default_factory=logo.LogoConfig)

    def __post_init__(self):
        if self.data.own_mistakes and self.data.mistake_window != self.logo.position.window:
            raise UserError(f"data.mistake_window ({self.data.mistake_window}) must be the window LOGO trains for "
                            f"(logo.position.window = {self.logo.position.window})")


@dataclasses.dataclass
class PreparedAlign:
    config: AlignStageConfig
    model_dir: Path
    build: build_data.BuildDataConfig


def prepare_align(config: AlignStageConfig, inputs: dict[str, Path | None], progress: bool = True) -> PreparedAlign:
    """Checks that need no rows: the tokenizer fits the chunk sizes, the model and the attention LOGO needs. The
    rows' own checks run when they are built (on the first process: a generator may sample them)."""
    from core.checkpoint import load_tokenizer, read_model_config

    model_dir = inputs["model"]
    read_model_config(model_dir)
    from align.data import check_build

    check_build(config.data, load_tokenizer(model_dir))
    if config.data.qa:  # a bad QA file is one line before the stage's directory exists, not after
        from align.qa import read_qa

        read_qa(config.data)
    logo.resolve_attention(config.logo, model_dir)
    corpus = inputs.get("corpus")
    build = build_data.BuildDataConfig(
        tokenizer=str(model_dir), generator=str(model_dir) if config.data.needs_generator else None,
        corpus_dir=str(corpus) if corpus else None, cache_dir=str(inputs["cache"]) if inputs.get("cache") else None,
        data=config.data)
    return PreparedAlign(config, model_dir, build)


def run_align(prepared: PreparedAlign, work_dir: Path) -> dict[str, Any]:
    """Rows once (the first process under a launcher; a resumed stage keeps the rows it built), then LOGO on every
    process."""
    from recipes.first_process import on_first_process

    data_dir = work_dir / "preference_data"

    def build_rows() -> dict[str, Any]:
        if (data_dir / "provenance.json").is_file():
            return {}
        return {"preference_data": build_data.write_rows(build_data.prepare(prepared.build), data_dir)}

    metrics = on_first_process(build_rows)
    config = dataclasses.replace(prepared.config.logo, data=str(data_dir))
    trained = logo.train_logo(logo.prepare_stage(config, {"model": prepared.model_dir}), work_dir)
    return {**metrics, **trained}


ALIGN = register_kind(StageKind(
    name="align",
    stage="align",
    module="recipes.openba_v2",
    config_cls=AlignStageConfig,
    prepare=prepare_align,
    run=run_align,
    description="LOGO preference rows from the run's corpus, then LOGO training (a recipe stage).",
    inputs=(Input("model", "checkpoint to align"),
            Input("corpus", "corpus the rows come from", required=False, is_checkpoint=False),
            Input("cache", "corpus cache", required=False, is_checkpoint=False)),
    resumable=True,
))

RECIPE_KINDS: dict[str, RecipeKind] = {
    "teacher": RecipeKind(get_kind("teacher"), inputs=lambda config, context: {"cache_dir": context.cache_dir},
                          shares_work=True),
    "layer_prune": RecipeKind(get_kind("layer_prune"), defaults=_with_calibration),
    "neuron_prune": RecipeKind(get_kind("neuron_prune"), defaults=_with_calibration),
    "vocab_prune": RecipeKind(get_kind("vocab_prune"), defaults=_with_corpus),
    "train": RecipeKind(get_kind("train"), defaults=_with_distillation_teacher, inputs=_teacher_input,
                        shares_work=True),
    "align": RecipeKind(ALIGN, shares_work=True, inputs=lambda config, context: {
        "corpus": context.corpus_dir, "cache": context.cache_dir / "corpus"}),
}


def recipe_kind(name: str) -> RecipeKind:
    if name not in RECIPE_KINDS:
        import difflib

        close = difflib.get_close_matches(name, list(RECIPE_KINDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown stage kind '{name}' ({hint}kinds: {', '.join(RECIPE_KINDS)})")
    return RECIPE_KINDS[name]


def resolve_config(name: str, args: dict[str, Any], context: Context, prefix: str):
    """A stage's config, built once from its args and what the recipe knows."""
    from core.config import from_dict

    kind = recipe_kind(name)
    return from_dict(kind.kind.config_cls, kind.defaults(dict(args), context), prefix=prefix)
