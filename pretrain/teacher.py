"""The tiny teacher: `openba-tiny` trained from scratch on the offline corpus with the UL2 mixture, then cached.

It is the embedded default model that later stages compress, so every test and demo has a model whose weights
mean something without a download. The default config trains in about 3.5 minutes on 2 CPU cores (corpus and
tokenizer included); the result is cached under a directory keyed by the config hash and reused when present.
Training runs as a resumable stage (`core.stage.run_stage`), so a killed run continues from its last checkpoint.
`python -m pretrain.teacher --out DIR` (the stage kind `teacher`) trains or reuses the cached teacher and publishes a copy of it in DIR.

Quality is judged against two unigram baselines, both over many validation batches (`baseline_batches`; measured
on the handful used for the loss, an 8k vocabulary's in-sample entropy comes out ~0.5 nats too low):
- `unigram_entropy`: the entropy of the validation targets' own token distribution, i.e. the loss of the best
  context-free model, one that even knows the validation frequencies. The teacher must land clearly below it.
- `unigram_cross_entropy`: a context-free model fit on training targets (add-1/2 smoothing) scored on validation
  targets: what "learned only token frequencies" would score.

    python -m pretrain.teacher --out runs/teacher
    python -m pretrain.teacher --out runs/t --set train.steps=50 --set model.hidden_size=64   # a quick one
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.cli import command
from core.config import config_hash
from core.errors import UserError
from core.kind import Input, StageKind, register_kind
from core.stage import MANIFEST, Manifest, Stage, check_output_location, is_complete, run_stage
from core.table import format_table, human_count
from pretrain.corpus import CorpusConfig, load_or_build_corpus
from pretrain.tokenizer import TokenizerConfig
from pretrain.trainer import TrainConfig, Trainer

DEFAULT_CACHE = Path(os.environ.get("OPENBA_CACHE", Path.home() / ".cache" / "openba_v2"))


@dataclass
class TeacherTrainConfig(TrainConfig):
    """TrainConfig with defaults for a tiny model from scratch: a higher rate and a warm-up than V2's recovery
    (1e-4, which starts from trained weights), and checkpoints often enough that a kill loses under a minute."""

    steps: int = 600
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 40
    micro_batch_size: int = 8  # small batches, many updates: what a tiny model learns fastest from per FLOP
    save_every: int = 50
    keep_checkpoints: int = 1
    eval_every: int = 150
    log_every: int = 10


@dataclass
class TeacherConfig:
    """What the teacher is and how it is trained. The defaults take ~3.5 minutes on 2 CPU cores."""

    preset: str = "openba-tiny"
    """The OpenBA shape (core.openba presets); the vocabulary always comes from the tokenizer."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of preset fields, e.g. {hidden_size: 64, num_decoder_layers: 2} for a test-sized teacher."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The offline stdlib corpus (code + docstrings); built once and cached."""
    corpus_dir: str | None = None
    """A corpus saved with `datasets` save_to_disk (splits train/validation, column text) instead of the stdlib
    one: for real text, or an easy corpus in tests."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The project tokenizer (SentencePiece unigram with sentinels and <R>/<S>/<X>); trained once and cached."""
    objective_weights: list[float] = field(default_factory=lambda: [0.02, 0.02, 0.8, 0.1, 0.02, 0.02, 0.02])
    """Sampling weights of the 7 UL2 denoisers R-1, R-2, S, X-1, X-2, X-3, X-4 (D-UL2's initial proportions)."""
    input_length: int = 256
    """Encoder tokens per packed row (V2 S1-S4: 570; shorter is faster on CPU and enough for a tiny model)."""
    target_length: int = 128
    """Decoder tokens per packed row (V2 S1-S4: 380). S-denoising (the mixture's bulk) needs ~1/3 of the input."""
    packed: bool = True
    """Pack several examples per row with document-aware masks (~0 padding) instead of one padded example."""
    validation_batches: int = 8
    """Fixed validation batches (drawn once with the same mixture) the validation loss is measured on."""
    baseline_batches: int = 128
    """Batches (validation, and training for the fitted unigram) the unigram baselines count tokens over: cheap,
    no model runs, and enough that the estimate is not biased low by a small sample."""
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    """Trainer settings; micro_batch_size is the number of examples per batch."""
    seed: int = 0
    """Seeds model initialisation and the batch sampler."""


