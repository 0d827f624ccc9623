"""Budget planner: which layer, width, head, hidden and vocabulary cuts bring a model to a parameter target.

OpenBA-V2 went from 15B to 3.4B in a fixed order: layers first (12/36 -> 8/24, three gradual steps), then widths
(hidden 4096 -> 2560, FFN 11008 -> 6912, heads 40 -> 20), then the vocabulary (250K -> ~110K). The default strategy
keeps that order and those proportions: depth to `depth_ratio`, vocabulary to `vocab_ratio`, and between them one
width ratio r, solved so the final model lands nearest the target (hidden and FFN keep r of their width, rounded to
`round_to`; heads keep r * `head_scale` of their kv groups). If the fixed cuts alone overshoot the target, depth is
relaxed; a target below the smallest model the plan can reach is an error.

Counts come from instantiating each planned config on the meta device (core.planning: no memory, no weights); the
family's field names come from its adapter (`config_shape` / `reshape_config`), so this module knows no family.

    python -m compress.budget --preset openba-15b --target 3.4e9
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from core.adapters import Adapter, ModelShape, adapter_class
from core.cli import tool
from core.errors import UserError
from core.kind import Input
from core.planning import PlannedModel
from compress.layer import parse_count
from compress.neuron import round_width


@dataclasses.dataclass
class BudgetConfig:
    """The strategy's knobs; defaults are OpenBA-V2's proportions (15B -> 3.4B)."""

    depth_ratio: float = 2 / 3
    """Kept fraction of each stack's layers: V2's three layer stages went 12/36 -> 8/24."""
    head_scale: float = 0.8
    """Heads keep (width ratio x head_scale) of their kv groups. V2 cut heads 40 -> 20 (0.5) while widths kept
    0.625, so 0.8; 1.0 keeps attention width in step with the hidden size."""
    vocab_ratio: float = 0.44
    """Kept fraction of the vocabulary: V2 kept ~110K of 250K tokens (what the corpus used). 1.0: no vocab cut."""
    vocab_pad_to: int = 128
    """Pad the planned vocabulary to a multiple (V2 pads to 128, as compress.vocab does)."""
    round_to: int = 128
    """Round hidden and FFN widths to a multiple: V2's 2560 and 6912 are multiples of 128."""
    counting: Literal["auto", "all", "embedding_once"] = "auto"
    """How parameters count: "all" = every parameter of the HF model; "embedding_once" = an untied LM head counts
    as the input embedding (as OpenBA's reported 14.6B / 3.8B / 3.4B do: Megatron shared them); "auto" = the
    family's convention (embedding_once for OpenBA, all for the rest)."""
    at_most: bool = False
    """Pick the largest plan at or below the target (True) instead of the one nearest to it (False)."""

    def __post_init__(self):
        for name in ("depth_ratio", "vocab_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {value}")
        if self.head_scale <= 0:
            raise UserError(f"head_scale must be positive, got {self.head_scale}")
        if self.round_to < 1 or self.vocab_pad_to < 1:
            raise UserError("round_to and vocab_pad_to must be positive integers")


@dataclasses.dataclass
class PlanStep:
    """The model after one step of the plan: its shape and parameter count."""

    name: str
    shape: ModelShape
    params: int


@dataclasses.dataclass
class Plan:
    """The steps from the given model to the planned one (start, layers, widths, vocab)."""

    family: str
    target: int
    counting: str
    steps: list[PlanStep]
    width_ratio: float

    @property
    def final(self) -> PlanStep:
        return self.steps[-1]

    def to_dict(self) -> dict:
        return {"family": self.family, "target": self.target, "counting": self.counting,
                "width_ratio": self.width_ratio,
                "steps": [{"name": s.name, "params": s.params, "shape": dataclasses.asdict(s.shape)}
                          for s in self.steps]}


# --- the model planned -------------------------------------------------------------------------------------------
def load_base_config(source):
    """A config from a config object, an OpenBA preset name, or a checkpoint directory."""
    import core.openba

    if not isinstance(source, (str, Path)):
        return source
    if str(source) in core.openba.PRESETS:
        return core.openba.openba_config(str(source))
    if not Path(source).exists():
        raise UserError(f"'{source}' is neither a preset ({', '.join(core.openba.PRESETS)}) nor a model directory")
    return model_config(source)


