"""LOGO training as a stage: preference data + a checkpoint -> an aligned checkpoint, through the shared Trainer.

    python -m align.logo --model runs/teacher --data runs/logo-data --out runs/logo
    python -m align.logo --model runs/teacher --data my_prefs.jsonl --out runs/logo --set loss.num_rejected=1

`--data` is LOGO's rows (python -m align.build_data: `chunks`, `question`, `responses`) or preference rows in TRL's
layout (`prompt`, `chosen`, `rejected`; `rejected` one answer or a list; text, or TRL's conversational lists of
{role, content} messages rendered with the tokenizer's chat template), as a save_to_disk folder (a DatasetDict's
train split) or JSONL: the columns tell which. A TRL prompt is cut into `position.chunk_size` chunks, its last chunk
the question next to the responses; chosen is the preferred response and the first M (`loss.num_rejected`; LOGO's
presets: 2) rejected answers the dis-preferred ones, a row with fewer is refused by name (align/trl_rows.py).

What happens, in order (every check before anything is written):
1. load the model and tokenizer, the preference rows (align/data.py format, or mapped from TRL's), tokenize and
   check every row (context fits `position.max_chunks` x `position.chunk_size`, responses fit, everything fits the
   window);
2. extend the model to the synthesised window: its supported length becomes `position.window`, and its RoPE base
   `position.rope_theta` when set (`pretrain.long_context`; LOGO changes no base);
3. optionally wrap the model in LoRA (peft; LOGO: r 32, alpha 16, dropout 0 on the attention projections, which the
   model family's adapter names: q/k/v/o for Llama, qkv/o/q/kv for OpenBA);
4. train with `pretrain.trainer.Trainer` and `align.objective.PreferenceObjective` as its loss (DeepSpeed, exact
   resume from checkpoints kept in the stage's partial directory, progress bar, metrics.jsonl), optionally with a
   plain-text language-modelling term beside it (`text`: not LOGO's, off by default);
5. merge LoRA into the weights and save a plain safetensors checkpoint (loadable with `from_pretrained`); the
   unmerged adapter is saved beside it in `lora_adapter/`. The output has a manifest (`core.stage.run_stage`).

Decoder-only models with the shared context need a dense 4D mask, so `train.attn_implementation: auto` runs sdpa
for them (flash-attention cannot take the mask).

The command is the stage kind `logo`: `prepare_stage` does steps 1-3, `train_logo` steps 4-5 in the stage directory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

from core.cli import command
from core.errors import UserError
from core.kind import Input, StageKind, execute, register_kind
from core.launch import launch
from core.table import format_table, human_count
from align.batches import BatchConfig, PreferenceBatches, WithTextBatches
from align.losses import LOGO_PRESETS, LossConfig
from align.positions import PositionConfig
from pretrain.trainer import TrainConfig, unwrap


@dataclasses.dataclass
class LogoTrainConfig(TrainConfig):
    """The shared trainer's config with LOGO's optimisation as defaults (a subclass, so that overriding one field
    from YAML or --set keeps LOGO's values for the others): lr 5e-7 cosine (to 0) with 120 warm-up steps over
    1200 steps, 64 samples per step (8 GPUs x 8 accumulation steps there; here 64 accumulation steps of one row),
    weight decay 0.05. LOGO trains LoRA adapters at this rate; full fine-tuning of a small model wants more."""

    steps: int = 1200
    lr: float = 5e-7
    min_lr: float = 0.0
    warmup_steps: int = 120
    weight_decay: float = 0.05
    grad_accum_steps: int = 64
    micro_batch_size: int = 1
    save_every: int = 100


@dataclasses.dataclass
class LoraSettings:
    """LoRA through peft (LOGO trains LoRA adapters: r 32, alpha 16, dropout 0 on q/k/v/o)."""

    enabled: bool = False
    r: int = 32
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    """Module names (suffixes) to adapt; None: every attention projection the family adapter lists."""


@dataclasses.dataclass
class TextRegulariser:
    """Plain-text language modelling added to every step: `weight` x the token-mean NLL of a batch of text rows.
    Not part of LOGO (its only regulariser is the NLL of the preferred response); InstructGPT's pretraining-mix
    term. For a model that must keep modelling text the preference rows never show, e.g. an instructed model whose
    text perplexity the alignment would otherwise be free to drift. Off by default."""

    data: str = ""
    """Rows in align.data format: the first response is the text to model, the context chunks its prompt (plain
    positions, never synthesised): align/text_rows.py cuts them from a corpus (`python -m recipes.logo_evidence`)."""
    weight: float = 0.0
    batch_size: int = 8
    """Text rows per micro-batch, drawn in a seeded order of their own that cycles."""

    def __post_init__(self):
        if self.weight < 0 or self.batch_size < 1:
            raise UserError(f"text.weight must be >= 0 and text.batch_size >= 1, got {self.weight}, {self.batch_size}")
        if bool(self.data) != bool(self.weight):
            raise UserError("the text regulariser needs both text.data and a positive text.weight (or neither)")


@dataclasses.dataclass
class LogoConfig:
    """Everything the LOGO stage does; `python -m align.logo --config FILE --set key=value` fills it."""

    data: str = ""
    """Preference dataset (save_to_disk directory or JSONL) from python -m align.build_data, or TRL-layout rows
    (prompt, chosen, rejected: align/trl_rows.py)."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    position: PositionConfig = dataclasses.field(default_factory=PositionConfig)
    batches: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    train: LogoTrainConfig = dataclasses.field(default_factory=LogoTrainConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    text: TextRegulariser = dataclasses.field(default_factory=TextRegulariser)
    shared_context: bool = True
    """Score all responses on one shared context (packed mask / one encoder pass); false: 1 + M full copies."""
    max_rows: int | None = None
    """Use only the first N rows of the data (smoke runs)."""


@dataclasses.dataclass
class Prepared:
    """What the stage trains, built (and checked) before the stage directory exists."""

    model: Any
    tokenizer: Any
    batches: PreferenceBatches
    text: PreferenceBatches | None
    data: PreferenceBatches | WithTextBatches
    """What the trainer iterates: the preference batches, with the text batches attached when `text` is set."""
    objective: Any
    extended: dict[str, Any]
    trainable: int
    total: int
    config: LogoConfig
    """The config the stage trains with (attention implementation resolved by `prepare_stage`)."""


# ---------------------------------------------------------------------------------------------------- preparation


def lora_targets(model) -> list[str]:
    """Full names of every attention projection (and output projection) the family adapter knows."""
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    targets = []
    for _, _, block in adapter.all_blocks():
        for view in adapter.attentions(block):
            prefix = names[id(view.module)]
            for projection in [p.name for p in view.projections] + [view.o]:
                target = f"{prefix}.{projection}"
                if target not in targets:
                    targets.append(target)
    return targets


def wrap_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or lora_targets(model)
    task = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    try:
        return get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                                target_modules=targets, task_type=task))
    except ValueError as err:
        raise UserError(f"LoRA: {str(err).splitlines()[0]}") from None


