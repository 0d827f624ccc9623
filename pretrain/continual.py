"""Continual pretraining of a checkpoint: the recovery stage after each pruning step, and long-context extension.

    python -m pretrain.continual --model runs/s1 --out runs/s1_recovered
    python -m pretrain.continual --model runs/s4 --out runs/s5 --set objective=mix --set train.steps=2000
    python -m pretrain.continual --model runs/s1 --out runs/r1 --teacher runs/teacher --set distill.kd_weight=0.5
    python -m pretrain.continual --model my-llama-pruned --out runs/r --set objective=causal --set data.paths=[DIR]
    python -m pretrain.continual --model my-llama-pruned --out runs/r --set objective=ul2 --set add_sentinels=true

OpenBA-V2 recovers each pruning step with UL2 denoising (D-UL2 in stages S1-S4: proportions re-weighted by
per-denoiser validation loss; O-UL2 mix-denoising in S5). Distillation from the unpruned teacher is our addition (a
recovery objective the paper did not use), and so is the long-context option (ProLong: RoPE base, longer training
sequences). Stock checkpoints (Llama, Qwen2, Mistral, GPT-NeoX, T5) train with their own tokenizer: causal and
prefix LM need no special tokens, UL2 adds its sentinels and mode tokens when asked (`add_sentinels`). A
vocabulary-pruned student distils from its unpruned teacher through a student -> teacher id map read from the two
tokenizers. The same stage with `init: scratch` trains a freshly initialised model of the checkpoint's shape: the
"same size, same tokens, from scratch" baseline that recovery must beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from core.cli import command
from core.errors import UserError
from core.kind import Input, StageKind, register_kind
from core.launch import launch
from pretrain.data import DataConfig, load_documents, load_text_dataset
from pretrain.long_context import LongContextConfig, apply_long_context
from pretrain.objectives import (
    CausalLM,
    DistillationConfig,
    DistillationLoss,
    DynamicUL2,
    DynamicUL2Config,
    ObjectiveBatches,
    ObjectiveMixture,
    PrefixLM,
    SpecialIds,
    batches_per_objective,
    mix_denoising_mixture,
    per_objective_validation_loss,
    student_to_teacher_ids,
    token_mean_loss,
    ul2_mixture,
)
from pretrain.objectives.distillation import output_vocab_size
from pretrain.objectives.losses import reads_segment_ids
from pretrain.trainer import TrainConfig, Trainer


@dataclasses.dataclass
class RecoveryTrainConfig(TrainConfig):
    """TrainConfig with V2's recovery schedule (cosine 1e-4 -> 5e-5, Adam (0.9, 0.95), wd 0.1, clip 1.0)."""

    steps: int = 200
    micro_batch_size: int = 8
    save_every: int = 50
    keep_checkpoints: int = 1
    eval_every: int = 50


@dataclasses.dataclass
class ContinualConfig:
    objective: Literal["ul2", "mix", "causal", "prefix"] = "ul2"
    """"ul2": the seven OpenBA denoisers (V2 S1-S4); "mix": O-UL2 mix-denoising (V2 S5); "causal" / "prefix":
    language modelling (decoder-only families, ProLong-style long-context training)."""
    dynamic_ul2: bool = True
    """Re-weight the UL2 denoisers by validation loss at every evaluation (D-UL2, V2 S1-S4)."""
    dul2: DynamicUL2Config = dataclasses.field(default_factory=DynamicUL2Config)
    """D-UL2 targets, initial proportions, eta and smoothing (OpenBA-V2 code defaults)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training text (default: the embedded stdlib corpus); ProLong-style mixtures via data.source_weights."""
    validation_split: str = "validation"
    """Split of the same data used for validation losses (never trained on)."""
    validation_batches: int = 2
    """Fixed validation batches per objective."""
    input_length: int = 570
    """Encoder tokens per row (decoder-only: inputs + targets). V2 S1-S4: 570."""
    target_length: int = 380
    """Decoder tokens per row (encoder-decoder only). V2 S1-S4: 380."""
    packed: bool = True
    """Pack several examples per row with document-aware masks (no cross-example attention, positions restart).
    Encoder-decoders need segment-id masks (OpenBA); transformers' T5 has none and needs packed: false."""
    init: Literal["checkpoint", "scratch"] = "checkpoint"
    """"scratch" re-initialises the weights (same shape and tokenizer): the from-scratch baseline."""
    add_sentinels: bool = False
    """UL2 objectives ("ul2", "mix") on a tokenizer without UL2 tokens (a stock Llama, Qwen2, Mistral, GPT-NeoX
    tokenizer; T5's lacks only <R>/<S>/<X>): add the missing sentinels <extra_id_N> and mode tokens as special
    tokens, each with an embedding and LM-head row (padding rows first, then the matrices grow) set to the mean of
    the existing tokens' rows; the manifest's `added_tokens` says what was added. Off: such a tokenizer is refused
    before training. Causal and prefix LM need no special tokens."""
    sentinels: int = 100
    """Sentinels `add_sentinels` adds to a tokenizer that has none (T5/UL2: 100; spans per example are capped by it)."""
    teacher: str | None = None
    """Teacher checkpoint for distillation (the recipe fills in the unpruned model when `distill` is set)."""
    distill: DistillationConfig | None = None
    """Distill the teacher's logits (KL with temperature) mixed with the hard-label loss; None: no distillation."""
    long_context: LongContextConfig = dataclasses.field(default_factory=LongContextConfig)
    """RoPE base / interpolation changes applied before training (ProLong: base 8e6 at 64K)."""
    train: RecoveryTrainConfig = dataclasses.field(default_factory=RecoveryTrainConfig)
    """Trainer settings (steps, learning rate, batch size, DeepSpeed, checkpoints for resume)."""
    seed: int = 0
    """Seeds the batch sampler (plus the process rank under a launcher) and a scratch initialisation."""


