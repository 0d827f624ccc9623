"""Importance scorers: named functions from calibration statistics to scores (HIGHER = MORE IMPORTANT = keep).

A scorer is registered for a unit ("layers", "heads" or "channels") under a name, and declares the statistics it
needs, so the calibration pass collects only those (and runs a backward pass only for scorers that need `grad`):

    @register_scorer("channels", "my_norm", needs=("act_norm",))
    def my_norm(ctx):                       # ctx: UnitContext for one MLP
        return ctx.stats["act_norm"]        # one score per FFN channel

A user scorer can also be named in a config by dotted path, `pkg.module:function` (a registered Scorer or a plain
function; a plain function may carry `needs = (...)` and `units = (...)` as attributes, else it is offered every
unit). Layer scorers are called once per stack with a `LayerContext`; head and channel scorers once per attention /
MLP module with a `UnitContext`. A command asks a scorer only for the units it prunes.
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from typing import Any, Callable

import torch

from core.errors import UserError

SCORER_UNITS = ("layers", "heads", "channels")

# What the calibration pass can collect. Layer statistics are per block; unit statistics are per input column of
# the output projection (o_proj / down), i.e. per head-output feature or per FFN channel.
STATISTICS = {
    "cosine": "layers: token-mean cos(h_in, h_out) of each block",
    "angular": "layers: token-mean arccos(cos(h_in, h_out)) / pi of each block",
    "skip_loss": "layers: calibration-loss increase when the block is skipped (one extra pass per block: slow)",
    "act_abs": "heads/channels: token-mean |x| at the input of the output projection",
    "act_norm": "heads/channels: L2 norm over calibration tokens of x at the input of the output projection",
    "grad": "heads/channels: .grad of every weight, from a backward pass of the calibration loss",
}
LAYER_STATISTICS = ("cosine", "angular", "skip_loss")


@dataclasses.dataclass
class LayerContext:
    """What a layer scorer sees for one stack: per-block statistics (each a tensor of length num_blocks)."""

    stack: str
    num_blocks: int
    stats: dict[str, torch.Tensor]
    seed: int = 0
    adapter: Any = None

    def generator(self) -> torch.Generator:
        return seeded_generator(self.seed, f"layers.{self.stack}")


@dataclasses.dataclass
class UnitContext:
    """What a head or channel scorer sees for one module (an attention or an MLP of block `layer`).

    `view` is the adapter's AttentionView / MLPView: it names the projections, so weights and gradients can be read.
    `stats` are per input column of the output projection (length num_heads*head_dim or the FFN width). Stats and
    `output_weight()` are float32 on the CPU, wherever the model runs, so a scorer can mix them freely.
    """

    unit: str
    stack: str
    layer: int
    kind: str | None
    view: Any
    stats: dict[str, torch.Tensor]
    seed: int = 0
    adapter: Any = None

    @property
    def num_units(self) -> int:
        return self.view.num_heads if self.unit == "heads" else self.view.width

    @property
    def name(self) -> str:
        kind = f".{self.kind}" if self.kind else ""
        return f"{self.unit}.{self.stack}{kind}.{self.layer}"

    def output_weight(self) -> torch.Tensor:
        """Weight of the output projection, [out, in]: its input columns are the units' features."""
        name = self.view.o if self.unit == "heads" else self.view.down
        return self.view.linear(name).weight.detach().float().cpu()

    def output_weight_abs_sums(self) -> torch.Tensor:
        """Sum of |W| down each input column of the output projection, float32 on the CPU: reduced where the weight
        is, so a GPU model sends the host one number per column, not the whole matrix."""
        name = self.view.o if self.unit == "heads" else self.view.down
        return self.view.linear(name).weight.detach().abs().sum(0, dtype=torch.float32).cpu()

    def per_unit(self, columns: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Collapse a per-column tensor to one value per unit (a head owns head_dim columns, a channel one)."""
        columns = columns.float().reshape(-1)
        if self.unit == "channels":
            return columns
        grouped = columns.reshape(self.view.num_heads, -1)
        return grouped.mean(1) if reduce == "mean" else grouped.sum(1)

    def generator(self) -> torch.Generator:
        return seeded_generator(self.seed, self.name)


@dataclasses.dataclass
class Scorer:
    unit: str
    name: str
    fn: Callable[[Any], torch.Tensor]
    needs: tuple[str, ...] = ()
    description: str = ""

    @property
    def needs_grad(self) -> bool:
        return "grad" in self.needs

    def __call__(self, ctx) -> torch.Tensor:
        return self.fn(ctx)


REGISTRY: dict[tuple[str, str], Scorer] = {}


class ScorerUnitError(UserError):
    """A scorer asked for a unit it does not score (a command may add which of its flags asked for that unit)."""


def register_scorer(unit: str, name: str, needs: tuple[str, ...] | list[str] = (), description: str = ""):
    """Decorator: register `fn(ctx) -> scores` as scorer `name` for `unit`; later registrations replace earlier."""
    if unit not in SCORER_UNITS:
        raise UserError(f"scorer unit must be one of {', '.join(SCORER_UNITS)}, got '{unit}'")
    _check_needs(unit, name, tuple(needs))

    def decorate(fn):
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        scorer = Scorer(unit, name, fn, tuple(needs), doc)
        REGISTRY[(unit, name)] = scorer
        return scorer

    return decorate


def _check_needs(unit: str, name: str, needs: tuple[str, ...]) -> None:
    unknown = [n for n in needs if n not in STATISTICS]
    if unknown:
        raise UserError(f"scorer '{name}' needs unknown statistics {unknown}; known: {', '.join(STATISTICS)}")
    wrong = [n for n in needs if (n in LAYER_STATISTICS) != (unit == "layers")]
    if wrong:
        raise UserError(f"scorer '{name}' for {unit} cannot use statistics {wrong} (they are for other units)")


def available_scorers(unit: str | None = None) -> list[str]:
    return sorted(name for (u, name) in REGISTRY if unit is None or u == unit)


def get_scorer(unit: str, name: str) -> Scorer:
    """A registered scorer, or one loaded from a dotted path `pkg.module:function`; UserError if neither."""
    if unit not in SCORER_UNITS:
        raise UserError(f"unknown scoring unit '{unit}': use one of {', '.join(SCORER_UNITS)}")
    if (unit, name) in REGISTRY:
        return REGISTRY[(unit, name)]
    if ":" in name:
        return load_scorer(unit, name)
    raise UserError(f"unknown {unit} scorer '{name}': available are {', '.join(available_scorers(unit))}, "
                    "or give a dotted path pkg.module:function")


def load_scorer(unit: str, path: str) -> Scorer:
    """Import `pkg.module:function` and wrap it as a scorer for `unit` (a registered Scorer is used as it is)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import scorer module '{module_name}' from '{path}': {err}") from None
    target = getattr(module, attr, None)
    if target is None:
        raise UserError(f"module '{module_name}' has no '{attr}' (scorer path '{path}')")
    if isinstance(target, Scorer):
        if target.unit != unit:
            raise ScorerUnitError(f"scorer '{path}' scores {target.unit} only, not {unit}")
        return target
    if not callable(target):
        raise UserError(f"scorer '{path}' is not a function")
    units = getattr(target, "units", None)
    if units is not None:
        units = (units,) if isinstance(units, str) else tuple(units)
        unknown = [u for u in units if u not in SCORER_UNITS]
        if unknown:
            raise UserError(f"scorer '{path}' declares unknown units {unknown}; units are {', '.join(SCORER_UNITS)}")
        if unit not in units:
            raise ScorerUnitError(f"scorer '{path}' scores {', '.join(units)} only, not {unit}")
    needs = tuple(getattr(target, "needs", ()))
    _check_needs(unit, path, needs)
    return Scorer(unit, path, target, needs, (target.__doc__ or "").strip().split("\n")[0])


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends on the seed and the unit's name only, so random scores do not depend on order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# --- layers ----------------------------------------------------------------------------------------------------
@register_scorer("layers", "block_influence", needs=("cosine",))
def block_influence(ctx: LayerContext) -> torch.Tensor:
    """ShortGPT's Block Influence: 1 - token-mean cos(h_in, h_out); a block that barely turns the state scores ~0."""
    return 1.0 - ctx.stats["cosine"]


@register_scorer("layers", "angular_distance", needs=("angular",))
def angular_distance(ctx: LayerContext) -> torch.Tensor:
    """Gromov et al.: arccos(cos(h_in, h_out)) / pi, here for single blocks and averaged over tokens."""
    return ctx.stats["angular"]


@register_scorer("layers", "skip_loss", needs=("skip_loss",))
def skip_loss(ctx: LayerContext) -> torch.Tensor:
    """Calibration-loss increase when the block is skipped. Exact but slow: one extra pass per block."""
    return ctx.stats["skip_loss"]


def v2_removal_order(num_blocks: int) -> list[int]:
    """Interior blocks in the order OpenBA-V2's rule would drop them: middle first, each next one as far as possible
    from the first and last blocks and from those already chosen (ties go to the middle), so any prefix is spread."""
    interior = list(range(1, num_blocks - 1))
    chosen: list[int] = []
    anchors = [0, num_blocks - 1]
    middle = (num_blocks - 1) / 2
    while interior:
        best = max(interior, key=lambda i: (min(abs(i - a) for a in anchors + chosen), -abs(i - middle), -i))
        chosen.append(best)
        interior.remove(best)
    return chosen


@register_scorer("layers", "v2_heuristic")
def v2_heuristic(ctx: LayerContext) -> torch.Tensor:
    """OpenBA-V2's layer choice (middle layers, spread apart, never first or last) as scores: low = drop first."""
    n = ctx.num_blocks
    scores = torch.full((n,), float(n + 1))  # first and last: above every interior block
    for rank, index in enumerate(v2_removal_order(n)):
        scores[index] = float(rank)
    return scores


@register_scorer("layers", "random")
def random_layers(ctx: LayerContext) -> torch.Tensor:
    """Uniform random scores, seeded by the run seed and the stack name (the baseline every scorer must beat)."""
    return torch.rand(ctx.num_blocks, generator=ctx.generator())


# --- heads and channels ----------------------------------------------------------------------------------------
def _activation(ctx: UnitContext) -> torch.Tensor:
    """Minitron: mean |activation| of a head's output / an FFN channel, at the input of the output projection."""
    return ctx.per_unit(ctx.stats["act_abs"], reduce="mean")


def _wanda(ctx: UnitContext) -> torch.Tensor:
    """Wanda: |W| x ||X||_2 over the output projection's weights, summed over the weights a unit owns."""
    per_column = ctx.output_weight_abs_sums() * ctx.stats["act_norm"]
    return ctx.per_unit(per_column)


def _taylor(ctx: UnitContext) -> torch.Tensor:
    """First-order Taylor: |w * dL/dw| summed over every weight and bias the unit owns, in every projection."""
    return taylor_heads(ctx) if ctx.unit == "heads" else taylor_channels(ctx)


def _random(ctx: UnitContext) -> torch.Tensor:
    """Uniform random scores, seeded by the run seed and the module's name."""
    return torch.rand(ctx.num_units, generator=ctx.generator())


for _unit in ("heads", "channels"):
    register_scorer(_unit, "activation", needs=("act_abs",))(_activation)
    register_scorer(_unit, "wanda", needs=("act_norm",))(_wanda)
    register_scorer(_unit, "taylor", needs=("grad",))(_taylor)
    register_scorer(_unit, "random")(_random)


def _saliency(linear: torch.nn.Linear, dim: int) -> torch.Tensor:
    """|w * grad| summed to one value per output row (dim 0, bias included) or input column (dim 1), on the CPU
    (reduced where the model is, so only the sums cross to the host)."""
    weight, grad = linear.weight, linear.weight.grad
    if grad is None:
        raise UserError("the Taylor scorer found no gradient: the calibration loss did not reach this module")
    saliency = (weight.detach().float() * grad.float()).abs().sum(1 - dim)
    if dim == 0 and linear.bias is not None and linear.bias.grad is not None:
        saliency = saliency + (linear.bias.detach().float() * linear.bias.grad.float()).abs()
    return saliency.cpu()


def taylor_heads(ctx: UnitContext) -> torch.Tensor:
    """Per query head: its rows/columns in q and o, plus an equal share of its kv head's rows in k and v."""
    view = ctx.view
    scores = torch.zeros(view.num_heads)
    for proj in view.projections:
        values = _saliency(view.linear(proj.name), proj.dim)
        if proj.heads == "q":
            scores += values.reshape(view.num_heads, -1).sum(1)
        else:
            per_kv = values.reshape(view.num_kv_heads, -1).sum(1)
            scores += per_kv.repeat_interleave(view.group_size) / view.group_size
    return scores


def taylor_channels(ctx: UnitContext) -> torch.Tensor:
    """Per FFN channel: its rows in gate and up (both halves of a fused [gate; up]) and its column in down."""
    view = ctx.view
    width = view.width
    scores = _saliency(view.linear(view.down), 1)
    if view.fused_gate_up:
        fused = _saliency(view.linear(view.fused_gate_up), 0)
        scores = scores + fused[:width] + fused[width:]
    for name in (view.up, view.gate):
        if name:
            scores = scores + _saliency(view.linear(name), 0)
    return scores


def check_scores(values: Any, expected: int, what: str, scorer: Scorer) -> torch.Tensor:
    """A scorer's output as a float32 vector of the right length, or a UserError naming the scorer."""
    try:
        values = torch.as_tensor(values).detach().float().reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{scorer.unit} scorer '{scorer.name}' returned {type(values).__name__}, not a tensor") from None
    if values.numel() != expected:
        hint = ""
        if ":" in scorer.name and scorer.unit != "layers":  # a user's function, perhaps written for the other unit
            hint = " (a function that scores only some units says so with `fn.units = (\"channels\",)`)"
        raise UserError(f"{scorer.unit} scorer '{scorer.name}' returned {values.numel()} scores for {what}, "
                        f"which has {expected}{hint}")
    if torch.isnan(values).any():
        raise UserError(f"{scorer.unit} scorer '{scorer.name}' gave NaN scores for {what}: check the model for NaNs")
    return values