def encoder_takes_positions(model) -> bool:
    """Whether the encoder reads position ids: synthesised positions need it (T5's relative buckets do not)."""
    import inspect

    return "position_ids" in inspect.signature(model.get_encoder().forward).parameters


def extend_to_window(model, config: LogoConfig, batches: PreferenceBatches) -> dict[str, Any]:
    """Make the model accept the synthesised positions: supported length -> window, and the RoPE base if set."""
    from pretrain.long_context import LongContextConfig, apply_long_context, supported_lengths

    needed = batches.max_position() + 1
    supported, _ = supported_lengths(model.config)
    if config.position.rope_theta is None and (supported is None or needed <= supported):
        return {}
    return apply_long_context(model, LongContextConfig(rope_theta=config.position.rope_theta,
                                                       train_seq_len=max(needed, supported or 0)))


def prepare(model_dir: str | Path, config: LogoConfig, reference_dir: str | Path | None = None,
            tokenizer_dir: str | Path | None = None) -> Prepared:
    """Load, check and set up everything; raises UserError before any output exists."""
    from align.data import load_rows
    from align.objective import PreferenceObjective
    from align.trl_rows import as_logo_rows
    from core.checkpoint import count_parameters, load_model, load_tokenizer

    if not config.data:
        raise UserError("no preference data given (--data DIR or data: in the config)")
    rows = load_rows(config.data)
    if config.max_rows is not None:
        rows = rows.select(range(min(config.max_rows, len(rows))))
    model = load_model(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    rows = as_logo_rows(rows, tokenizer, config.position.chunk_size)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder and config.position.synthesize and not encoder_takes_positions(model):
        raise UserError(f"{type(model).__name__} takes no encoder position ids (relative position buckets), so "
                        "positions cannot be synthesised for it; set position.synthesize=false")
    process = launch()
    shard = {"rank": process.rank, "world": process.world_size}
    batches = PreferenceBatches(rows, tokenizer, config.position, config.batches, config.loss.responses_used,
                                encoder_decoder, **shard)
    text = None
    if config.text.weight:
        text_position = dataclasses.replace(config.position, synthesize=False)
        text_batches = dataclasses.replace(config.batches, batch_size=config.text.batch_size,
                                           seed=config.batches.seed + 1)
        try:
            text = PreferenceBatches(load_rows(config.text.data), tokenizer, text_position, text_batches, 1,
                                     encoder_decoder, **shard)
        except UserError as err:
            raise UserError(f"text regulariser data: {err}") from None
    data = WithTextBatches(batches, text) if text else batches
    extended = extend_to_window(model, config, data)
    reference = None
    if config.loss.needs_reference:
        if reference_dir is not None:
            reference = load_model(reference_dir)
            extend_to_window(reference, config, batches)
        elif not config.lora.enabled:
            reference = copy.deepcopy(model)
    total = count_parameters(model)
    if config.lora.enabled:
        model = wrap_lora(model, config.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objective = PreferenceObjective(config.loss, config.shared_context, reference, config.text.weight)
    objective.check(model)
    return Prepared(model, tokenizer, batches, text, data, objective, extended, trainable, total, config)


# ---------------------------------------------------------------------------------------------------- the stage


def _save_final(trainer, prepared: Prepared, work_dir: Path, lora: bool) -> None:
    """Merge LoRA (saving the adapter too) and write the checkpoint's files at the top of the stage directory."""
    from core.checkpoint import write_checkpoint

    module = unwrap(trainer.engine.module)
    with trainer.engine.gathered():
        if trainer.runtime.is_main:
            if lora:
                module.save_pretrained(str(work_dir / "lora_adapter"), safe_serialization=True)
                module = module.merge_and_unload()
            trainer.restore_checkpoint_dtype(module)
            write_checkpoint(module, prepared.tokenizer, work_dir)


def train_logo(prepared: Prepared, work_dir: Path, config: LogoConfig | None = None) -> dict[str, Any]:
    """The stage body: train, save, drop the training checkpoints, return the metrics for the manifest."""
    from align.objective import rows
    from pretrain.trainer import CHECKPOINTS, Trainer

    config = config or prepared.config
    trainer = Trainer(prepared.model, config.train, prepared.data, loss_fn=prepared.objective, weight_fn=rows)
    result = trainer.train(work_dir / "train")
    _save_final(trainer, prepared, work_dir, config.lora.enabled)
    shutil.rmtree(work_dir / "train" / CHECKPOINTS, ignore_errors=True)
    return {
        **{k: v for k, v in result.items() if isinstance(v, (int, float, str))},
        "rows": len(prepared.batches.rows),
        "truncated_responses": prepared.batches.truncated,
        "text_rows": len(prepared.text.rows) if prepared.text else 0,
        "trainable_parameters": prepared.trainable,
        "window": config.position.window if config.position.synthesize else None,
        "real_context": config.position.real_context,
        "extended": prepared.extended,
    }


def resolve_attention(config: LogoConfig, model_dir: str | Path) -> LogoConfig:
    """The config with `train.attn_implementation` fixed to what the shared context needs (sdpa for decoder-only)."""
    from core.checkpoint import read_model_config

    if not config.shared_context or read_model_config(model_dir).get("is_encoder_decoder"):
        return config
    if config.train.attn_implementation == "flash_attention_2":
        raise UserError("shared-context packing needs a 4D attention mask, which flash_attention_2 cannot take; "
                        "use train.attn_implementation=sdpa or shared_context=false")
    if config.train.attn_implementation == "auto":
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, attn_implementation="sdpa"))
    return config