UL2_OBJECTIVES = ("ul2", "mix")


def build_mixture(config: ContinualConfig, tokenizer) -> ObjectiveMixture:
    """The objectives to sample; only the UL2 ones look up sentinels and mode tokens."""
    if config.objective == "causal":
        return ObjectiveMixture([CausalLM()])
    if config.objective == "prefix":
        return ObjectiveMixture([PrefixLM(eos=tokenizer.eos_token_id)])
    ids = SpecialIds.from_tokenizer(tokenizer)
    if config.objective == "ul2":
        return ul2_mixture(ids, config.dul2.initial_proportions)
    return mix_denoising_mixture(ids)


def check_special_tokens(config: ContinualConfig, tokenizer) -> list[str]:
    """The UL2 tokens this run will add to the tokenizer (none for causal / prefix LM); UserError when the objective
    needs tokens the tokenizer lacks and `add_sentinels` is off."""
    from pretrain.tokenizer import missing_ul2_tokens

    if config.objective not in UL2_OBJECTIVES:
        return []
    missing = missing_ul2_tokens(tokenizer, config.sentinels)
    if missing and not config.add_sentinels:
        shown = ", ".join(missing) if len(missing) <= 3 else f"{missing[0]} ... {missing[-1]}"
        raise UserError(f"objective {config.objective} needs UL2 sentinels and mode tokens the tokenizer lacks "
                        f"({len(missing)}: {shown}); add them with --set add_sentinels=true (mean-initialised "
                        f"embedding rows) or train with --set objective=causal (or prefix)")
    return missing


def add_special_tokens(model, tokenizer, config: ContinualConfig) -> dict[str, Any] | None:
    """Add the UL2 tokens the objective needs (`check_special_tokens`) to the tokenizer and give each a row in the
    input embedding and the LM head (and its bias) equal to the mean of the existing tokens' rows: a new token starts
    as an average token instead of a random one. Padding rows beyond the tokenizer are reused before the matrices
    grow. Returns what was added, for the manifest; None when nothing was."""
    from pretrain.tokenizer import add_ul2_tokens

    if not check_special_tokens(config, tokenizer):
        return None
    existing = len(tokenizer)
    added = add_ul2_tokens(tokenizer, config.sentinels)
    ids = tokenizer.convert_tokens_to_ids(added)
    rows_before = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows_before:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        new = torch.tensor(ids)
        matrices = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not matrices[0]:
            matrices.append(head.weight)
        if head is not None and getattr(head, "bias", None) is not None:
            matrices.append(head.bias)
        for matrix in matrices:
            matrix[new] = matrix[:existing].mean(0).to(matrix.dtype)
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.suppress_tokens:  # padding rows a vocabulary pruner suppressed
        generation.suppress_tokens = [t for t in generation.suppress_tokens if t not in set(ids)] or None
    return {"tokens": added, "ids": [min(ids), max(ids)], "rows_before": rows_before,
            "rows_after": model.get_input_embeddings().num_embeddings, "init": "mean of the existing tokens' rows"}


