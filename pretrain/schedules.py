"""Learning-rate schedules with linear warm-up: cosine (OpenBA-V2), warmup-stable-decay (WSD) and constant.

Each schedule is a pure function of the step, so a resumed run recomputes exactly the rate it would have used; the
`LambdaLR` built from it carries only the step counter in its state.

    cosine    warm up to `lr`, then half a cosine down to `min_lr` at the last step (V2 S1-S4: 1e-4 -> 5e-5)
    wsd       warm up, hold `lr`, then decay linearly to `min_lr` over the last `decay_fraction` of the steps; a run
              can be extended from any checkpoint of the stable phase (MiniCPM, arXiv 2404.06395)
    constant  warm up, then hold `lr`
"""

from __future__ import annotations

import math

import torch

from core.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate(step: int, *, steps: int, lr: float, min_lr: float, warmup_steps: int, schedule: str = "cosine",
                  decay_fraction: float = 0.1) -> float:
    """The rate for optimizer step `step` (0-based: the rate used by the first update is `learning_rate(0)`)."""
    if schedule not in SCHEDULES:
        raise UserError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(steps - warmup_steps - 1, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(int(round(steps * decay_fraction)), 1)
    decay_start = steps - decay_steps
    if step < decay_start:
        return lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return lr + (min_lr - lr) * progress


def check_schedule(*, steps: int, lr: float, min_lr: float, warmup_steps: int, schedule: str,
                   decay_fraction: float) -> None:
    """Reject schedules that cannot be what the user meant, before any training."""
    if schedule not in SCHEDULES:
        raise UserError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    if warmup_steps < 0 or (steps > 1 and warmup_steps >= steps):
        raise UserError(f"warmup_steps ({warmup_steps}) must be >= 0 and below steps ({steps})")
    if schedule == "wsd" and not 0.0 < decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1] for the wsd schedule, got {decay_fraction}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps: int, lr: float, min_lr: float, warmup_steps: int,
                    schedule: str = "cosine", decay_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` whose factor makes every param group's rate equal `learning_rate(step)` (groups start at lr)."""
    check_schedule(steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, schedule=schedule,
                   decay_fraction=decay_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)

    def factor(step: int) -> float:
        return learning_rate(step, steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                             schedule=schedule, decay_fraction=decay_fraction) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
