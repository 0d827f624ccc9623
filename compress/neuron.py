"""Neuron pruning: FFN channels, attention heads (whole kv groups) and the hidden dimension, chosen by score.

OpenBA-V2's stage S4 cut hidden 4096 -> 2560, FFN 11008 -> 6912 and heads 40 -> 20 with random structured masks
(one global hidden mask, per-layer head and FFN masks) and sliced every dependent tensor. Here the masks come from
importance scores (HIGHER = keep, see compress/scoring.py); the scorer "random" reproduces the paper's baseline.

    prune_neurons(model, scores, ffn_ratio=0.5, head_ratio=0.5)          # in place, returns a NeuronPruneResult
    python -m compress.neuron --model DIR --calib DATA --ffn-width 6912 --heads 20 --hidden 2560 --out DIR
    KIND.shape_after(config, shape, model)                                # the shape, for the dry-run planner

Rules the pruner keeps:
- Query heads go with their kv head (a kv group is the unit), so GQA stays valid; a group scores the sum of its
  query heads' scores. T5 keeps one head set per stack and kind (its position bias is shared by every layer), ranked
  by the summed score across the stack's layers.
- Uniform widths unless `per_layer`: then the stack's kept total is distributed by a global ranking of raw scores
  across its layers. Only families whose config stores per-layer shapes (OpenBA) allow it.
- `round_to` rounds kept FFN and hidden widths to a multiple (64/128 suit fast kernels), never below one multiple.
  Head counts are not rounded: they are already whole groups.
- Every check runs before the first tensor changes: a bad request leaves the model as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from core.adapters import Adapter, ModelShape, block_hidden_out, get_adapter
from compress.calibration import CalibrationConfig
from compress.layer import parse_count
from core.cli import command
from core.errors import UserError
from core.kind import StageKind, register_kind

HIDDEN_SCORES = "hidden"  # name of the hidden-dimension scores [hidden_size] in a scores mapping
HIDDEN_FILE = "hidden.safetensors"  # beside scores.safetensors (ImportanceScores has no hidden unit)
ORIGINAL_HEADS = "original_head_indices"  # config record of the first model's query heads each attention keeps


# --- plans -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NeuronPlan:
    """Which units survive: FFN channels per (stack, layer), kv groups per (stack, layer, attention), hidden dims."""

    channels: dict[tuple[str, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    heads: dict[tuple[str, int, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    hidden: torch.Tensor | None = None


@dataclasses.dataclass
class NeuronPruneResult:
    """What a prune did: parameters before and after, widths per stack, the width ratio a budget solved for."""

    params_before: int
    params_after: int
    hidden_before: int
    hidden_after: int
    widths_before: dict[str, dict[str, list[int]]]
    widths_after: dict[str, dict[str, list[int]]]
    solved_ratio: float | None = None
    plan: NeuronPlan | None = dataclasses.field(default=None, repr=False)


def round_width(n: float, round_to: int, maximum: int) -> int:
    """`n` rounded to the nearest multiple of `round_to`, at least one multiple, at most `maximum` (never zero)."""
    if round_to <= 1:
        return int(min(max(round(n), 1), maximum))
    rounded = max(int(round(n / round_to)), 1) * round_to
    return int(min(rounded, maximum))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted (ties keep the lower index, so equal scores prune from the end)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k].sort().values


def _scores_for(scores: Mapping[str, torch.Tensor] | Any, name: str, expected: int, what: str) -> torch.Tensor:
    try:
        values = scores[name]
    except KeyError:
        raise UserError(f"no '{name}' scores for {what}: score the model for this unit first") from None
    values = torch.as_tensor(values).detach().float().reshape(-1).cpu()
    if values.numel() != expected:
        raise UserError(f"scores '{name}' have {values.numel()} entries but {what} has {expected}: "
                        "the scores belong to another model (or one pruned since)")
    return values


def widths_of(adapter: Adapter) -> dict[str, dict[str, list[int]]]:
    """Per stack: FFN width and query-head count of every layer (the summary table and the manifest show them)."""
    out = {}
    for stack in adapter.stacks:
        blocks = adapter.blocks(stack)
        out[stack] = {"ffn": [adapter.mlp(b).width for b in blocks],
                      "heads": [adapter.attentions(b)[0].num_heads for b in blocks]}
    return out


# --- checks that need no scores ----------------------------------------------------------------------------------
@dataclasses.dataclass
class NeuronTargets:
    """The requested kept sizes; None means the unit is not pruned (ratios are of each layer's current width)."""

    ffn_width: int | None = None
    ffn_ratio: float | None = None
    heads: int | None = None
    head_ratio: float | None = None
    hidden: int | None = None
    hidden_ratio: float | None = None
    per_layer: bool = False
    round_to: int = 1

    def prunes_hidden(self) -> bool:
        return self.hidden is not None or self.hidden_ratio is not None

    def prunes_heads(self) -> bool:
        return self.heads is not None or self.head_ratio is not None

    def prunes_ffn(self) -> bool:
        return self.ffn_width is not None or self.ffn_ratio is not None


def check_request(family: type[Adapter], targets: NeuronTargets) -> None:
    """The errors a request has whatever the model's sizes: a count and a ratio for one unit, values out of range,
    a cut the family cannot make."""
    for count, ratio, unit in ((targets.ffn_width, targets.ffn_ratio, "FFN width"),
                               (targets.heads, targets.head_ratio, "head count"),
                               (targets.hidden, targets.hidden_ratio, "hidden size")):
        if count is not None and ratio is not None:
            raise UserError(f"give the kept {unit} as a count or a ratio, not both")
        if count is not None and count < 1:
            raise UserError(f"the kept {unit} must be at least 1, got {count}")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise UserError(f"the kept {unit} ratio must be in (0, 1], got {ratio}")
    if targets.round_to < 1:
        raise UserError(f"round_to must be a positive integer, got {targets.round_to}")
    if targets.per_layer and not family.per_layer_shapes:
        raise UserError(f"{family.family} checkpoints need the same width in every layer: per-layer pruning is "
                        "only for families whose config stores per-layer shapes (openba)")
    if targets.prunes_heads() and not family.supports_head_pruning:
        raise UserError(f"{family.family}: head pruning is not supported ({family.head_pruning_reason()})")
    if targets.prunes_hidden() and not family.supports_hidden_pruning:
        raise UserError(f"{family.family}: hidden-dimension pruning is not supported "
                        f"({family.hidden_pruning_reason()})")


def check_targets(adapter: Adapter, targets: NeuronTargets) -> None:
    """Every error a request can have, found from the model's shapes alone (before scoring and before surgery)."""
    check_request(type(adapter), targets)
    hidden = adapter.input_embeddings().embedding_dim
    if targets.hidden is not None and targets.hidden > hidden:
        raise UserError(f"cannot keep {targets.hidden} hidden dimensions: the model has {hidden}")
    for stack, layer, block in adapter.all_blocks():
        width = adapter.mlp(block).width
        if targets.ffn_width is not None and targets.ffn_width > width:
            raise UserError(f"cannot keep {targets.ffn_width} FFN channels: {stack} layer {layer} has {width}")
        if targets.heads is not None:
            for view in adapter.attentions(block):
                if targets.heads > view.num_heads:
                    raise UserError(f"cannot keep {targets.heads} heads: {stack} layer {layer} {view.kind}-attention "
                                    f"has {view.num_heads}")
                if targets.heads % view.group_size:
                    raise UserError(f"kept query heads ({targets.heads}) must be a multiple of the kv group size "
                                    f"({view.group_size} query heads share a kv head) so GQA stays valid")
    if not targets.per_layer:
        shape = _uniform_shape_after(adapter, targets)
        problem = type(adapter).shape_problem(shape) if shape is not None else None
        if problem:
            raise UserError(f"{adapter.family}: {problem}")


def _uniform_shape_after(adapter: Adapter, targets: NeuronTargets):
    """The family-neutral shape a uniform prune leads to (None when layers differ already: nothing to check)."""
    first = adapter.all_blocks()[0][2]
    view = adapter.attentions(first)[0]
    if any(adapter.mlp(b).width != adapter.mlp(first).width for _, _, b in adapter.all_blocks()):
        return None
    shape = dataclasses.replace(type(adapter).config_shape(adapter.config), ffn=adapter.mlp(first).width,
                                hidden=adapter.input_embeddings().embedding_dim, heads=view.num_heads,
                                kv_heads=view.num_kv_heads, head_dim=view.head_dim)
    return uniform_shape(shape, targets)


def uniform_shape(shape: ModelShape, targets: NeuronTargets) -> ModelShape:
    """`shape` with every layer cut to `targets` (the widths a uniform prune gives each layer)."""
    kv = _kept_groups(shape.kv_heads, shape.group_size, targets)
    return dataclasses.replace(shape, hidden=_kept_hidden(shape.hidden, targets), ffn=_kept_ffn(shape.ffn, targets),
                               heads=kv * shape.group_size, kv_heads=kv)


def cuts_channels(adapter: Adapter, targets: NeuronTargets) -> bool:
    """True when `targets` remove FFN channels somewhere (a ratio of 1 or a width equal to every layer's does not)."""
    return targets.prunes_ffn() and any(_kept_ffn(adapter.mlp(b).width, targets) < adapter.mlp(b).width
                                        for _, _, b in adapter.all_blocks())


def cuts_heads(adapter: Adapter, targets: NeuronTargets) -> bool:
    """True when `targets` remove kv groups somewhere."""
    return targets.prunes_heads() and any(_kept_groups(v.num_kv_heads, v.group_size, targets) < v.num_kv_heads
                                          for _, _, b in adapter.all_blocks() for v in adapter.attentions(b))


def units_to_score(adapter: Adapter, targets: NeuronTargets, target_params: int | None) -> list[str]:
    """The units whose scores the plan reads: those a target cuts, and with a budget those it solves for. A unit
    left as it is needs no scores, so a scorer written for one unit serves a prune of that unit alone."""
    budget = target_params is not None
    units = []
    if cuts_channels(adapter, targets) or (budget and not targets.prunes_ffn()):
        units.append("channels")
    if adapter.supports_head_pruning and (cuts_heads(adapter, targets) or (budget and not targets.prunes_heads())):
        units.append("heads")
    return units


def _kept_ffn(width: int, targets: NeuronTargets) -> int:
    if targets.ffn_width is not None:
        return round_width(targets.ffn_width, targets.round_to, width)
    if targets.ffn_ratio is not None:
        return round_width(width * targets.ffn_ratio, targets.round_to, width)
    return width


def _kept_groups(num_kv: int, group_size: int, targets: NeuronTargets) -> int:
    if targets.heads is not None:
        return targets.heads // group_size
    if targets.head_ratio is not None:
        return int(min(max(round(num_kv * targets.head_ratio), 1), num_kv))
    return num_kv


def _kept_hidden(hidden: int, targets: NeuronTargets) -> int:
    if targets.hidden is not None:
        return round_width(targets.hidden, targets.round_to, hidden)
    if targets.hidden_ratio is not None:
        return round_width(hidden * targets.hidden_ratio, targets.round_to, hidden)
    return hidden


# --- choosing units ----------------------------------------------------------------------------------------------
def plan_neurons(adapter: Adapter, scores, targets: NeuronTargets) -> NeuronPlan:
    """Which channels, kv groups and hidden dimensions survive `targets`, by score; checks everything first."""
    check_targets(adapter, targets)
    plan = NeuronPlan()
    if targets.prunes_ffn():
        _plan_channels(adapter, scores, targets, plan)
    if targets.prunes_heads():
        _plan_heads(adapter, scores, targets, plan)
    if targets.prunes_hidden():
        hidden = adapter.input_embeddings().embedding_dim
        values = _scores_for(scores, HIDDEN_SCORES, hidden, "the hidden dimension")
        plan.hidden = top_k(values, _kept_hidden(hidden, targets))
    return plan


def _plan_channels(adapter: Adapter, scores, targets: NeuronTargets, plan: NeuronPlan) -> None:
    if not cuts_channels(adapter, targets):
        return  # nothing to rank: a scorer that cannot score channels still serves a prune of the other units
    for stack in adapter.stacks:
        layers = [(i, adapter.mlp(b).width) for i, b in enumerate(adapter.blocks(stack))]
        values = {i: _scores_for(scores, f"channels.{stack}.{i}", w, f"{stack} layer {i}'s FFN") for i, w in layers}
        counts = {i: _kept_ffn(w, targets) for i, w in layers}
        if targets.per_layer:
            counts = _global_counts(values, sum(counts.values()))
            counts = {i: round_width(c, targets.round_to, dict(layers)[i]) for i, c in counts.items()}
        for i, _ in layers:
            plan.channels[(stack, i)] = top_k(values[i], counts[i])


def _global_counts(values: dict[Any, torch.Tensor], total: int) -> dict[Any, int]:
    """How many of each group's units fall in the top `total` of all groups' scores together."""
    keys = list(values)
    owner = torch.cat([torch.full((len(values[k]),), n) for n, k in enumerate(keys)])
    kept = owner[top_k(torch.cat([values[k] for k in keys]), total)]
    return {k: int((kept == n).sum()) for n, k in enumerate(keys)}


def _group_scores(adapter: Adapter, scores, stack: str, layer: int, view) -> torch.Tensor:
    name = f"heads.{stack}.{view.kind}.{layer}"
    values = _scores_for(scores, name, view.num_heads, f"{stack} layer {layer} {view.kind}-attention")
    return values.reshape(view.num_kv_heads, view.group_size).sum(1)


def _plan_heads(adapter: Adapter, scores, targets: NeuronTargets, plan: NeuronPlan) -> None:
    if not cuts_heads(adapter, targets):
        return
    for stack in adapter.stacks:
        views = [(i, a, view) for i, block in enumerate(adapter.blocks(stack))
                 for a, view in enumerate(adapter.attentions(block))]
        groups = {(i, a): _group_scores(adapter, scores, stack, i, view) for i, a, view in views}
        counts = {(i, a): _kept_groups(view.num_kv_heads, view.group_size, targets) for i, a, view in views}
        if adapter.shared_head_set:
            # T5: every layer uses the position bias of layer 0, so one head set per kind across the stack
            for kind in {view.kind for _, _, view in views}:
                same = [(i, a) for i, a, view in views if view.kind == kind]
                kept = top_k(sum(groups[key] for key in same), counts[same[0]])
                for key in same:
                    plan.heads[(stack, *key)] = kept
            continue
        if targets.per_layer:
            # one count per block (a decoder block's self- and cross-attention keep as many heads: OpenBA's config)
            pooled = _global_counts(groups, sum(counts.values()))
            for i in {i for i, _, _ in views}:
                keys = [(j, a) for j, a, _ in views if j == i]
                per_block = round(sum(pooled[k] for k in keys) / len(keys))
                for key in keys:
                    counts[key] = int(min(max(per_block, 1), len(groups[key])))
        for key, values in groups.items():
            plan.heads[(stack, *key)] = top_k(values, counts[key])


# --- surgery -----------------------------------------------------------------------------------------------------
def apply_plan(adapter: Adapter, plan: NeuronPlan) -> None:
    """Slice every tensor the plan's units touch, then write the new widths into the config."""
    blocks = {(stack, i): block for stack, i, block in adapter.all_blocks()}
    for (stack, i), channels in plan.channels.items():
        adapter.keep_channels(adapter.mlp(blocks[(stack, i)]), channels)
    record_original_heads(adapter, plan, blocks)
    for (stack, i, a), kv_heads in plan.heads.items():
        adapter.keep_heads(adapter.attentions(blocks[(stack, i)])[a], kv_heads)
    if plan.hidden is not None:
        adapter.keep_hidden(plan.hidden)
    adapter.sync_widths()


def record_original_heads(adapter: Adapter, plan: NeuronPlan, blocks: dict) -> None:
    """Write which query heads of the first model of the pruning chain each pruned attention keeps into the config
    (`original_head_indices`: stack -> kind -> original layer -> heads), keyed by original layer so a later layer
    prune leaves it valid: reports map head scores of later stages back to the first model's heads."""
    from compress.layer import original_indices

    if not plan.heads:
        return
    layers = original_indices(adapter.model, adapter)
    record = copy.deepcopy(getattr(adapter.config, ORIGINAL_HEADS, None) or {})
    for (stack, i, a), kv_heads in plan.heads.items():
        view = adapter.attentions(blocks[(stack, i)])[a]
        per_kind = record.setdefault(stack, {}).setdefault(view.kind, {})
        layer = str(layers[stack][i])
        before = per_kind.get(layer) or list(range(view.num_heads))
        per_kind[layer] = [before[int(g) * view.group_size + q] for g in sorted(int(g) for g in kv_heads)
                           for q in range(view.group_size)]
    setattr(adapter.config, ORIGINAL_HEADS, record)


def count_after(model, plan: NeuronPlan) -> int:
    """Parameters the model would have after `plan`, found by applying it to a weightless twin on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from core.checkpoint import count_parameters

    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        twin = auto.from_config(copy.deepcopy(model.config))
    apply_plan(get_adapter(twin), plan)
    return count_parameters(twin)


def prune_neurons(model, scores, ffn_width: int | None = None, ffn_ratio: float | None = None,
                  heads: int | None = None, head_ratio: float | None = None, hidden: int | None = None,
                  hidden_ratio: float | None = None, per_layer: bool = False, round_to: int = 1,
                  target_params: int | None = None) -> NeuronPruneResult:
    """Prune FFN channels, heads (per kv group) and hidden dimensions of `model` in place, keeping the best scored.

    `scores` maps names to tensors (an `ImportanceScores` or a dict): `channels.{stack}.{layer}`,
    `heads.{stack}.{kind}.{layer}` and, for the hidden dimension, `hidden` (see `hidden_scores`). With
    `target_params`, one width ratio for FFN and heads (those not given explicitly) is solved so that the model
    has at most that many parameters; an explicit hidden size is applied as given.
    """
    from core.checkpoint import count_parameters

    adapter = get_adapter(model)
    params_before, widths_before = count_parameters(model), widths_of(adapter)
    hidden_before = adapter.input_embeddings().embedding_dim
    targets = NeuronTargets(ffn_width, ffn_ratio, heads, head_ratio, hidden, hidden_ratio, per_layer, round_to)
    plan, solved = plan_prune(model, scores, targets, target_params)
    apply_plan(adapter, plan)
    return NeuronPruneResult(params_before, count_parameters(model), hidden_before,
                             adapter.input_embeddings().embedding_dim, widths_before, widths_of(adapter), solved, plan)


def plan_prune(model, scores, targets: NeuronTargets,
               target_params: int | None = None) -> tuple[NeuronPlan, float | None]:
    """The checked plan for `targets` (or the budget), without touching the model: (plan, solved ratio or None)."""
    adapter = get_adapter(model)
    solved = None
    if target_params is not None:
        targets, solved = solve_budget(model, adapter, scores, targets, int(target_params))
    elif not (targets.prunes_ffn() or targets.prunes_heads() or targets.prunes_hidden()):
        raise UserError("nothing to prune: give an FFN width, a head count, a hidden size (or ratios) or a budget")
    return plan_neurons(adapter, scores, targets), solved


def solve_budget(model, adapter: Adapter, scores, targets: NeuronTargets, target_params: int,
                 steps: int = 24) -> tuple[NeuronTargets, float]:
    """The largest width ratio (for FFN and heads not fixed by `targets`) whose pruned model fits `target_params`."""
    views = [v for _, _, b in adapter.all_blocks() for v in adapter.attentions(b)]
    uniform_heads = not targets.per_layer and len({(v.num_heads, v.num_kv_heads) for v in views}) == 1

    def head_count(solved: NeuronTargets, ratio: float) -> int | None:
        # a head count the family's config accepts (LlamaConfig: one that divides the hidden size)
        return _valid_head_count(adapter, solved, views[0], ratio) if uniform_heads else None

    return _budget_ratio(type(adapter), targets, target_params,
                         lambda solved: count_after(model, plan_neurons(adapter, scores, solved)), head_count, steps)


def _budget_ratio(family: type[Adapter], targets: NeuronTargets, target_params: int, count, head_count,
                  steps: int = 24) -> tuple[NeuronTargets, float]:
    """Bisection over one width ratio for the FFN and heads `targets` leave free: the largest whose pruned model
    has at most `target_params` parameters (`count(targets)`). `head_count(targets, ratio)` is a whole head count
    the family's config accepts, or None where heads are cut by the ratio layer by layer."""
    free_ffn = not targets.prunes_ffn()
    free_heads = not targets.prunes_heads() and family.supports_head_pruning
    if not (free_ffn or free_heads):
        raise UserError("a parameter budget needs the FFN width or the head count left free to solve for")

    def with_ratio(ratio: float) -> NeuronTargets:
        solved = dataclasses.replace(targets, ffn_ratio=ratio if free_ffn else targets.ffn_ratio)
        heads = head_count(solved, ratio) if free_heads else None
        if heads is not None:
            return dataclasses.replace(solved, heads=heads)
        return dataclasses.replace(solved, head_ratio=ratio if free_heads else targets.head_ratio)

    def params(ratio: float) -> int:
        return count(with_ratio(ratio))

    if params(1.0) <= target_params:
        return with_ratio(1.0), 1.0
    smallest = params(1e-9)  # one kv group and one rounding multiple per layer
    if smallest > target_params:
        raise UserError(f"target of {target_params:,} parameters is out of reach by neuron pruning: the smallest "
                        f"widths give {smallest:,} (prune layers or the vocabulary too, see compress.budget)")
    low, high = 1e-9, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if params(middle) <= target_params else (low, middle)
    return with_ratio(low), low


def _valid_head_count(adapter: Adapter, targets: NeuronTargets, view, ratio: float) -> int:
    """The largest whole-group head count at or below `ratio` of the heads whose uniform shape the family accepts."""
    def accepted(heads: int) -> bool:
        shape = _uniform_shape_after(adapter, dataclasses.replace(targets, heads=heads))
        return shape is None or type(adapter).shape_problem(shape) is None

    return _head_count_near(ratio, view.num_kv_heads, view.group_size, accepted, adapter.family)


def _head_count_near(ratio: float, num_kv: int, group_size: int, accepted, family_name: str) -> int:
    """The largest whole-group head count at or below `ratio` of the kv groups that `accepted(heads)` allows, else
    the smallest above it."""
    wanted = int(min(max(round(num_kv * ratio), 1), num_kv))
    for kv in [*range(wanted, 0, -1), *range(wanted + 1, num_kv + 1)]:
        if accepted(kv * group_size):
            return kv * group_size
    raise UserError(f"{family_name}: no head count fits the config's rules at this hidden size")


# --- planning (the dry run: shapes only, no weights) -------------------------------------------------------------
def shape_after(config: "NeuronPruneConfig", shape: ModelShape, model):
    """The widths this prune leaves (`StageKind.shape_after`), by the pruner's own rules: counts and ratios rounded
    as `round_to` says, heads in whole kv groups, and a budget solved by the same search over one width ratio,
    counting each candidate shape. Exact for uniform layers; with `per_layer` the scores spread each stack's kept
    total unevenly, so the plan shows the uniform widths with that total as an estimate."""
    from core.planning import Estimate

    targets = config.targets()
    family = model.adapter
    check_request(family, targets)
    for count, size, unit in ((targets.ffn_width, shape.ffn, "FFN channels"),
                              (targets.hidden, shape.hidden, "hidden dimensions")):
        if count is not None and count > size:
            raise UserError(f"cannot keep {count} {unit}: the model has {size}")
    if targets.heads is not None:
        if targets.heads > shape.heads:
            raise UserError(f"cannot keep {targets.heads} heads: the model's attentions have {shape.heads}")
        if targets.heads % shape.group_size:
            raise UserError(f"kept query heads ({targets.heads}) must be a multiple of the kv group size "
                            f"({shape.group_size} query heads share a kv head) so GQA stays valid")
    if config.target_params is not None:
        targets, _ = _solve_budget_shape(shape, model, targets, int(config.target_params))
    elif not (targets.prunes_ffn() or targets.prunes_heads() or targets.prunes_hidden()):
        raise UserError("nothing to prune: give an FFN width, a head count, a hidden size (or ratios) or a budget")
    after = uniform_shape(shape, targets)
    problem = family.shape_problem(after)
    if problem:
        raise UserError(f"{family.family}: {problem}")
    if targets.per_layer:
        return Estimate(after, "per_layer: the scores spread each stack's kept widths unevenly across its layers; "
                               "shown as uniform widths with the same total")
    return after


def _solve_budget_shape(shape: ModelShape, model, targets: NeuronTargets,
                        target_params: int) -> tuple[NeuronTargets, float]:
    """`solve_budget` on a shape: the same free units, head counts and bisection, each candidate counted by
    `model` (a core.planning.PlannedModel) instead of applied to weights."""
    family = model.adapter

    def head_count(solved: NeuronTargets, ratio: float) -> int | None:
        if targets.per_layer:
            return None

        def accepted(heads: int) -> bool:
            return family.shape_problem(uniform_shape(shape, dataclasses.replace(solved, heads=heads))) is None

        return _head_count_near(ratio, shape.kv_heads, shape.group_size, accepted, family.family)

    return _budget_ratio(family, targets, target_params, lambda solved: model.count(uniform_shape(shape, solved)),
                         head_count)


# --- hidden-dimension scores -------------------------------------------------------------------------------------
def hidden_scores(model, calib=None, scorer: str = "activation", seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Scores [hidden_size] for the hidden dimension (higher = keep).

    "activation" (Minitron's embedding-channel importance): token-mean |h| of the residual stream after every
    block, summed over all blocks of all stacks, from one calibration pass. "random": seeded uniform scores,
    OpenBA-V2's global random hidden mask.
    """
    from compress.scorers import seeded_generator

    size = get_adapter(model).input_embeddings().embedding_dim
    if scorer == "random":
        return torch.rand(size, generator=seeded_generator(seed, HIDDEN_SCORES))
    if scorer != "activation":
        raise UserError(f"unknown hidden scorer '{scorer}': use activation or random")
    if calib is None:
        raise UserError("activation scores for the hidden dimension need calibration data (--calib)")
    return _residual_activation(model, calib, progress)


def _residual_activation(model, calib, progress: bool) -> torch.Tensor:
    from compress.calibration import as_calibration_set, calibration_pass

    adapter = get_adapter(model)
    calib = as_calibration_set(calib, model)
    size = adapter.input_embeddings().embedding_dim
    sums = {stack: torch.zeros(size, dtype=torch.float64) for stack in adapter.stacks}
    tokens = {stack: 0 for stack in adapter.stacks}
    masks: dict[str, torch.Tensor | None] = {}

    def hook(stack: str, first: bool):
        def collect(module, args, kwargs, output):
            hidden = block_hidden_out(output).detach()
            mask = masks.get(stack)
            rows = hidden[mask.to(hidden.device)] if mask is not None else hidden.reshape(-1, hidden.shape[-1])
            sums[stack] += rows.abs().sum(0).double().cpu()
            if first:
                tokens[stack] += rows.shape[0]
        return collect

    def on_batch(_, batch_masks):
        masks.clear()
        masks.update(batch_masks)

    handles = [block.register_forward_hook(hook(stack, i == 0), with_kwargs=True)
               for stack, i, block in adapter.all_blocks()]
    try:
        calibration_pass(model, calib, on_batch=on_batch, desc="hidden scores", progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    total = sum(sums[s] / max(tokens[s], 1) for s in adapter.stacks)
    return total.float()


# --- command line ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NeuronPruneConfig:
    """What `python -m compress.neuron` keeps and how it chooses. None leaves a unit unpruned."""

    ffn_width: int | None = None
    """Kept FFN channels per layer. OpenBA-V2 S4: 11008 -> 6912."""
    ffn_ratio: float | None = None
    """Kept fraction of each layer's FFN channels (instead of ffn_width)."""
    heads: int | None = None
    """Kept query heads per attention, a multiple of the kv group size. OpenBA-V2 S4: 40 -> 20."""
    head_ratio: float | None = None
    """Kept fraction of each attention's kv groups (instead of heads)."""
    hidden: int | None = None
    """Kept hidden (residual-stream) size, one mask for the whole model. OpenBA-V2 S4: 4096 -> 2560."""
    hidden_ratio: float | None = None
    """Kept fraction of the hidden size (instead of hidden)."""
    per_layer: bool = False
    """Let layers keep different widths (a global ranking per stack decides them); OpenBA only. The paper kept
    widths uniform; per-layer widths follow importance but make layers uneven for kernels and parallelism."""
    round_to: int = 1
    """Round kept FFN and hidden widths to a multiple: 64 or 128 suit GPU kernels (V2's 6912 and 2560 are
    multiples of 128). 1 keeps exact counts."""
    target_params: int | None = dataclasses.field(default=None, metadata={"parse": lambda t: parse_count(t),
                                                                          "metavar": "900M"})
    """Parameter budget (e.g. 900M): solve one width ratio for FFN and heads (those not given) to fit it."""
    scorer: str = "activation"
    """Head and channel scorer: activation (Minitron), wanda, taylor (backward pass), random (OpenBA-V2's random
    masks, the baseline to beat), or pkg.module:function."""
    hidden_scorer: str | None = None
    """Hidden-dimension scorer: activation (residual-stream magnitude) or random. Default: random when `scorer` is
    random, else activation."""
    seed: int = 0
    """Seed for the random scorers."""
    calib: str | None = None
    """Calibration data: a saved dataset (python -m pretrain.corpus), a directory of text files, or a file."""
    scores: str | None = None
    """Directory with scores.safetensors (python -m compress.score, or an earlier prune): reuse, do not rescore."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def targets(self) -> NeuronTargets:
        return NeuronTargets(self.ffn_width, self.ffn_ratio, self.heads, self.head_ratio, self.hidden,
                             self.hidden_ratio, self.per_layer, self.round_to)

    def resolved_hidden_scorer(self) -> str:
        return self.hidden_scorer or ("random" if self.scorer == "random" else "activation")


TARGET_FIELDS = ("ffn_width", "ffn_ratio", "heads", "head_ratio", "hidden", "hidden_ratio", "target_params")
"""One target: given on the command line, any of these replaces those a --config file gives."""


def load_scores(directory: str | Path):
    """Scores saved by compress.score or an earlier prune, with `hidden` when the directory has them."""
    from safetensors.torch import load_file

    from compress.scoring import ImportanceScores

    scores = ImportanceScores.load(directory)
    hidden_file = Path(directory) / HIDDEN_FILE
    return scores, (load_file(str(hidden_file))[HIDDEN_SCORES] if hidden_file.is_file() else None)


def _widths_cell(before: list[int], after: list[int]) -> str:
    def describe(values):
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"

    return f"{describe(before)} -> {describe(after)}"


def summary_rows(metrics: dict, parameters: dict) -> list[list]:
    """The table printed after a prune; `parameters` is the manifest's (the stage contract counts them)."""
    from core.table import human_count

    rows = []
    for stack, before in metrics["widths_before"].items():
        after = metrics["widths_after"][stack]
        rows.append([f"{stack} blocks", len(before["ffn"]), _widths_cell(before["ffn"], after["ffn"]),
                     _widths_cell(before["heads"], after["heads"]), "",
                     human_count(metrics["stack_params_before"][stack]), human_count(metrics["stack_params_after"][stack])])
    rows.append(["model (all)", "", "", "", _widths_cell([metrics["hidden_before"]], [metrics["hidden_after"]]),
                 human_count(parameters["before"]), human_count(parameters["after"])])
    return rows


def scorer_for(unit: str, name: str, config: NeuronPruneConfig):
    """The scorer `name` for a unit this prune cuts; a scorer written for the other unit says which flag asked."""
    from compress.scorers import ScorerUnitError, get_scorer

    try:
        return get_scorer(unit, name)
    except ScorerUnitError as err:
        flags, keep_all, solved = (("--ffn-width/--ffn-ratio", "--ffn-ratio 1", "the FFN width") if unit == "channels"
                                   else ("--heads/--head-ratio", "--head-ratio 1", "the head count"))
        cut = config.targets().prunes_ffn() if unit == "channels" else config.targets().prunes_heads()
        if cut:
            raise UserError(f"{err}, but {flags} prunes {unit}: give a --scorer that scores {unit} too, or prune "
                            f"{unit} in a separate run") from None
        raise UserError(f"{err}, but --target-params solves {solved}: add {keep_all} to leave {unit} as they are, "
                        f"or give a --scorer that scores {unit} too") from None


def prepare_neuron_prune(model_dir: str | Path, config: NeuronPruneConfig, progress: bool = True):
    """Load, score and plan, checking every request before anything is written; returns `write(work_dir)`,
    which applies the plan and saves the checkpoint, scores and plots there and returns the metrics."""
    from safetensors.torch import save_file

    from compress.calibration import calibration_batches
    from compress.layer import load_inputs, stack_parameters
    from compress.plots import plot_scores
    from core.checkpoint import write_checkpoint
    from compress.scoring import score_model
    from core.checkpoint import count_parameters

    targets = config.targets()
    if config.target_params is None and not (targets.prunes_ffn() or targets.prunes_heads() or targets.prunes_hidden()):
        raise UserError("nothing to prune: give --ffn-width, --heads, --hidden (or their ratios) or --target-params")
    if config.resolved_hidden_scorer() not in ("activation", "random"):
        raise UserError(f"unknown hidden scorer '{config.hidden_scorer}': use activation or random")
    model, tokenizer = load_inputs(str(model_dir), config.tokenizer)
    adapter = get_adapter(model)
    check_targets(adapter, targets)  # shape errors before the (long) scoring pass
    scorers = {unit: config.scorer for unit in units_to_score(adapter, targets, config.target_params)}
    needs_hidden = targets.prunes_hidden()

    hidden = None
    if config.scores is not None:
        scores, hidden = load_scores(config.scores)
    else:
        needs_data = any([scorer_for(unit, config.scorer, config).needs for unit in scorers])  # resolve them all
        if (needs_data or (needs_hidden and config.resolved_hidden_scorer() == "activation")) and config.calib is None:
            raise UserError(f"the {config.scorer} scorer needs calibration data: give --calib DATA "
                            "(or --scores DIR, or --scorer random)")
    calib = None
    if config.calib is not None:
        calib = calibration_batches(config.calib, tokenizer, model=model, config=config.calibration)
    if config.scores is None:
        scores = score_model(model, calib, scorers, seed=config.seed, progress=progress)
    if needs_hidden and hidden is None:
        hidden = hidden_scores(model, calib, config.resolved_hidden_scorer(), config.seed, progress)
    named = dict(scores.tensors) if hasattr(scores, "tensors") else dict(scores)
    if hidden is not None:
        named[HIDDEN_SCORES] = hidden
    # the whole plan (and a budget's solve) is checked before the stage opens its output directory
    plan, solved = plan_prune(model, named, targets, config.target_params)

    before = {"params": count_parameters(model), "stack": stack_parameters(model), "widths": widths_of(adapter),
              "hidden": adapter.input_embeddings().embedding_dim}

    def write(work_dir: Path) -> dict:
        apply_plan(adapter, plan)
        write_checkpoint(model, tokenizer, work_dir)
        scores.save(work_dir / "scores")
        if hidden is not None:
            save_file({HIDDEN_SCORES: hidden.float().contiguous()}, str(work_dir / "scores" / HIDDEN_FILE))
        plot_scores(scores, work_dir / "scores")
        after = count_parameters(model)
        return {"kept_fraction": after / before["params"],
                "stack_params_before": before["stack"], "stack_params_after": stack_parameters(model),
                "widths_before": before["widths"], "widths_after": widths_of(adapter),
                "hidden_before": before["hidden"], "hidden_after": adapter.input_embeddings().embedding_dim,
                "solved_ratio": solved, "scorer": config.scorer,
                "hidden_scorer": config.resolved_hidden_scorer() if hidden is not None else None,
                "calibration_tokens": calib.num_tokens if calib is not None else 0}

    return write


def neuron_prune_stage(input_dir: Path, work_dir: Path, config: NeuronPruneConfig) -> dict:
    """Prune the checkpoint in `input_dir` into `work_dir` (prepare and run in one call)."""
    return prepare_neuron_prune(input_dir, config)(work_dir)


def summary(manifest) -> str:
    from core.table import format_table

    metrics = manifest.metrics
    table = format_table(summary_rows(metrics, manifest.parameters),
                         ["part", "layers", "FFN width", "heads", "hidden", "params before", "params after"])
    solved = metrics["solved_ratio"]
    note = f", solved width ratio {solved:.3f}" if solved is not None else ""
    return f"{table}\nkept {metrics['kept_fraction']:.1%} of parameters{note}"


KIND = register_kind(StageKind(
    name="neuron_prune",
    stage="neuron-prune",
    module="compress.neuron",
    config_cls=NeuronPruneConfig,
    prepare=lambda config, inputs, progress: prepare_neuron_prune(inputs["model"], config, progress),
    run=lambda write, work_dir: write(work_dir),
    description="Prune FFN channels, attention heads (whole kv groups) and the hidden dimension of a checkpoint "
                "by importance score. Writes a checkpoint (model + tokenizer), the scores and a manifest.",
    examples=(
        "python -m compress.neuron --model s3 --calib runs/corpus --ffn-width 6912 --heads 20 --hidden 2560 --out s4",
        "python -m compress.neuron --model s3 --scorer random --ffn-width 6912 --heads 20 --hidden 2560 "
        "--round-to 128 --out s4-random",
        "python -m compress.neuron --model ckpt --scores runs/scores --target-params 900M --out ckpt-small",
        "python -m compress.neuron --model openba --calib runs/corpus --ffn-ratio 0.6 --head-ratio 0.5 --per-layer "
        "--round-to 64 --out openba-uneven",
    ),
    summary=summary,
    shape_after=shape_after,
    exclusive=(TARGET_FIELDS,),
))
main = command(KIND)


if __name__ == "__main__":
    main()