def process_shard(config: DataConfig):
    """This process's share of the training documents under torchrun/deepspeed (RANK, WORLD_SIZE), or None when
    there is one process: the trainer expects every process to pass its own shard, not the same batches."""
    process = launch()
    if not process.distributed:
        return None
    from datasets.distributed import split_dataset_by_node

    from pretrain.corpus import build_corpus

    dataset = (load_text_dataset(config.paths, config.split, config.streaming) if config.paths
               else build_corpus()[config.split])
    return split_dataset_by_node(dataset, rank=process.rank, world_size=process.world_size)


def load_student(input_dir: Path, config: ContinualConfig):
    from core.checkpoint import load_model, load_tokenizer

    model = load_model(input_dir)  # refuses truncated weights and weights that disagree with config.json
    tokenizer = load_tokenizer(input_dir)
    if config.init == "scratch":
        torch.manual_seed(config.seed)
        model = type(model)(model.config)  # same shape and config, fresh initialisation
    return model, tokenizer


@dataclasses.dataclass
class PreparedTraining:
    """Everything the stage trains with, loaded and checked before the stage directory exists."""

    config: ContinualConfig
    model: Any
    tokenizer: Any
    mixture: ObjectiveMixture
    data: ObjectiveBatches
    trainer: Trainer
    added_tokens: dict[str, Any] | None
    long_context: dict[str, Any]


def load_teacher(config: ContinualConfig, student, tokenizer) -> DistillationLoss | None:
    """The distillation loss with its teacher loaded and its student -> teacher id map built (None: no distillation)."""
    from core.checkpoint import load_model, load_tokenizer

    if config.distill is None:
        return None
    teacher = load_model(config.teacher)
    student_to_teacher = student_to_teacher_ids(tokenizer, load_tokenizer(config.teacher),
                                                output_vocab_size(student), output_vocab_size(teacher))
    return DistillationLoss(teacher, config.distill, student=student, student_to_teacher=student_to_teacher)


def validation_fn(config: ContinualConfig, mixture: ObjectiveMixture, validation) -> Callable:
    """eval_fn: per-objective validation losses (D-UL2 re-weights the mixture from them) and their mean."""
    if config.objective == "ul2" and config.dynamic_ul2:
        eval_fn = DynamicUL2(mixture, validation, config.dul2)
    else:
        def eval_fn(m, step):
            return {f"val_loss/{k}": v for k, v in per_objective_validation_loss(m, validation).items()}

    def evaluate(m, step):
        metrics = eval_fn(m, step)
        losses = [v for k, v in metrics.items() if k.startswith("val_loss/")]
        return {**metrics, "val_loss": sum(losses) / len(losses)}

    return evaluate


def prepare(config: ContinualConfig, inputs: dict[str, Path], progress: bool = True) -> PreparedTraining:
    """Load and check the student, its tokenizer (UL2 tokens), the training and validation data and the teacher;
    build the trainer and run its preflight checks. Writes nothing: every error comes before the stage directory."""
    from core.checkpoint import check_weights, is_encoder_decoder, load_tokenizer, read_model_config

    model_dir = Path(inputs["model"])
    read_model_config(model_dir)  # the cheap checks first: config, tokenizer, teacher, then the weights
    check_special_tokens(config, load_tokenizer(model_dir))
    if config.distill is not None:
        if config.teacher is None:
            raise UserError("distill is set but no teacher checkpoint is given (--teacher DIR or teacher: DIR)")
        read_model_config(config.teacher)
        check_weights(config.teacher)
    if config.data.paths:  # paths, file kinds and splits, read lazily: a 15B model is not loaded to find a typo
        for split in (config.data.split, config.validation_split):
            load_text_dataset(config.data.paths, split, streaming=True)
    model, tokenizer = load_student(model_dir, config)
    added_tokens = add_special_tokens(model, tokenizer, config)
    encoder_decoder = is_encoder_decoder(model)
    if encoder_decoder and config.packed and not reads_segment_ids(model):
        raise UserError(f"{type(model).__name__} cannot train on packed rows (it has no segment-id masks for "
                        f"cross-attention): set packed: false")
    long_context = apply_long_context(model, config.long_context) if config.long_context != LongContextConfig() else {}
    mixture = build_mixture(config, tokenizer)
    options = dict(input_length=config.input_length, target_length=config.target_length if encoder_decoder else None,
                   encoder_decoder=encoder_decoder, packed=config.packed, pad_id=tokenizer.pad_token_id or 0,
                   decoder_start_id=getattr(model.config, "decoder_start_token_id", None) or 0)
    documents = load_documents(config.data, tokenizer, dataset=process_shard(config.data))
    data = ObjectiveBatches(documents, mixture, batch_size=config.train.micro_batch_size,
                            seed=config.seed + launch().rank, **options)
    validation_docs = load_documents(dataclasses.replace(config.data, split=config.validation_split, shuffle=False,
                                                         streaming=False), tokenizer, repeat=True)
    validation_tokens = [next(validation_docs) for _ in range(64)]
    validation = batches_per_objective(validation_tokens, mixture, config.validation_batches,
                                       batch_size=config.train.micro_batch_size, seed=config.seed + 1, **options)
    distillation = load_teacher(config, model, tokenizer)
    # token_mean_loss passes use_cache=False: a KV cache would switch off transformers' packed-row masks
    trainer = Trainer(model, config.train, data, loss_fn=token_mean_loss if distillation is None else distillation,
                      eval_fn=validation_fn(config, mixture, validation))
    trainer.preflight()
    return PreparedTraining(config, model, tokenizer, mixture, data, trainer, added_tokens, long_context)