def preset_config(name: str):
    """The config of OpenBA preset `name`; an unknown name is an error that lists the presets."""
    import difflib

    import core.openba

    if name not in core.openba.PRESETS:
        close = difflib.get_close_matches(name, list(core.openba.PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown preset '{name}'{hint}; presets: {', '.join(core.openba.PRESETS)} (or give --model "
                        "DIR to plan a checkpoint)")
    return core.openba.openba_config(name)


def model_config(directory: str | Path):
    """A checkpoint's config (its config.json alone: no weights are read)."""
    from transformers import AutoConfig

    from core.checkpoint import read_model_config

    if not Path(directory).exists():
        raise UserError(f"model directory {directory} does not exist (a named shape is given with --preset)")
    read_model_config(directory)  # clear errors for a folder that is no checkpoint or an unknown architecture
    return AutoConfig.from_pretrained(str(directory))


# --- the plan ----------------------------------------------------------------------------------------------------
def widths_at(cls: type[Adapter], base: ModelShape, ratio: float, options: BudgetConfig) -> ModelShape:
    """The shape with width ratio `ratio` applied to hidden, FFN and (scaled) heads, as the family allows."""
    shape = dataclasses.replace(base, ffn=round_width(base.ffn * ratio, options.round_to, base.ffn))
    if cls.supports_hidden_pruning:
        shape = dataclasses.replace(shape, hidden=round_width(base.hidden * ratio, options.round_to, base.hidden))
    if cls.supports_head_pruning:
        group = base.group_size
        wanted = int(min(max(round(base.kv_heads * ratio * options.head_scale), 1), base.kv_heads))
        # the nearest smaller (else larger) head count the family's config accepts at this hidden size
        for kv in [*range(wanted, 0, -1), *range(wanted + 1, base.kv_heads + 1)]:
            candidate = dataclasses.replace(shape, heads=kv * group, kv_heads=kv)
            if cls.shape_problem(candidate) is None:
                return candidate
    return shape


def width_ratios(cls: type[Adapter], base: ModelShape, options: BudgetConfig) -> list[float]:
    """Ratios at which the rounded widths change: every multiple of round_to of the hidden size (or FFN width)."""
    size = base.hidden if cls.supports_hidden_pruning else base.ffn
    steps = sorted({round_width(m, options.round_to, size) for m in range(options.round_to, size + 1, options.round_to)}
                   | {size})
    return [s / size for s in steps]


def _pick(candidates: list[tuple[int, object]], target: int, at_most: bool):
    """The candidate (count, value) nearest the target, or the largest at or below it."""
    if at_most:
        fitting = [c for c in candidates if c[0] <= target]
        return max(fitting, key=lambda c: c[0]) if fitting else None
    return min(candidates, key=lambda c: (abs(c[0] - target), c[0]))


def plan_budget(config_or_model_dir, target_params: float, options: BudgetConfig | None = None) -> Plan:
    """Propose layer, width, head, hidden and vocabulary cuts that bring the model to about `target_params`."""
    options = options or BudgetConfig()
    config = load_base_config(config_or_model_dir)
    cls = adapter_class(getattr(config, "model_type", None))
    target = int(target_params)
    embedding_once = options.counting == "embedding_once" or (
        options.counting == "auto" and cls.reported_size_counts_embedding_once)
    count = PlannedModel(config, embedding_once).count
    start = cls.config_shape(config)
    start_params = count(start)
    if target >= start_params:
        raise UserError(f"the model already has {start_params:,} parameters, at or below the target {target:,}")
    vocab = min(start.vocab, round_width(start.vocab * options.vocab_ratio, options.vocab_pad_to, 10**12))

    def depths_at(ratio: float) -> dict[str, int]:
        return {stack: max(1, round(depth * ratio)) for stack, depth in start.depths.items()}

    def final(depths: dict[str, int], ratio: float) -> ModelShape:
        return dataclasses.replace(widths_at(cls, start, ratio, options), depths=depths, vocab=vocab)

    ratios = width_ratios(cls, start, options)
    smallest = final({s: 1 for s in start.depths}, ratios[0])
    if target < count(smallest):
        raise UserError(f"target {target:,} is below the smallest model this plan reaches ({count(smallest):,}: one "
                        f"layer per stack, hidden {smallest.hidden}, FFN {smallest.ffn}, {smallest.heads} heads, "
                        f"vocab {smallest.vocab}); lower round_to or vocab_ratio, or raise the target")

    depths, ratio = depths_at(options.depth_ratio), 1.0
    if count(final(depths, 1.0)) <= target:
        # the fixed layer and vocabulary cuts already reach the target: keep full widths, cut fewer layers
        depth_ratios = sorted({max(1, round(d * k)) / d for d in start.depths.values() for k in range(1, d + 1)}
                              | {options.depth_ratio, 1.0})
        candidates = [(count(final(depths_at(k), 1.0)), k) for k in depth_ratios if k >= options.depth_ratio]
        depths = depths_at(_pick(candidates, target, options.at_most)[1])
    elif count(final(depths, ratios[0])) > target:
        # even the narrowest widths are too big at this depth: cut more layers
        depth_ratios = sorted({max(1, round(d * k)) / d for d in start.depths.values() for k in range(1, d + 1)})
        candidates = [(count(final(depths_at(k), ratios[0])), k) for k in depth_ratios if k <= options.depth_ratio]
        depths, ratio = depths_at(_pick(candidates, target, options.at_most)[1]), ratios[0]
    else:
        candidates = [(count(final(depths, r)), r) for r in ratios]
        ratio = _pick(candidates, target, options.at_most)[1]

    layers = dataclasses.replace(start, depths=depths)
    planned = final(depths, ratio)
    widths = dataclasses.replace(planned, vocab=start.vocab)
    steps = [PlanStep("start", start, start_params), PlanStep("layers", layers, count(layers)),
             PlanStep("widths", widths, count(widths)), PlanStep("vocab", planned, count(planned))]
    return Plan(cls.family, target, "embedding_once" if embedding_once else "all", steps, ratio)


# --- command line ------------------------------------------------------------------------------------------------
def plan_rows(plan: Plan) -> list[list]:
    from core.table import human_count

    rows = []
    for step in plan.steps:
        shape = step.shape
        heads = f"{shape.heads}" + (f" ({shape.kv_heads} kv)" if shape.kv_heads != shape.heads else "")
        rows.append([step.name, "/".join(str(d) for d in shape.depths.values()), shape.hidden, shape.ffn, heads,
                     shape.head_dim, shape.vocab, human_count(step.params), f"{step.params / plan.target:.3f}"])
    return rows


@dataclasses.dataclass
class BudgetRequest(BudgetConfig):
    """What `python -m compress.budget` plans: a target for a preset or a checkpoint, with the strategy's knobs."""

    target: int | None = dataclasses.field(default=None, metadata={"parse": lambda t: parse_count(t),
                                                                   "metavar": "3.4B"})
    """Parameter target, e.g. 3.4e9 or 3.4B (required)."""
    preset: str | None = None
    """A named shape to plan instead of a checkpoint (--model): openba-15b or openba-tiny."""


def run_budget(request: BudgetRequest, inputs: dict) -> Plan:
    """Check the request, plan, print the plan; with --out also write plan.json and a manifest there (the stage
    contract's `--out` policy is checked before anything is planned or written)."""
    from core.config import to_dict
    from core.stage import Stage, check_output_location, run_stage
    from core.table import format_table

    model, out = inputs.get("model"), inputs.get("out")
    if request.target is None:
        raise UserError("give the parameter target: --target 3.4B (or 3.4e9)")
    if (request.preset is None) == (model is None):
        raise UserError("give exactly one of --preset NAME (a named shape, e.g. openba-15b) and --model DIR")
    config = preset_config(request.preset) if request.preset is not None else model_config(model)
    if out is not None:
        check_output_location(out, "budget", [model])
    plan = plan_budget(config, request.target, request)
    print(format_table(plan_rows(plan), ["step", "layers", "hidden", "FFN", "heads", "head dim", "vocab", "params",
                                         "/ target"]))
    print(f"{plan.family}: width ratio {plan.width_ratio:.3f}, parameters counted as '{plan.counting}'; "
          f"{plan.final.params:,} planned for a target of {plan.target:,}")
    if out is not None:
        def write(_input, work_dir, _config):
            (work_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
            return {"final_params": plan.final.params, "target": plan.target, "width_ratio": plan.width_ratio}

        stage_config = {"model": str(model) if model is not None else None, **to_dict(request)}
        run_stage(Stage("budget", write, stage_config), None, out)
        print(f"wrote {out}")
    return plan


main = tool(
    BudgetRequest, run_budget, "compress.budget",
    description="Plan layer, width, head, hidden and vocabulary cuts that bring a model to a parameter target "
                "(OpenBA-V2's order and proportions by default). Prints the shape and count after each step.",
    examples=("python -m compress.budget --preset openba-15b --target 3.4e9",
              "python -m compress.budget --model ckpt --target 1.1B --vocab-ratio 1 --round-to 64 --out runs/plan"),
    inputs=(Input("model", "checkpoint directory (its config.json is read; no weights); or --preset", required=False),
            Input("out", "also write plan.json and a manifest into this directory", required=False,
                  is_checkpoint=False)),
)


if __name__ == "__main__":
    main()
