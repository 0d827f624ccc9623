"""Stage kinds: the steps a recipe strings together, each the same function its own command line runs.

A kind pairs a config dataclass (the recipe's `args` are checked against it) with a stage function
`run(input_dir, work_dir, config, context) -> metrics` that writes a checkpoint into `work_dir`. Nothing here
re-implements a step; it only fills in what a recipe knows and a standalone command would be told: the calibration
corpus, the teacher for distillation, the run's cache.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from typing import Any, Callable

from align.data import PreferenceDataConfig
from align.logo import LogoConfig
from core.errors import UserError


@dataclasses.dataclass
class Context:
    """What every stage of one recipe run shares."""

    run_dir: Path
    cache_dir: Path
    corpus_dir: Path | None = None  # the offline corpus saved with save_to_disk (calibration and counting)
    teacher_dir: Path | None = None  # the unpruned model, for distillation
    min_free_disk_gb: float = 1.0


@dataclasses.dataclass
class Kind:
    config_cls: type
    run: Callable[[Path | None, Path, Any, Context], dict[str, Any]]
    resumable: bool = False
    defaults: Callable[[dict[str, Any], Context], dict[str, Any]] = lambda args, context: args


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


def _copy_checkpoint(source: Path, work_dir: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and item.name != "manifest.json":
            shutil.copy2(item, work_dir / item.name)


def run_teacher(input_dir, work_dir, config, context):
    from pretrain.teacher import ensure_teacher, teacher_dir

    cached = ensure_teacher(config, context.cache_dir)
    _copy_checkpoint(cached, work_dir)
    from core.stage import Manifest

    return {"cached_at": str(teacher_dir(config, context.cache_dir)), **Manifest.read(cached).metrics}


def run_layer_prune(input_dir, work_dir, config, context):
    from compress.layer import layer_prune_stage

    return layer_prune_stage(input_dir, work_dir, config)


def run_neuron_prune(input_dir, work_dir, config, context):
    from compress.neuron import neuron_prune_stage

    return neuron_prune_stage(input_dir, work_dir, config)


def run_vocab_prune(input_dir, work_dir, config, context):
    from compress.vocab import prepare, write_pruned

    return write_pruned(prepare(input_dir, config), work_dir, config)


def run_train(input_dir, work_dir, config, context):
    from pretrain.continual import continual_stage

    if config.distill is not None and config.teacher is None:
        if context.teacher_dir is None:
            raise UserError("distillation needs a teacher: set args.teacher or start the recipe from a teacher stage")
        config = dataclasses.replace(config, teacher=str(context.teacher_dir))
    return continual_stage(input_dir, work_dir, config)


@dataclasses.dataclass
class AlignStageConfig:
    """LOGO as a recipe stage: preference rows built from the run's corpus in the model's own tokens (`data`, as
    `python -m align.build_data`), then LOGO training on them (`logo`, as `python -m align.logo`)."""

    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    logo: LogoConfig = dataclasses.field(default_factory=LogoConfig)

    def __post_init__(self):
        if self.data.own_mistakes and self.data.mistake_window != self.logo.position.window:
            raise UserError(f"data.mistake_window ({self.data.mistake_window}) must be the window LOGO trains for "
                            f"(logo.position.window = {self.logo.position.window})")


def run_align(input_dir, work_dir, config, context):
    from align.build_data import BuildDataConfig, describe, load_texts
    from align.data import build_preference_rows, check_build, save_rows
    from align.logo import prepare, resolve_attention, train_logo
    from core.checkpoint import load_model, load_tokenizer
    from recipes.first_process import on_first_process

    data_dir = work_dir / "preference_data"

    def build_rows() -> dict[str, Any]:  # once, by the first process under a launcher; then every process trains
        if (data_dir / "provenance.json").is_file():  # a resumed stage keeps the rows it already built
            return {}
        tokenizer = load_tokenizer(input_dir)
        check_build(config.data, tokenizer)
        build = BuildDataConfig(tokenizer=str(input_dir), corpus_dir=str(context.corpus_dir) if context.corpus_dir
                                else None, cache_dir=str(context.cache_dir / "corpus"), data=config.data)
        texts, doc_ids = load_texts(build)
        # LOGO samples responses with the model being aligned; "rule" responses need no model (the CPU default)
        generator = load_model(input_dir).eval() if config.data.needs_generator else None
        rows, reasons = build_preference_rows(config.data, texts, doc_ids, tokenizer, generator)
        shutil.rmtree(data_dir, ignore_errors=True)
        save_rows(rows, data_dir, {"config": dataclasses.asdict(config.data),
                                   "generator": str(input_dir) if generator is not None else "rule",
                                   "corpus_split": "train", "tokenizer": str(input_dir)})
        return {"preference_data": describe(rows, reasons, tokenizer)}

    metrics = on_first_process(build_rows)
    logo = resolve_attention(dataclasses.replace(config.logo, data=str(data_dir)), input_dir)
    metrics.update(train_logo(prepare(input_dir, logo), work_dir, logo))
    return metrics


@functools.lru_cache(maxsize=None)
def _kinds() -> dict[str, Kind]:
    from compress.layer import LayerPruneConfig
    from compress.neuron import NeuronPruneConfig
    from compress.vocab import VocabConfig
    from pretrain.teacher import TeacherConfig

    kinds = {
        "teacher": Kind(TeacherConfig, run_teacher),
        "layer_prune": Kind(LayerPruneConfig, run_layer_prune, defaults=_with_calibration),
        "neuron_prune": Kind(NeuronPruneConfig, run_neuron_prune, defaults=_with_calibration),
        "vocab_prune": Kind(VocabConfig, run_vocab_prune, defaults=_with_corpus),
    }
    from pretrain.continual import ContinualConfig

    kinds["train"] = Kind(ContinualConfig, run_train, resumable=True, defaults=_with_training_corpus)
    kinds["align"] = Kind(AlignStageConfig, run_align, resumable=True)
    return kinds


def get_kind(name: str) -> Kind:
    kinds = _kinds()
    if name not in kinds:
        raise UserError(f"unknown stage kind '{name}' (kinds: {', '.join(kinds)})")
    return kinds[name]