def train(prepared: PreparedTraining, work_dir: Path) -> dict[str, Any]:
    """Train (resuming from `work_dir/checkpoints`), save the checkpoint into `work_dir`, return the metrics."""
    from core.checkpoint import write_checkpoint

    config, trainer = prepared.config, prepared.trainer
    result = trainer.train(work_dir)
    with trainer.engine.gathered():  # ZeRO-3 shards the weights across processes: whole again inside
        if trainer.runtime.is_main:  # one writer under a launcher; run_stage publishes after every rank is done
            trainer.restore_checkpoint_dtype()
            write_checkpoint(prepared.model, prepared.tokenizer, work_dir)
            shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # resume-only optimizer states
    return {
        "val_loss": result.get("eval/val_loss"),
        "per_objective": {k[len("eval/val_loss/"):]: v for k, v in result.items() if k.startswith("eval/val_loss/")},
        "mixture_weights": dict(zip(prepared.mixture.names, prepared.mixture.weights)),
        "train_loss": result.get("loss"),
        "steps": result.get("step"),
        "train_tokens_seen": result.get("tokens"),
        "train_seconds": result.get("seconds"),
        "padding_share": 1 - prepared.data.stats["tokens"] / max(prepared.data.stats["slots"], 1),
        "init": config.init,
        "distilled_from": config.teacher if config.distill is not None else None,
        "long_context": prepared.long_context,
        "added_tokens": prepared.added_tokens,
    }


def continual_stage(input_dir: Path, work_dir: Path, config: ContinualConfig) -> dict[str, Any]:
    """Prepare and train in one call, into an existing `work_dir` (no stage contract: tests and callers that hold
    their own stage directory)."""
    return train(prepare(config, {"model": Path(input_dir)}), Path(work_dir))


def summary(manifest) -> str:
    from core.table import format_table, human_count

    metrics = manifest.metrics
    rows = [("validation loss", metrics["val_loss"]), ("final train loss", metrics["train_loss"]),
            ("steps", metrics["steps"]), ("tokens", human_count(metrics["train_tokens_seen"] or 0)),
            ("seconds", metrics["train_seconds"]), ("padding share", metrics["padding_share"]),
            ("parameters", human_count(manifest.parameters.get("after") or 0))]
    rows += [(f"val loss {k}", v) for k, v in sorted(metrics["per_objective"].items())]
    return format_table(rows, ["metric", "value"])


def _teacher_value(args: argparse.Namespace) -> dict[str, Any]:
    """--teacher DIR names the teacher and turns distillation on (with its defaults unless the config sets them)."""
    return {"teacher": args.teacher, "distill": {}} if args.teacher else {}


DESCRIPTION, EXAMPLES = __doc__.split("\n\n")[0], tuple(
    line.strip() for line in __doc__.split("\n\n")[1].splitlines() if line.strip())

KIND = register_kind(StageKind(
    name="train",
    stage="continual",
    module="pretrain.continual",
    config_cls=ContinualConfig,
    prepare=prepare,
    run=train,
    description=DESCRIPTION,
    examples=EXAMPLES,
    inputs=(Input("model", "checkpoint to train (safetensors + tokenizer)"),
            Input("teacher", "teacher checkpoint for distillation (turns distill on with its defaults)",
                  required=False, is_checkpoint=False)),
    summary=summary,
    resumable=True,
    flag_values=_teacher_value,
))
main = command(KIND)


if __name__ == "__main__":
    main()
