"""Objective mixtures with configurable weights, and Dynamic UL2 (D-UL2, OpenBA-V2 stages S1-S4) reweighting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from core.errors import UserError
from pretrain.objectives.base import Objective, SpecialIds
from pretrain.objectives.denoising import DUL2_INITIAL_PROPORTIONS, DUL2_TARGET_LOSSES, MixDenoising, \
    SuffixDenoising, ul2_denoisers
from pretrain.objectives.losses import per_objective_validation_loss, token_mean_loss


def _valid_weights(weights: Sequence[float], count: int, what: str) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(f"{what}: {len(weights)} weights for {count} objectives")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{what} must be non-negative and sum to a positive number, got {weights}")
    return weights


def check_weights(weights: Sequence[float], count: int, what: str = "objective weights") -> list[float]:
    """Normalised weights; UserError unless there is one finite, non-negative weight per objective summing > 0."""
    weights = _valid_weights(weights, count, what)
    total = sum(weights)
    return [w / total for w in weights]


class ObjectiveMixture:
    """Objectives sampled with weights (normalised); `set_weights` is how a schedule such as D-UL2 reweights them."""

    def __init__(self, objectives: Sequence[Objective], weights: Sequence[float] | None = None):
        if not objectives:
            raise UserError("an objective mixture needs at least one objective")
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise UserError(f"objective names must be unique, got {names}")
        self.objectives = list(objectives)
        self.weights = check_weights([1.0] * len(objectives) if weights is None else weights, len(objectives))

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def set_weights(self, weights: Sequence[float]) -> None:
        self.weights = check_weights(weights, len(self.objectives))

    def sample(self, rng: np.random.Generator) -> Objective:
        return self.objectives[int(rng.choice(len(self.objectives), p=np.asarray(self.weights)))]

    def state_dict(self) -> dict:
        return {"weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        """The saved weights exactly as saved: they were normalised once already, and dividing by their sum again
        can move them by a rounding error (their float sum is not always exactly 1), after which every sampled
        objective and D-UL2 update of a resumed run would differ from the run that saved them."""
        weights = _valid_weights(state["weights"], len(self.objectives), "saved objective weights")
        if abs(sum(weights) - 1.0) > 1e-9:
            raise UserError(f"saved objective weights must sum to 1, got {weights} (sum {sum(weights)})")
        self.weights = weights


def ul2_mixture(ids: SpecialIds, weights: Sequence[float] = DUL2_INITIAL_PROPORTIONS,
                input_eos: bool = False) -> ObjectiveMixture:
    """The seven OpenBA UL2 denoisers with D-UL2's initial proportions."""
    return ObjectiveMixture(ul2_denoisers(ids, input_eos=input_eos), weights)


def mix_denoising_mixture(ids: SpecialIds, mixed_share: float = 0.2, density: float = 0.5,
                          s_density: float = 0.25) -> ObjectiveMixture:
    """O-UL2 (OpenBA-V2 stage S5): ~20% mix-denoising samples, ~80% pure S-denoising."""
    return ObjectiveMixture([MixDenoising(ids, density=density), SuffixDenoising("S", s_density, ids)],
                            [mixed_share, 1.0 - mixed_share])


@dataclass
class DynamicUL2Config:
    """D-UL2 (OpenBA-V2, stages S1-S4): after each evaluation, reweight denoisers towards those above target loss."""

    target_losses: list[float] = field(default_factory=lambda: list(DUL2_TARGET_LOSSES))
    """Per-denoiser target validation loss in UL2_DENOISERS order (OpenBA-V2 code defaults)."""
    initial_proportions: list[float] = field(default_factory=lambda: list(DUL2_INITIAL_PROPORTIONS))
    """Starting sampling proportions (OpenBA-V2 code defaults: mostly S, then X-1)."""
    eta: float = 1.0
    """Step size on the loss gap (paper: 1). Larger moves proportions faster and noisier."""
    smoothing: float = 1e-4
    """c in p = (1 - c) * alpha + c / K (paper: 1e-4): keeps every denoiser sampled."""


def dynamic_ul2_update(proportions: Sequence[float], losses: Sequence[float], target_losses: Sequence[float],
                       eta: float = 1.0, smoothing: float = 1e-4) -> list[float]:
    """alpha = softmax(log p + eta * (loss - target)); return (1 - c) * alpha + c / K."""
    if not (len(proportions) == len(losses) == len(target_losses)):
        raise UserError(f"D-UL2 needs one proportion, loss and target per denoiser, got "
                        f"{len(proportions)}, {len(losses)}, {len(target_losses)}")
    p = torch.tensor(check_weights(proportions, len(proportions), "D-UL2 proportions"), dtype=torch.float64)
    gap = torch.tensor(losses, dtype=torch.float64) - torch.tensor(target_losses, dtype=torch.float64)
    alpha = torch.softmax(p.clamp_min(1e-300).log() + eta * gap, dim=0)
    return ((1 - smoothing) * alpha + smoothing / len(p)).tolist()


class DynamicUL2:
    """An `eval_fn(model, step)` for the trainer: measure per-denoiser validation loss on fixed batches, then apply
    the D-UL2 update to `mixture` (whose weights live in the data iterator's state, so resume keeps them)."""

    def __init__(self, mixture: ObjectiveMixture, validation_batches: Mapping[str, Sequence[Mapping[str, Any]]],
                 config: DynamicUL2Config | None = None, loss_fn=token_mean_loss):
        self.mixture = mixture
        self.config = config or DynamicUL2Config()
        if len(self.config.target_losses) != len(mixture.objectives):
            raise UserError(f"D-UL2 has {len(self.config.target_losses)} target losses for "
                            f"{len(mixture.objectives)} denoisers")
        missing = [n for n in mixture.names if n not in validation_batches]
        if missing:
            raise UserError(f"D-UL2 needs validation batches for every denoiser; missing {missing}")
        self.validation_batches = validation_batches
        self.loss_fn = loss_fn

    def __call__(self, model, step: int) -> dict[str, float]:
        losses = per_objective_validation_loss(model, self.validation_batches, self.loss_fn)
        ordered = [losses[n] for n in self.mixture.names]
        new = dynamic_ul2_update(self.mixture.weights, ordered, self.config.target_losses, self.config.eta,
                                 self.config.smoothing)
        self.mixture.set_weights(new)
        metrics = {f"val_loss/{n}": losses[n] for n in self.mixture.names}
        metrics.update({f"weight/{n}": w for n, w in zip(self.mixture.names, self.mixture.weights)})
        metrics["val_loss"] = float(np.mean(ordered))
        return metrics
