"""The DeepSpeed JSON config of a run: built from `TrainConfig` (ZeRO stage, optimizer offload), or the user's own
file; either way the batch sizes and clipping come from the TrainConfig (and bf16, unless the file sets it), so a
DeepSpeed run steps like a plain one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import UserError
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.kernels import resolve_bf16
from pretrain.trainer.process import Runtime


def deepspeed_config(config: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """The DeepSpeed JSON config for a TrainConfig (or the user's file with our batch sizes and clipping)."""
    if isinstance(config.deepspeed, str):
        try:
            ds = json.loads(Path(config.deepspeed).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"deepspeed config {config.deepspeed} is not valid JSON: {err}") from None
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise UserError(f"deepspeed config {config.deepspeed} sets '{key}': the trainer builds these from "
                                "TrainConfig (lr, betas, schedule); remove it")
    else:
        zero: dict[str, Any] = {"stage": int(config.deepspeed)}
        if config.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": runtime.device.type == "cuda"}
        if zero["stage"] == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds = {"zero_optimization": zero}
    bf16 = resolve_bf16(config, runtime)
    ds.update({
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "train_batch_size": config.micro_batch_size * config.grad_accum_steps * runtime.world_size,
        "gradient_clipping": config.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # our torch AdamW runs on the offloaded states; DeepSpeedCPUAdam would need a compiled extension
        "zero_force_ds_cpu_optimizer": False,
    })
    ds.setdefault("bf16", {"enabled": bf16})
    return ds
