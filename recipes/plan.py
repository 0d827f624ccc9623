"""Dry run: the shapes, parameter counts and GPU memory of every stage, computed on the meta device.

No weights are loaded: each stage's effect on the shape is applied to the config, the model is instantiated on the
meta device to count parameters, and memory is estimated from the count (formulas below, stated as estimates).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from core.adapters import ModelShape, adapter_class
from core.errors import UserError
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


def count_on_meta(config) -> int:
    """Unique parameters of a model built from `config` on the meta device (no memory is allocated)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def check_not_dropped(drops_so_far: dict[str, list[int]], original: list[int], stack: str) -> None:
    """OpenBA-V2 names every stage's layers by their index in the original 15B model (REFERENCE.md): an index an
    earlier stage already dropped is a mistake in the plan (the layer pruner maps the rest to current positions)."""
    dropped = set(drops_so_far.get(stack, []))
    again = sorted(set(original) & dropped)
    if again:
        raise UserError(f"{stack} layers {again} (original numbering) were already dropped by an earlier stage")


def shape_after(kind: str, args: dict[str, Any], shape: ModelShape, drops: dict[str, list[int]]) -> ModelShape:
    """The shape a stage leaves, from its arguments alone (the plan never looks at weights)."""
    if kind == "layer_prune":
        depths = dict(shape.depths)
        for stack, indices in (args.get("drop") or {}).items():
            if args.get("drop_numbering") == "original":
                check_not_dropped(drops, indices, stack)
                drops.setdefault(stack, []).extend(indices)
            depths[stack] -= len(indices)
        remove = args.get("remove") or {}
        if isinstance(remove, int):
            remove = {stack: remove for stack in depths}
        for stack, count in remove.items():
            depths[stack] -= count
        if any(d < 1 for d in depths.values()):
            raise UserError(f"layer pruning would leave a stack empty: {depths}")
        return dataclasses.replace(shape, depths=depths)
    if kind == "neuron_prune":
        heads = args.get("heads") or shape.heads
        kv = heads // shape.group_size  # whole kv groups are kept, so the group size is unchanged
        return dataclasses.replace(shape, hidden=args.get("hidden") or shape.hidden,
                                   ffn=args.get("ffn_width") or shape.ffn, heads=heads, kv_heads=kv)
    if kind == "vocab_prune":
        keep = args.get("keep") or shape.vocab
        multiple = args.get("pad_to", 128) or 1
        return dataclasses.replace(shape, vocab=-(-keep // multiple) * multiple)
    return shape


def training_memory_gib(params: int, world: int, args: dict[str, Any], shape: ModelShape) -> float:
    """Per-GPU memory estimate for mixed-precision Adam under ZeRO-3 plus checkpointed activations.

    States: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v) bytes per parameter, sharded over `world`.
    Activations with checkpointing: one bf16 hidden state per layer per token, plus ~34 bytes x hidden per token for
    the layer being recomputed (the usual transformer estimate), at the stage's micro-batch and sequence length.
    """
    micro = int(args.get("micro_batch_size", 1))
    seq = int(args.get("seq_len", 2048))
    layers = sum(shape.depths.values())
    states = 16 * params / world
    activations = micro * seq * shape.hidden * (2 * layers + 34)
    return (states + activations) / GIB


def untied_head(config, shape: ModelShape) -> int:
    """Parameters of an untied LM head: OpenBA's papers count the embedding once (Megatron tied them in
    training), so the plan also shows counts without it to compare with the paper's 14.6B / 12.3B / ... / 3.4B."""
    return 0 if getattr(config, "tie_word_embeddings", False) else shape.vocab * shape.hidden


def plan(recipe: RecipeConfig) -> list[dict[str, Any]]:
    config = base_config(recipe)
    adapter = adapter_class(config.model_type)
    shape = adapter.config_shape(config)
    drops: dict[str, list[int]] = {}
    shapes = {}
    rows = [{"stage": "input", "kind": "-", "shape": shape, "params": count_on_meta(config), "memory_gib": None,
             "untied_head": untied_head(config, shape)}]
    for spec in recipe.stages:
        if spec.input is not None:  # a baseline branching off an earlier stage starts from that stage's shape
            shape = shapes[spec.input]
        shape = shape_after(spec.kind, spec.args, shape, drops)
        shapes[spec.name] = shape
        config = adapter.reshape_config(config, shape)
        params = count_on_meta(config)
        if spec.kind in TRAINING_KINDS:
            memory = training_memory_gib(params, recipe.world_size, spec.args, shape)
        else:  # scoring/pruning: bf16 weights on one GPU plus a calibration batch's activations
            memory = (2 * params + 34 * shape.hidden * int(spec.args.get("seq_len", 2048))) / GIB
        rows.append({"stage": spec.name, "kind": spec.kind, "shape": shape, "params": params, "memory_gib": memory,
                     "tokens": spec.tokens, "untied_head": untied_head(config, shape)})
    return rows


def format_plan(rows: list[dict[str, Any]], world: int) -> str:
    table = []
    first = rows[0]["params"]
    for row in rows:
        shape = row["shape"]
        depths = "/".join(str(d) for d in shape.depths.values())
        table.append([
            row["stage"], row["kind"], depths, shape.hidden, shape.ffn, f"{shape.heads}/{shape.kv_heads}", shape.vocab,
            human_count(row["params"]), human_count(row["params"] - row["untied_head"]), f"{100 * (1 - row['params'] / first):.1f}%",
            human_count(row["tokens"]) if row.get("tokens") else "",
            "" if row["memory_gib"] is None else f"{row['memory_gib']:.1f}",
        ])
    headers = ["stage", "kind", "layers", "hidden", "ffn", "heads/kv", "vocab", "params", "w/o LM head", "removed", "tokens",
               f"GiB/GPU (est., ZeRO-3 x{world})"]
    return format_table(table, headers)
