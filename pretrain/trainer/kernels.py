"""What the run computes with on its device: bfloat16 or not, and which attention kernel."""

from __future__ import annotations

import importlib.util

import torch

from core.errors import UserError
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.process import Runtime


def resolve_bf16(config: TrainConfig, runtime: Runtime) -> bool:
    """Whether autocast (plain torch) or DeepSpeed computes in bfloat16: "auto" only where the GPU supports it."""
    if config.bf16 == "auto":
        return runtime.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.bf16 and runtime.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("bf16 is on but this GPU does not support bfloat16; set bf16: false or \"auto\"")
    return bool(config.bf16)


def resolve_attn_implementation(requested: str, model, device: torch.device) -> str:
    """The attention kernel to use: flash-attn 2 (varlen, packed documents) on CUDA when installed, else SDPA."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        if getattr(model, "_supports_flash_attn", False):
            return "flash_attention_2"
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def apply_attn_implementation(model, requested: str, device: torch.device) -> str:
    """Switch `model` to the resolved kernel; "auto" falls back to eager where that kernel fails to load."""
    name = resolve_attn_implementation(requested, model, device)
    current = getattr(model.config, "_attn_implementation", None)
    if current != name:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as err:
            if requested != "auto":
                raise UserError(f"attn_implementation {name!r} is not available: {str(err).splitlines()[0]}") from None
            name = "eager"
            model.set_attn_implementation(name)
    return getattr(model.config, "_attn_implementation", name) or name