# ---------------------------------------------------------------------------------------------------- data


def _targets(batches) -> torch.Tensor:
    labels = torch.cat([b["labels"].flatten() for b in batches])
    return labels[labels != -100]


def unigram_entropy(batches) -> float:
    """Entropy (nats) of the target tokens' own frequency distribution: the loss of the best context-free model."""
    labels = _targets(batches)
    counts = torch.bincount(labels).double()
    probs = counts[counts > 0] / labels.numel()
    return float(-(probs * probs.log()).sum())


def unigram_cross_entropy(train_batches, eval_batches, vocab_size: int) -> float:
    """Loss (nats) on `eval_batches`' targets of a unigram fit on `train_batches`' targets, add-1/2 smoothed."""
    counts = torch.bincount(_targets(train_batches), minlength=vocab_size).double() + 0.5
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[_targets(eval_batches)].mean())


class ValidationLoss:
    """eval_fn: token-weighted cross-entropy over fixed validation batches, overall and per denoiser."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __call__(self, model, step: int) -> dict[str, float]:
        from pretrain.objectives.losses import on_model_device, token_mean_loss

        sums: dict[str, list[float]] = {}
        for batch in self.batches:
            loss, metrics = token_mean_loss(model, on_model_device(model, batch))
            tokens = metrics["target_tokens"]
            for key in ("all", batch["objective"]):
                entry = sums.setdefault(key, [0.0, 0])
                entry[0] += float(loss) * tokens
                entry[1] += tokens
        metrics = {"val_loss": sums["all"][0] / sums["all"][1]}
        metrics.update({f"val_loss/{k}": s / n for k, (s, n) in sorted(sums.items()) if k != "all"})
        return metrics


# ---------------------------------------------------------------------------------------------------- the stage


def _load_texts(config: TeacherConfig, cache_dir: Path):
    import datasets

    if config.corpus_dir is None:
        return load_or_build_corpus(config.corpus, cache_dir / "corpus")
    path = Path(config.corpus_dir)
    if not (path / "dataset_dict.json").is_file():
        raise UserError(f"corpus_dir {path} is not a saved DatasetDict (save one with save_to_disk)")
    corpus = datasets.load_from_disk(str(path))
    missing = [s for s in ("train", "validation") if s not in corpus]
    if missing:
        raise UserError(f"corpus_dir {path} lacks the split(s) {missing}")
    return corpus


def ensure_tokenizer(config: TeacherConfig, corpus, cache_dir: Path):
    """The project tokenizer for this corpus and tokenizer config, trained once and cached."""
    from pretrain.tokenizer import load_tokenizer, train_tokenizer

    key = config_hash({"corpus": dataclasses.asdict(config.corpus), "corpus_dir": config.corpus_dir,
                       "tokenizer": dataclasses.asdict(config.tokenizer)})
    path = cache_dir / f"tokenizer-{key}"
    if not (path / "tokenizer.json").is_file():
        train_tokenizer(corpus, config.tokenizer, path)
    return load_tokenizer(path)


def _check(config: TeacherConfig) -> None:
    from core.openba import PRESETS

    if config.preset not in PRESETS:
        raise UserError(f"unknown OpenBA preset {config.preset!r}; known: {', '.join(sorted(PRESETS))}")
    unknown = sorted(set(config.model) - set(PRESETS[config.preset]) - {"rope_theta", "layernorm_epsilon"})
    if unknown:
        raise UserError(f"model overrides {unknown} are not OpenBA preset fields ({', '.join(PRESETS[config.preset])})")
    if "vocab_size" in config.model:
        raise UserError("model.vocab_size comes from the tokenizer; set tokenizer.vocab_size instead")
    if len(config.objective_weights) != 7:
        raise UserError(f"objective_weights needs 7 weights (R-1, R-2, S, X-1, X-2, X-3, X-4), "
                        f"got {len(config.objective_weights)}")
    if min(config.input_length, config.target_length) < 8 or config.validation_batches < 1:
        raise UserError("input_length and target_length must be >= 8 and validation_batches >= 1")
    if config.baseline_batches < config.validation_batches:
        raise UserError(f"baseline_batches ({config.baseline_batches}) must be at least validation_batches "
                        f"({config.validation_batches})")


def train_teacher(config: TeacherConfig, work_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Build corpus, tokenizer, model and data; train (resuming from work_dir/checkpoints); save the checkpoint."""
    from core.checkpoint import write_checkpoint
    from core.openba import openba_config
    from core.openba.modeling_openba import OpenBAForConditionalGeneration
    from pretrain.data import TokenizedDocuments
    from pretrain.objectives import ObjectiveBatches, SpecialIds, token_mean_loss, ul2_mixture

    _check(config)
    corpus = _load_texts(config, cache_dir)
    tokenizer = ensure_tokenizer(config, corpus, cache_dir)
    ids = SpecialIds.from_tokenizer(tokenizer)

    def batches(split: str, seed: int) -> ObjectiveBatches:
        documents = TokenizedDocuments(corpus[split], tokenizer, seed=seed, name=split)
        return ObjectiveBatches(documents, ul2_mixture(ids, config.objective_weights),
                                batch_size=config.train.micro_batch_size, input_length=config.input_length,
                                target_length=config.target_length, packed=config.packed, pad_id=ids.pad,
                                max_spans=len(ids.sentinels), seed=seed)

    data = batches("train", config.seed)
    validation = batches("validation", config.seed + 1)
    val_batches = [next(validation) for _ in range(config.validation_batches)]
    baseline_val = val_batches + [next(validation) for _ in range(config.baseline_batches - len(val_batches))]
    sampler = batches("train", config.seed + 2)  # not `data`: the training stream's position must stay at 0
    baseline_train = [next(sampler) for _ in range(config.baseline_batches)]
    unigram = unigram_entropy(baseline_val)
    unigram_fitted = unigram_cross_entropy(baseline_train, baseline_val, len(tokenizer))

    torch.manual_seed(config.seed)
    model_config = openba_config(config.preset, **{**config.model, "vocab_size": len(tokenizer)})
    model = OpenBAForConditionalGeneration(model_config)
    trainer = Trainer(model, config.train, data, loss_fn=token_mean_loss, eval_fn=ValidationLoss(val_batches))
    result = trainer.train(work_dir)

    write_checkpoint(model, tokenizer, work_dir)
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # optimizer states: resume-only, 3x the model
    val_loss = result.get("eval/val_loss")
    return {
        "val_loss": val_loss,
        "unigram_entropy": unigram,
        "unigram_cross_entropy": unigram_fitted,
        "val_loss_below_unigram": None if val_loss is None else unigram - val_loss,
        "per_objective": {k[len("eval/val_loss/"):]: v for k, v in result.items() if k.startswith("eval/val_loss/")},
        "train_loss": result.get("loss"),
        "steps": result.get("step"),
        "train_tokens_seen": result.get("tokens"),
        "train_seconds": result.get("seconds"),
        "tokens_per_s": (result.get("tokens") or 0) / max(result.get("seconds") or 0.0, 1e-9),
        "non_padding_share": data.stats["tokens"] / max(data.stats["slots"], 1),
        "vocab_size": len(tokenizer),
    }


