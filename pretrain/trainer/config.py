"""What a training run is asked to do: `TrainConfig`, checked when it is made, so a bad value fails before any
model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from pretrain.schedules import SCHEDULES, check_schedule


@dataclass
class TrainConfig:
    """How to train. Defaults are OpenBA-V2's continual pretraining (S1-S4) where the paper gives one."""

    steps: int = 1000
    """Optimizer steps (one step = micro_batch_size * grad_accum_steps * world size sequences)."""
    lr: float = 1e-4
    """Peak learning rate: V2 S1-S4 use 1e-4 (S5 5e-5; ProLong 1e-5; LOGO 5e-7 with LoRA)."""
    min_lr: float = 5e-5
    """Final rate of the cosine/WSD decay: V2 S1-S4 5e-5 (S5 1e-5). ProLong uses 0.1 * lr."""
    warmup_steps: int = 0
    """Linear warm-up steps. V2 does not state one for recovery (weights are trained already); ProLong warms up
    10%, LOGO 120 of 1200 steps. Raise it when training from scratch."""
    schedule: str = "cosine"
    """"cosine" (V2), "wsd" (warmup-stable-decay: extendable runs) or "constant"."""
    decay_fraction: float = 0.1
    """wsd only: share of the steps spent decaying from lr to min_lr at the end."""
    weight_decay: float = 0.1
    """AdamW weight decay (V2 and ProLong 0.1; LOGO 0.05); not applied to biases and norms."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (0.9, 0.95) as in V2, ProLong and most LLM pretraining; beta2 0.95 tolerates loss spikes."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (V2: 1.0); 0 turns clipping off (the norm is still logged)."""
    micro_batch_size: int = 8
    """Sequences per forward pass per process: what fits in memory. Informational for the plain path (the data
    decides the batch shape); DeepSpeed needs it for its own bookkeeping."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step per process: raises the batch size without more memory."""
    bf16: bool | str = "auto"
    """bfloat16 compute: "auto" turns it on when the GPU supports it (off on CPU, where it is slower)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: ~30% slower, much less memory (LOGO trains with it)."""
    deepspeed: int | str | None = None
    """None: plain torch (several processes all-reduce gradients). 1, 2 or 3: DeepSpeed ZeRO stage (3 shards
    parameters too; LOGO uses 3). A path: a DeepSpeed JSON config, used as given except batch sizes."""
    offload_optimizer: bool = False
    """ZeRO only: keep optimizer states on the CPU (fits ~3x larger models per GPU; slower steps)."""
    save_every: int = 500
    """Checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep; older ones are deleted after a newer one is complete."""
    eval_every: int = 0
    """Call eval_fn every this many steps (and at the end); 0: only at the end. D-UL2 re-weights here."""
    log_every: int = 10
    """Write a metrics.jsonl line (loss, lr, grad norm, tokens/s, per-objective loss) every this many steps."""
    seed: int = 0
    """Seeds python, numpy and torch at the start of a fresh run (rank r uses seed + r)."""
    attn_implementation: str = "auto"
    """"auto": flash_attention_2 when flash-attn is installed and on CUDA, else sdpa (eager if the model has no
    sdpa); or name one ("sdpa", "eager", "flash_attention_2"). The run's log and train_info.json say which ran."""

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise UserError("keep_checkpoints must be at least 1 (the latest checkpoint is what resumes)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.bf16 not in (True, False, "auto"):
            raise UserError(f"bf16 must be true, false or \"auto\", got {self.bf16!r}")
        if isinstance(self.deepspeed, int) and self.deepspeed not in (0, 1, 2, 3):
            raise UserError(f"deepspeed must be a ZeRO stage 0-3 or a JSON config path, got {self.deepspeed}")
        if isinstance(self.deepspeed, str) and not Path(self.deepspeed).is_file():
            raise UserError(f"deepspeed config file not found: {self.deepspeed}")
        if self.offload_optimizer and self.deepspeed is None:
            raise UserError("offload_optimizer needs DeepSpeed: set deepspeed to a ZeRO stage (1-3)")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        check_schedule(steps=self.steps, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                       schedule=self.schedule, decay_fraction=self.decay_fraction)
