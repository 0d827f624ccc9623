"""Dry run: the shapes, parameter counts and GPU memory of every stage, computed on the meta device.

No weights are loaded. Each stage's config is resolved once from the recipe's args (the kind's own dataclass) and
its kind says what shape it leaves (`StageKind.shape_after`); the shape is counted on the meta device
(core.planning), and memory is estimated from the count (formulas below, stated as estimates). Where scores or a
corpus decide a shape (a layer budget, vocabulary coverage, per-layer widths), the kind estimates it by the
pruner's own rule and the plan marks the row and says what was assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.adapters import ModelShape
from core.config import from_dict
from core.errors import UserError
from core.planning import PlannedModel, planned_shape
from core.table import format_table, human_count
from recipes.spec import RecipeConfig

GIB = 2**30
TRAINING_KINDS = ("teacher", "train", "align")


def base_config(recipe: RecipeConfig):
    """The starting model's config: the input checkpoint's when it exists (a converted release, say), else `preset`
    or a config.json file. A raw public OpenBA release is refused with the command that converts it."""
    import core.openba  # noqa: F401  (registers OpenBA)
    from transformers import AutoConfig

    from core.openba.convert import raise_if_release

    model = Path(recipe.model) if recipe.model else None
    if model is not None and (model / "config.json").is_file():
        raise_if_release(model, json.loads((model / "config.json").read_text()))
        return AutoConfig.from_pretrained(str(model))
    source = recipe.preset or recipe.model
    if source is None and recipe.stages and recipe.stages[0].kind == "teacher":
        # the recipe makes its own model first (the embedded default): its preset, overrides and vocabulary size
        teacher = stage_config(recipe.stages[0])
        return core.openba.openba_config(teacher.preset, **{**teacher.model,
                                                            "vocab_size": teacher.tokenizer.vocab_size})
    if source is None:
        raise UserError("a dry run needs `preset` (e.g. openba-15b) or `model` in the recipe config")
    if source in core.openba.PRESETS:
        return core.openba.openba_config(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        raise_if_release(path, data)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    raise UserError(f"cannot find a model config at {source}")


def stage_kind(name: str):
    """The registered stage kind `name` (core.kind), or None for a kind not registered there. The modules of the
    kinds that change shapes are imported here, so that they have registered themselves."""
    import compress.layer  # noqa: F401
    import compress.neuron  # noqa: F401
    import compress.vocab  # noqa: F401
    import recipes.kinds  # noqa: F401  (the kinds a recipe can name)
    from core.kind import KINDS

    return KINDS.get(name)


def check_not_dropped(drops_so_far: dict[str, list[int]], original: list[int], stack: str, depth: int) -> None:
    """OpenBA-V2 names every stage's layers by their index in the original 15B model (REFERENCE.md): an index an
    earlier stage already dropped, or one the original model never had, is a mistake in the plan (the layer pruner
    maps the rest to current positions)."""
    missing = sorted(i for i in set(original) if not 0 <= i < depth)
    if missing:
        raise UserError(f"{stack} layers {missing} (original numbering) do not exist: the first model has {depth}")
    dropped = set(drops_so_far.get(stack, []))
    again = sorted(set(original) & dropped)
    if again:
        raise UserError(f"{stack} layers {again} (original numbering) were already dropped by an earlier stage")


def stage_config(spec):
    """The stage's config, resolved from its args by its kind's dataclass (None for a kind not registered)."""
    kind = stage_kind(spec.kind)
    return None if kind is None else from_dict(kind.config_cls, dict(spec.args), prefix=f"stages.{spec.name}.args.")


def stage_shape(spec, shape: ModelShape, model: PlannedModel,
                drops: dict[str, list[int]]) -> tuple[ModelShape, str | None]:
    """The shape stage `spec` leaves and, where scores or data decide it, the note saying what was assumed."""
    kind = stage_kind(spec.kind)
    if kind is None or kind.shape_after is None:
        return shape, None
    config = stage_config(spec)
    if kind.name == "layer_prune" and config.drop and config.drop_numbering == "original":
        for stack, indices in config.drop.items():
            if stack in model.shape.depths:
                check_not_dropped(drops, indices, stack, model.shape.depths[stack])
                drops.setdefault(stack, []).extend(indices)
    return planned_shape(kind.shape_after(config, shape, model))


def activation_tokens(config, encoder_decoder: bool) -> tuple[int, int, int]:
    """(micro-batch rows, encoder tokens, decoder tokens) per row of a stage, read from its resolved config: the
    training kinds keep them in their own fields (`train.micro_batch_size`, `input_length` / `target_length`,
    `long_context.train_seq_len`; an align stage's context chunks and 1 + M responses), pruning and scoring kinds in
    `calibration`. A decoder-only model has one stack: its rows hold both parts. Unknown kinds: 1 row of 2048."""
    micro, encoder, decoder = 1, 2048, 0
    if hasattr(config, "logo"):  # align: the shared context once, then 1 + M responses, each up to the cap
        data, batches = config.data, config.logo.batches
        micro = batches.batch_size
        encoder = data.context_chunks * data.chunk_size
        decoder = config.logo.loss.responses_used * batches.max_response_tokens  # batches hold only these (SFT: 1)
    elif hasattr(config, "input_length"):  # teacher, train
        micro, encoder, decoder = config.train.micro_batch_size, config.input_length, config.target_length
        long_context = getattr(config, "long_context", None)
        if long_context is not None and long_context.train_seq_len:
            encoder, decoder = long_context.train_seq_len, 0 if not encoder_decoder else decoder
    elif hasattr(config, "calibration"):  # prunes and scores: a calibration batch
        micro, encoder, decoder = config.calibration.batch_size, config.calibration.seq_len, 0
    if not encoder_decoder:
        encoder, decoder = encoder + decoder, 0
    return micro, encoder, decoder


def training_memory_gib(params: int, world: int, tokens: tuple[int, int, int], shape: ModelShape) -> float:
    """Per-GPU memory estimate for mixed-precision Adam under ZeRO-3 plus checkpointed activations.

    States: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v) bytes per parameter, sharded over `world`.
    Activations with checkpointing: one bf16 hidden state per layer per token (encoder layers over the encoder's
    tokens, decoder layers over the decoder's), plus ~34 bytes x hidden per token for the layer being recomputed
    (the usual transformer estimate), at the stage's micro-batch (`activation_tokens`).
    """
    micro, encoder, decoder = tokens
    depths = shape.depths
    stored = (depths.get("encoder", 0) * encoder + depths.get("decoder", 0) * decoder
              if "encoder" in depths else sum(depths.values()) * (encoder + decoder))
    states = 16 * params / world
    activations = micro * shape.hidden * (2 * stored + 34 * max(encoder, decoder))
    return (states + activations) / GIB


def scoring_memory_gib(params: int, tokens: tuple[int, int, int], shape: ModelShape) -> float:
    """Scoring and pruning: bf16 weights on one GPU plus one calibration batch's activations at one layer."""
    micro, encoder, decoder = tokens
    return (2 * params + 34 * shape.hidden * micro * max(encoder, decoder)) / GIB


def untied_head(config, shape: ModelShape) -> int:
    """Parameters of an untied LM head: OpenBA's papers count the embedding once (Megatron tied them in
    training), so the plan also shows counts without it to compare with the paper's 14.6B / 12.3B / ... / 3.4B."""
    return 0 if getattr(config, "tie_word_embeddings", False) else shape.vocab * shape.hidden


def plan(recipe: RecipeConfig) -> list[dict[str, Any]]:
    """One row per stage (and one for the input): its shape, parameter count, memory estimate and, where the shape
    is an estimate, the note saying what was assumed (stages after it start from that estimate)."""
    model = PlannedModel(base_config(recipe))
    shape = model.shape
    drops: dict[str, list[int]] = {}
    shapes = {}
    rows = [{"stage": "input", "kind": "-", "shape": shape, "params": model.count(shape), "memory_gib": None,
             "untied_head": untied_head(model.config, shape), "note": None}]
    for spec in recipe.stages:
        if spec.input is not None:  # a baseline branching off an earlier stage starts from that stage's shape
            shape = shapes[spec.input]
        shape, note = stage_shape(spec, shape, model, drops)
        shapes[spec.name] = shape
        params = model.count(shape)
        tokens = activation_tokens(stage_config(spec), "encoder" in shape.depths)
        if spec.kind in TRAINING_KINDS:
            memory = training_memory_gib(params, recipe.world_size, tokens, shape)
        else:
            memory = scoring_memory_gib(params, tokens, shape)
        rows.append({"stage": spec.name, "kind": spec.kind, "shape": shape, "params": params, "memory_gib": memory,
                     "tokens": spec.tokens, "untied_head": untied_head(model.config_for(shape), shape),
                     "note": note})
    return rows


def format_plan(rows: list[dict[str, Any]], world: int) -> str:
    table = []
    notes = []
    first = rows[0]["params"]
    for row in rows:
        shape = row["shape"]
        depths = "/".join(str(d) for d in shape.depths.values())
        stage = row["stage"]
        if row.get("note"):
            notes.append(f"{'*' * (len(notes) + 1)} {stage} (estimate): {row['note']}")
            stage += " " + "*" * len(notes)
        table.append([
            stage, row["kind"], depths, shape.hidden, shape.ffn, f"{shape.heads}/{shape.kv_heads}", shape.vocab,
            human_count(row["params"]), human_count(row["params"] - row["untied_head"]), f"{100 * (1 - row['params'] / first):.1f}%",
            human_count(row["tokens"]) if row.get("tokens") else "",
            "" if row["memory_gib"] is None else f"{row['memory_gib']:.1f}",
        ])
    headers = ["stage", "kind", "layers", "hidden", "ffn", "heads/kv", "vocab", "params", "w/o LM head", "removed", "tokens",
               f"GiB/GPU (est., ZeRO-3 x{world})"]
    return "\n".join([format_table(table, headers), *notes])