def teacher_dir(config: TeacherConfig, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Where the teacher for `config` is cached: `<cache>/teacher-<config hash>`."""
    return Path(cache_dir) / f"teacher-{config_hash(config)}"


def ensure_teacher(config: TeacherConfig | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                   force: bool = False) -> Path:
    """The cached teacher checkpoint for `config` (default: the embedded default), trained first if missing."""
    config = config or TeacherConfig()
    _check(config)
    cache_dir = Path(cache_dir)
    out = teacher_dir(config, cache_dir)
    stage = Stage("teacher", lambda _input, work, cfg: train_teacher(cfg, work, cache_dir), config, resumable=True)
    run_stage(stage, None, out, force=force)
    return out


def summary_rows(manifest: Manifest) -> list[tuple[str, Any]]:
    m = manifest.metrics
    rows = [
        ("validation loss (nats/token)", m.get("val_loss")),
        ("unigram entropy of val targets", m.get("unigram_entropy")),
        ("unigram fit on train, on val", m.get("unigram_cross_entropy")),
        ("margin below unigram", m.get("val_loss_below_unigram")),
        ("final train loss", m.get("train_loss")),
        ("steps", m.get("steps")),
        ("train tokens seen", human_count(m.get("train_tokens_seen") or 0)),
        ("train seconds", m.get("train_seconds")),
        ("tokens/s", round(m.get("tokens_per_s") or 0)),
        ("parameters", human_count(manifest.parameters.get("after") or 0)),
        ("vocabulary", m.get("vocab_size")),
    ]
    rows += [(f"validation loss {name}", value) for name, value in sorted((m.get("per_objective") or {}).items())]
    return rows


# ---------------------------------------------------------------------------------------------------- the kind


@dataclass
class PreparedTeacher:
    config: TeacherConfig
    cache_dir: Path


def prepare(config: TeacherConfig, inputs: dict[str, Path | None], progress: bool = True) -> PreparedTeacher:
    """Check the config, the corpus directory and the cache location; writes nothing (the corpus, tokenizer and
    teacher are built into the cache by `run`)."""
    _check(config)
    if config.corpus_dir is not None:
        _load_texts(config, DEFAULT_CACHE)  # a saved DatasetDict with both splits (loading one writes nothing)
    cache_dir = Path(inputs.get("cache_dir") or DEFAULT_CACHE)
    cached = teacher_dir(config, cache_dir)
    if not is_complete(cached, config):  # to be trained there: a writable place, and no stranger's folder
        check_output_location(cached, "teacher")
    return PreparedTeacher(config, cache_dir)


def publish_copy(prepared: PreparedTeacher, work_dir: Path) -> dict[str, Any]:
    """Train the teacher into the cache (or find it there) and copy its files into the stage directory."""
    cached = ensure_teacher(prepared.config, prepared.cache_dir)
    for item in cached.iterdir():
        if item.is_file() and item.name != MANIFEST:  # the stage contract writes this stage's own manifest
            shutil.copy2(item, work_dir / item.name)
    return {"cached_at": str(cached), **Manifest.read(cached).metrics}


def verdict(manifest: Manifest) -> str | None:
    """A teacher that did not get below the unigram baseline learned only token frequencies."""
    val, unigram = manifest.metrics.get("val_loss"), manifest.metrics.get("unigram_entropy")
    if val is not None and unigram is not None and not val < unigram:
        return (f"the teacher's validation loss {val:.3f} is not below the unigram baseline {unigram:.3f}; train "
                "longer (train.steps) or check the data")
    return None


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")


def _apply_threads(args: argparse.Namespace) -> dict[str, Any]:
    """--threads is a setting of this process, not of the teacher (no config field, no cache key): applied as the
    flags are read."""
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return {}


KIND = register_kind(StageKind(
    name="teacher",
    stage="teacher",
    module="pretrain.teacher",
    config_cls=TeacherConfig,
    prepare=prepare,
    run=publish_copy,
    description="Train the tiny OpenBA teacher from scratch on the offline corpus with the UL2 mixture (minutes on "
                "2 CPU cores), cache it by config hash, and publish a copy in --out.",
    examples=(
        "python -m pretrain.teacher --out runs/teacher",
        "python -m pretrain.teacher --out runs/quick --set train.steps=40 --set model.hidden_size=64",
        "python -m pretrain.teacher --config teacher.yaml --out runs/teacher --cache-dir /data/cache",
    ),
    inputs=(Input("cache_dir", f"cache for corpus, tokenizer and teachers (default {DEFAULT_CACHE}; env "
                  "OPENBA_CACHE)", required=False, is_checkpoint=False),),
    summary=lambda manifest: format_table(summary_rows(manifest), ["teacher", "value"]),
    flags=_threads_flag,
    flag_values=_apply_threads,
    verdict=verdict,
))
main = command(KIND)


if __name__ == "__main__":
    main()
