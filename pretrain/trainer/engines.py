"""The two ways a step is computed, behind one interface (`Engine`): plain torch, and DeepSpeed ZeRO 1-3.

Both build the same AdamW (no decay on biases and norms) and the same learning-rate schedule from `TrainConfig`,
so switching engines changes memory and speed, not the loss curve. `unwrap` is the one place that knows how a
DeepSpeed engine wraps the model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch

from core.errors import UserError
from pretrain.schedules import build_scheduler
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.deepspeed_config import deepspeed_config
from pretrain.trainer.kernels import resolve_bf16
from pretrain.trainer.process import Runtime


class Engine(Protocol):
    """What the loop needs of an engine."""

    name: str
    """Recorded in checkpoints: a run resumes only with the engine that wrote them."""
    stage: int | None
    """The ZeRO stage (None for plain torch)."""

    @property
    def module(self) -> torch.nn.Module:
        """What the loss is called on (DeepSpeed's engine, so its hooks run); `unwrap` gives the model inside."""

    def autocast(self) -> ContextManager: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss`, already weighted by its share of the global step."""

    def step(self) -> float:
        """End the optimizer step (gradients summed over processes, clipped); the gradient norm before clipping."""

    def lr(self) -> float: ...

    def save(self, directory: Path) -> None:
        """Write model, optimizer and scheduler state into `directory` (every process calls it)."""

    def load(self, directory: Path) -> None: ...

    def gathered(self) -> ContextManager:
        """Inside it every process holds the full parameters (ZeRO-3 shards them)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine; any other model as it is. (No engine exists unless deepspeed was
    imported, so a run without DeepSpeed never imports it here.)"""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def build_engine(model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> Engine:
    """DeepSpeed when `config.deepspeed` names a ZeRO stage or a JSON file, plain torch otherwise."""
    return (DeepSpeedEngine if config.deepspeed is not None else TorchEngine)(model, config, runtime)


def engine_name(config: TrainConfig) -> str:
    return DeepSpeedEngine.name if config.deepspeed is not None else TorchEngine.name


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed, as in Megatron/V2."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return build_scheduler(optimizer, steps=config.steps, lr=config.lr, min_lr=config.min_lr,
                           warmup_steps=config.warmup_steps, schedule=config.schedule,
                           decay_fraction=config.decay_fraction)


class TorchEngine:
    """Plain torch: AdamW, gradient accumulation by summing, an all-reduce (sum) of gradients across processes."""

    name = "torch"
    stage = None

    def __init__(self, model: torch.nn.Module, config: TrainConfig, runtime: Runtime):
        self.model, self.config, self.runtime = model, config, runtime
        fused = runtime.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, eps=config.eps, fused=fused or None)
        self.scheduler = _scheduler(self.optimizer, config)
        self.autocast_dtype = torch.bfloat16 if resolve_bf16(config, runtime) else None
        if runtime.distributed:  # identical starting weights everywhere, whatever each process initialised
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.runtime.distributed:
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                torch.distributed.all_reduce(param.grad)
        limit = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_model

        if self.runtime.is_main:
            save_model(self.model, str(directory / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(directory / "model.safetensors"), device=str(self.runtime.device))
        state = torch.load(directory / "optimizer.pt", map_location=self.runtime.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def gathered(self):
        return contextlib.nullcontext()


class DeepSpeedEngine:
    """DeepSpeed ZeRO: our AdamW and schedule handed to `deepspeed.initialize`, its checkpoints per rank."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, config: TrainConfig, runtime: Runtime):
        import deepspeed

        self.config, self.runtime = config, runtime
        self.ds_config = deepspeed_config(config, runtime)
        optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                      eps=config.eps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: _scheduler(opt, config),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def module(self):
        return self.engine

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the trainer's weights already make a global token mean
        self.engine.backward(loss * self.runtime.world_size, scale_wrt_gas=False)
        self.engine.step()  # only updates at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in {directory}")

    def gathered(self):
        """Full parameters on every rank while inside (ZeRO-3 shards them); other stages hold them whole."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(unwrap(self.engine).parameters()), modifier_rank=None)
