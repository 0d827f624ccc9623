"""Importance scores: the one format every pruner reads, and the pass that computes them.

Scores are a flat dict `name -> float32 tensor`, HIGHER = MORE IMPORTANT (keep). Names:

    layers.{stack}                      [num_blocks]
    heads.{stack}.{kind}.{layer}        [num query heads of that attention]   kind: "self" | "cross"
    channels.{stack}.{layer}            [FFN width]
    tokens                              [vocab]   (written by the vocabulary pruner)

plus `meta`: scorer name per unit, model_type, number of calibration tokens, data description. Saved as
`scores.safetensors` (the tensors) and `scores.json` (meta and a per-tensor summary, readable without torch), so
scores can be inspected, plotted and reused by `--scores DIR` instead of rescoring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

SCORES_FILE = "scores.safetensors"
META_FILE = "scores.json"
UNITS = ("layers", "heads", "channels", "tokens")


class ImportanceScores:
    """Named score tensors (higher = keep) and the metadata that says how they were made."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None):
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        for name, tensor in (tensors or {}).items():
            self[name] = tensor

    # --- names -------------------------------------------------------------------------------------------------
    @staticmethod
    def layer_name(stack: str) -> str:
        return f"layers.{stack}"

    @staticmethod
    def head_name(stack: str, kind: str, layer: int) -> str:
        return f"heads.{stack}.{kind}.{layer}"

    @staticmethod
    def channel_name(stack: str, layer: int) -> str:
        return f"channels.{stack}.{layer}"

    # --- dict-like access --------------------------------------------------------------------------------------
    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        if name.split(".", 1)[0] not in UNITS:
            raise ValueError(f"score name {name!r} must start with one of {UNITS}")
        self.tensors[name] = torch.as_tensor(tensor).detach().to("cpu", torch.float32).reshape(-1).contiguous()

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"no '{name}' in these scores (have: {', '.join(sorted(self.tensors)) or 'nothing'})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self, unit: str | None = None) -> list[str]:
        return [n for n in self.tensors if unit is None or n.split(".", 1)[0] == unit]

    def has_unit(self, unit: str) -> bool:
        return bool(self.names(unit))

    def layer_scores(self, stack: str) -> torch.Tensor:
        return self[self.layer_name(stack)]

    def head_scores(self, stack: str, kind: str, layer: int) -> torch.Tensor:
        return self[self.head_name(stack, kind, layer)]

    def channel_scores(self, stack: str, layer: int) -> torch.Tensor:
        return self[self.channel_name(stack, layer)]

    def update(self, other: "ImportanceScores") -> "ImportanceScores":
        """Add `other`'s tensors (replacing same names) and merge its meta; scorers per unit merge too."""
        for name, tensor in other.tensors.items():
            self[name] = tensor
        scorers = {**self.meta.get("scorers", {}), **other.meta.get("scorers", {})}
        self.meta.update(other.meta)
        if scorers:
            self.meta["scorers"] = scorers
        return self

    # --- files -------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, Any]]:
        """Per tensor: shape, min, mean, max, and whether all values are finite (for scores.json and reports)."""
        out = {}
        for name, t in self.tensors.items():
            finite = bool(torch.isfinite(t).all()) if t.numel() else True
            out[name] = {
                "shape": list(t.shape),
                "min": _num(t.min()) if t.numel() else None,
                "mean": _num(t.mean()) if t.numel() else None,
                "max": _num(t.max()) if t.numel() else None,
                "finite": finite,
            }
        return out

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(dict(self.tensors), str(directory / SCORES_FILE), metadata={"format": "importance-scores/1"})
        blob = {"meta": self.meta, "tensors": self.summary()}
        (directory / META_FILE).write_text(json.dumps(blob, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ImportanceScores":
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / SCORES_FILE
        if not path.is_file():
            raise UserError(f"no {SCORES_FILE} in {directory}: run `python -m compress.score` to make one")
        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"corrupt scores file {path}: {str(err).splitlines()[0]}") from None
        meta: dict[str, Any] = {}
        order: list[str] = []
        if (directory / META_FILE).is_file():
            try:
                blob = json.loads((directory / META_FILE).read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"{directory / META_FILE} is not valid JSON: {err}") from None
            meta, order = blob.get("meta", {}), list(blob.get("tensors", {}))
        # safetensors sorts names; scores.json keeps the model's order (layer 2 before layer 10)
        ordered = [n for n in order if n in tensors] + sorted(n for n in tensors if n not in order)
        return cls({n: tensors[n] for n in ordered}, meta)

    def __repr__(self) -> str:
        return f"ImportanceScores({len(self)} tensors, scorers={self.meta.get('scorers', {})})"


def _num(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --- the scoring pass ------------------------------------------------------------------------------------------
class StatisticsCollector:
    """Forward hooks that keep running sums of the requested statistics; nothing per token outlives its batch.

    Written for a GPU's clock: sums stay on the model's device and are read once, after the pass; no hook waits for
    the device (padding is dropped with row indices the host computed before the batch, where a boolean mask would
    make the device report how many rows it kept); each statistic reads the activation once or twice, with no
    normalised or squared full-size copies.
    """

    def __init__(self, adapter, needs: dict[str, set[str]]):
        self.adapter = adapter
        self.needs = needs  # unit -> statistics its scorer needs
        self.rows: dict[str, tuple[tuple[int, ...], torch.Tensor] | None] = {}  # stack -> (mask shape, real rows)
        self.handles: list[Any] = []
        self.block_sums: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # cos, arccos (sums) and tokens
        self.column_sums: dict[tuple, dict[str, torch.Tensor]] = {}  # key -> abs / sq sums per column, tokens

    def on_batch(self, index: int, masks: dict[str, torch.Tensor | None]) -> None:
        device = next(self.adapter.model.parameters()).device
        self.rows = {stack: None if mask is None else
                     (tuple(mask.shape), mask.reshape(-1).nonzero().squeeze(1).to(device))
                     for stack, mask in masks.items()}

    def _tokens(self, x: torch.Tensor, stack: str) -> torch.Tensor:
        """[tokens, features] of the real (unpadded) positions."""
        flat = x.reshape(-1, x.shape[-1])
        rows = self.rows.get(stack)
        if rows is not None and rows[0] == tuple(x.shape[:-1]):
            return flat.index_select(0, rows[1])
        return flat

    def attach(self) -> "StatisticsCollector":
        layer_needs = self.needs.get("layers", set()) & {"cosine", "angular"}
        for stack, index, block in self.adapter.all_blocks():
            if layer_needs:
                self.handles.append(block.register_forward_hook(
                    self._block_hook((stack, index), stack, "angular" in layer_needs), with_kwargs=True))
            targets = []
            if self.needs.get("heads", set()) & {"act_abs", "act_norm"}:
                targets += [(("heads", stack, view.kind, index), view.linear(view.o), self.needs["heads"])
                            for view in self.adapter.attentions(block)]
            if self.needs.get("channels", set()) & {"act_abs", "act_norm"}:
                mlp = self.adapter.mlp(block)
                targets.append((("channels", stack, None, index), mlp.linear(mlp.down), self.needs["channels"]))
            for key, linear, needs in targets:
                self.handles.append(linear.register_forward_pre_hook(self._column_hook(key, stack, needs)))
        return self

    def _block_hook(self, key, stack, angular: bool):
        from core.adapters import block_hidden_in, block_hidden_out

        sums = self.block_sums.setdefault(key, {})

        def hook(module, args, kwargs, output):
            h_in = self._tokens(block_hidden_in(args, kwargs).detach(), stack)
            h_out = self._tokens(block_hidden_out(output).detach(), stack)
            cos = token_cosines(h_in, h_out)
            _accumulate(sums, "cos", cos.sum(dtype=torch.float64))
            if angular:
                _accumulate(sums, "arccos", torch.arccos(cos).sum(dtype=torch.float64))
            sums["tokens"] = sums.get("tokens", 0) + cos.numel()

        return hook

    def _column_hook(self, key, stack, needs):
        sums = self.column_sums.setdefault(key, {})

        def hook(module, args):
            x = self._tokens(args[0].detach(), stack)
            if "act_abs" in needs:
                _accumulate(sums, "abs", column_abs_sums(x))
            if "act_norm" in needs:
                _accumulate(sums, "sq", column_square_sums(x))
            sums["tokens"] = sums.get("tokens", 0) + x.shape[0]

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def layer_stats(self, stack: str, num_blocks: int) -> dict[str, torch.Tensor]:
        if not self.block_sums:
            return {}
        stats = {}
        for stat, name, scale in (("cos", "cosine", 1.0), ("arccos", "angular", 1 / math.pi)):
            if all(stat in self.block_sums.get((stack, i), {}) for i in range(num_blocks)):
                stats[name] = torch.stack([
                    self.block_sums[(stack, i)][stat].cpu() * scale / max(self.block_sums[(stack, i)]["tokens"], 1)
                    for i in range(num_blocks)]).float()
        return stats

    def column_stats(self, unit: str, stack: str, kind: str | None, layer: int) -> dict[str, torch.Tensor]:
        sums = self.column_sums.get((unit, stack, kind, layer), {})
        tokens = max(int(sums.get("tokens", 0)), 1)
        stats = {}
        if "abs" in sums:
            stats["act_abs"] = sums["abs"].cpu() / tokens
        if "sq" in sums:
            stats["act_norm"] = sums["sq"].cpu().sqrt()
        return stats


def token_cosines(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a_t, b_t) of each row in float32, clamped to [-1, 1], as `cosine_similarity` defines it (each norm
    clamped at eps), but with one product and one norm per side: that function divides both tensors by their norms
    first, three more full-size passes and copies."""
    dot = (a.float() * b).sum(-1)  # a float32 product even for half-precision activations (1 - cos is small)
    norms = (torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32).clamp_min_(eps)
             * torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32).clamp_min_(eps))
    return (dot / norms).clamp_(-1.0, 1.0)


def column_abs_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum over rows of |x| per column, in float32. On a GPU one norm kernel reads x once; torch's CPU norm kernel
    does not vectorise a reduction over rows (about 10x slower than abs then sum), so the CPU takes two passes."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, 1, dim=0, dtype=torch.float32)
    return x.abs().sum(0, dtype=torch.float32)


def column_square_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum over rows of x^2 per column, in float32; one read of x on a GPU (the squared norm), two on the CPU."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, 2, dim=0, dtype=torch.float32).square_()
    xf = x.float()
    return (xf * xf).sum(0)


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value.clone()


def skip_losses(model, adapter, calib, base_loss: float, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per stack, the calibration-loss increase when each block is replaced by the identity (one pass per block)."""
    from tqdm.auto import tqdm

    from core.adapters import block_hidden_in
    from compress.calibration import calibration_pass

    def identity(module, args, kwargs, output):
        hidden = block_hidden_in(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden

    blocks = adapter.all_blocks()
    deltas = {stack: torch.zeros(len(adapter.blocks(stack))) for stack in adapter.stacks}
    for stack, index, block in tqdm(blocks, desc="skip-loss", disable=not progress, leave=False):
        handle = block.register_forward_hook(identity, with_kwargs=True)
        try:
            deltas[stack][index] = calibration_pass(model, calib, progress=False) - base_loss
        finally:
            handle.remove()
    return deltas


def score_model(model, batches, scorers: dict[str, str], *, seed: int = 0, progress: bool = True,
                description: str | None = None) -> ImportanceScores:
    """Score `model`'s layers / heads / channels with the named scorers in one streaming calibration pass.

    `batches` is a CalibrationSet (from `calibration_batches`) or a list of input dicts. Hooks are placed where the
    adapter says; a backward pass runs only if a scorer needs gradients, the per-block skip passes only for
    `skip_loss`. The model is left as it was (no hooks, no gradients, same requires_grad flags).
    """
    from core.adapters import get_adapter
    from compress.calibration import as_calibration_set, calibration_pass
    from compress.scorers import LayerContext, UnitContext, check_scores, get_scorer

    unknown_units = [u for u in scorers if u not in ("layers", "heads", "channels")]
    if unknown_units:
        raise UserError(f"cannot score {unknown_units}: units are layers, heads, channels (tokens: compress.vocab)")
    resolved = {unit: get_scorer(unit, name) for unit, name in scorers.items() if name}
    adapter = get_adapter(model)
    needs_by_unit = {unit: set(s.needs) for unit, s in resolved.items()}
    needs = set().union(*needs_by_unit.values()) if resolved else set()
    # scorers without statistics (random, v2_heuristic) need no data at all
    calib = as_calibration_set(batches, model) if needs or batches else None
    needs_grad = "grad" in needs

    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    collector = StatisticsCollector(adapter, needs_by_unit).attach()
    loss = None
    try:
        if needs_grad:
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
        if needs & {"cosine", "angular", "act_abs", "act_norm", "grad", "skip_loss"}:
            loss = calibration_pass(model, calib, on_batch=collector.on_batch, backward=needs_grad,
                                    desc="scoring", progress=progress)
        collector.detach()
        layer_stats = {stack: collector.layer_stats(stack, len(adapter.blocks(stack))) for stack in adapter.stacks}
        if "skip_loss" in needs:
            for stack, deltas in skip_losses(model, adapter, calib, loss, progress).items():
                layer_stats[stack]["skip_loss"] = deltas

        scores = ImportanceScores()
        if "layers" in resolved:
            scorer = resolved["layers"]
            for stack in adapter.stacks:
                n = len(adapter.blocks(stack))
                ctx = LayerContext(stack, n, layer_stats[stack], seed, adapter)
                scores[ImportanceScores.layer_name(stack)] = check_scores(scorer(ctx), n, f"the {stack} stack", scorer)
        for unit in ("heads", "channels"):
            if unit not in resolved:
                continue
            scorer = resolved[unit]
            for stack, index, block in adapter.all_blocks():
                views = adapter.attentions(block) if unit == "heads" else [adapter.mlp(block)]
                for view in views:
                    kind = view.kind if unit == "heads" else None
                    ctx = UnitContext(unit, stack, index, kind, view, collector.column_stats(unit, stack, kind, index),
                                      seed, adapter)
                    scores[ctx.name] = check_scores(scorer(ctx), ctx.num_units, ctx.name, scorer)
    finally:
        collector.detach()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            if needs_grad:
                p.grad = None
        model.train(was_training)

    scores.meta = {
        "scorers": {unit: s.name for unit, s in resolved.items()},
        "model_type": getattr(model.config, "model_type", None),
        "num_tokens": calib.num_tokens if calib is not None else 0,
        "data": description or (calib.description if calib is not None else "none"),
        "calibration_loss": loss,
        "seed": seed,
    }
    return scores