def prepare_stage(config: LogoConfig, inputs: dict[str, Path | None], progress: bool = True) -> Prepared:
    """The kind's prepare: the attention implementation the shared context needs, then `prepare` (every check)."""
    model_dir = inputs["model"]
    config = resolve_attention(config, model_dir)
    return prepare(model_dir, config, inputs.get("reference"), inputs.get("tokenizer"))


def summary(manifest) -> str:
    metrics = manifest.metrics
    config = manifest.config
    rows = [
        ("loss", config["loss"]["loss"]),
        ("rows", metrics.get("rows")),
        ("steps", metrics.get("step")),
        ("final loss", metrics.get("loss")),
        ("window (synthesised)", metrics.get("window") or "off"),
        ("real context", metrics.get("real_context")),
        ("trainable / all parameters", f"{human_count(metrics.get('trainable_parameters', 0))} / "
                                       f"{human_count(manifest.parameters.get('after') or 0)}"),
        ("responses truncated", metrics.get("truncated_responses")),
        ("seconds", metrics.get("seconds")),
    ]
    if config["lora"]["enabled"]:
        rows.append(("LoRA", "merged into the weights; the adapter is in lora_adapter/"))
    return format_table(rows, ["", "value"])


class _Settings(argparse.Action):
    """A flag that stands for `--set` overrides. They go before every --set, wherever the flag stands, so an
    explicit --set still wins (`--preset llama3-8b --set loss.beta=3` trains with beta 3)."""

    def __init__(self, option_strings, dest, settings: Callable[[Any], list[str]], **kwargs):
        self.settings = settings
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.set = self.settings(values) + list(getattr(namespace, "set", None) or [])


