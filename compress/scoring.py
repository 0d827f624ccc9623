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
        if (directory / META_FILE).is_file():
            try:
                meta = json.loads((directory / META_FILE).read_text()).get("meta", {})
            except json.JSONDecodeError as err:
                raise UserError(f"{directory / META_FILE} is not valid JSON: {err}") from None
        return cls(tensors, meta)

    def __repr__(self) -> str:
        return f"ImportanceScores({len(self)} tensors, scorers={self.meta.get('scorers', {})})"


def _num(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