def _method_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", dest="loss_flag", action=_Settings, choices=["logo", "simpo", "dpo", "orpo", "sft"],
                        settings=lambda name: [f"loss.loss={name}"], help="preference loss (default: logo)")
    parser.add_argument("--preset", action=_Settings, choices=sorted(LOGO_PRESETS),
                        settings=lambda name: [f"loss.{key}={value}" for key, value in LOGO_PRESETS[name].items()],
                        help="LOGO's beta/gamma/lambda/M for this base model (default: llama3-8b's)")
    parser.add_argument("--lora", dest="lora_flag", action=_Settings, nargs=0, settings=lambda _: ["lora.enabled=true"],
                        help="train LoRA adapters (merged into the saved weights)")


KIND = register_kind(StageKind(
    name="logo",
    stage="logo",
    module="align.logo",
    config_cls=LogoConfig,
    prepare=prepare_stage,
    run=train_logo,
    description="LOGO long-context alignment (or a SimPO/DPO/ORPO/SFT baseline) on preference data:\n"
                "rows of align.build_data, or TRL's prompt/chosen/rejected rows (rejected: one answer or a list;\n"
                "conversational rows through the tokenizer's chat template), told apart by their columns.",
    examples=("python -m align.logo --model runs/teacher --data runs/logo-data --out runs/logo --lora "
              "--set train.steps=50 --set train.warmup_steps=5 --set train.grad_accum_steps=4 --set train.lr=1e-4 "
              "--set position.window=4096 --set position.chunk_size=64",
              "python -m align.logo --model runs/teacher --data trl_prefs.jsonl --out runs/logo-trl "
              "--set loss.num_rejected=1 --set position.chunk_size=512",),
    inputs=(Input("model", "checkpoint directory to align"),
            Input("data", "preference data: python -m align.build_data output, or TRL rows (prompt, chosen, "
                  "rejected) as JSONL or a datasets folder; the config's `data`",
                  required=False, is_checkpoint=False),
            Input("reference", "DPO reference checkpoint (default: the model before training: a frozen copy, or the "
                  "same model with LoRA adapters off)", required=False, is_checkpoint=False),
            Input("tokenizer", "tokenizer directory (default: the model's)", required=False, is_checkpoint=False)),
    summary=summary,
    resumable=True,
    flags=_method_flags,
    flag_values=lambda args: {"data": args.data},
))
main = command(KIND)


def run_logo(model_dir: str | Path, out_dir: str | Path, config: LogoConfig, reference_dir: str | Path | None = None,
             tokenizer_dir: str | Path | None = None, force: bool = False, progress: bool = True):
    """The command as a function: prepare (all checks), then train under the stage contract (atomic output,
    manifest, resume). Returns the manifest."""
    inputs = {"model": model_dir, "data": config.data or None, "reference": reference_dir, "tokenizer": tokenizer_dir}
    return execute(KIND, config, inputs, out_dir, force=force, progress=progress)


if __name__ == "__main__":
    main()
