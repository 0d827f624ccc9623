"""The training loop shared by continual pretraining and LOGO: one process on CPU, or DeepSpeed ZeRO 1-3 anywhere.

The same `Trainer.train` runs in a plain process (torch AdamW; used by the CPU tests) and under `deepspeed`,
`torchrun` or `accelerate launch`, which set RANK/WORLD_SIZE/LOCAL_RANK in the environment. What the loop promises:

* Token-averaged loss: each micro-batch's mean loss is weighted by its number of target tokens, and the weights of
  all micro-batches of a step on all ranks are summed first, so the update follows sum(token losses) / tokens rather
  than a mean of means (which over-weights short batches).
* Exact resume: every `save_every` steps a checkpoint holds model, optimizer, scheduler, the python/numpy/torch RNG
  states of every rank and the data position; a resumed run continues the same loss curve.
* Bad input fails before anything is written: an empty dataset, sequences longer than the model supports, a
  teacher with another vocabulary, a loss or data pipeline that rejects its own config (their `check` hook).

Contracts for callers (the objectives, data and LOGO code):
    data        iterable of batches: dict[str, Tensor] plus optional non-tensor keys ("objective": str, for
                per-objective loss logging). Under several processes each process passes its own shard. With
                `state_dict()` / `load_state_dict(state)` (plain containers, numbers, strings and tensors: it is
                read back with `torch.load(weights_only=True)`) the position resumes exactly and `iter(data)` after
                `load_state_dict` continues from it; without them the trainer skips the batches already used.
                A fresh `iter(data)` after exhaustion starts a new epoch.
    loss_fn     `loss_fn(model, batch) -> (mean loss Tensor, metrics dict[str, float])`; default
                `model(**tensors).loss`. Optional attributes: `check(model)` (raise UserError on bad setup),
                `teacher` (a model whose vocabulary must equal the student's unless the loss has a
                `student_to_teacher` id map).
    weight_fn   `weight_fn(batch) -> float` the micro-batch's share of the step (default: its target tokens,
                labels != -100, shifted for causal models; or its row count when there are no labels).
    eval_fn     `eval_fn(model, step) -> metrics dict`, every `eval_every` steps and at the end, model in eval mode
                (D-UL2 re-weighting hooks in here).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import config_hash
from core.errors import UserError
from core.launch import launch
from pretrain.schedules import SCHEDULES, build_scheduler, check_schedule

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TRAIN_INFO = "train_info.json"


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


# ---------------------------------------------------------------------------------------------------- processes


@dataclass
class Runtime:
    """Where this process sits: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_threads_per_process(cores: int, local_processes: int, threads_set: bool) -> int | None:
    """Several training processes on one CPU each default to every core, and their OpenMP threads then spin against
    each other (measured on 2 cores, 2 processes: ~35x slower than one thread each). Their share of the cores, unless
    the user set OMP_NUM_THREADS; None leaves torch's default (one process, or threads set by the user)."""
    if threads_set or local_processes <= 1:
        return None
    return max(1, cores // local_processes)


def setup_runtime(need_process_group: bool) -> Runtime:
    """Read the launcher's environment (torchrun, deepspeed and accelerate all set it) and join the process group.

    A single process that uses DeepSpeed still needs a (one-member) process group; it gets one on a free port.
    """
    process = launch()
    world_size, rank, local_rank = process.world_size, process.rank, process.local_rank
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        threads = cpu_threads_per_process(os.cpu_count() or 1, process.local_world_size,
                                          "OMP_NUM_THREADS" in os.environ)
        if threads is not None:
            torch.set_num_threads(threads)
    if (world_size > 1 or need_process_group) and not torch.distributed.is_initialized():
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Runtime(rank, world_size, local_rank, device)


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def _all_sum(runtime: Runtime, value: float) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def _all_gather(runtime: Runtime, obj: Any) -> list[Any]:
    if not runtime.distributed:
        return [obj]
    gathered = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------------------- batches


def tensors_of(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensor entries of a batch (moved to `device`); strings such as "objective" stay behind."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def target_tokens(batch: dict[str, Any], encoder_decoder: bool) -> int:
    """Tokens the loss averages over: labels != -100, minus the first column for causal LMs (they shift labels)."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        labels = labels if encoder_decoder else labels[..., 1:]
        return int((labels != -100).sum())
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def count_tokens(batch: dict[str, Any]) -> int:
    """Tokens the model reads (not padding): encoder/prompt side plus the decoder side of seq2seq batches."""
    total = 0
    for ids, mask in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
        if isinstance(batch.get(mask), torch.Tensor):
            total += int(batch[mask].sum())
        elif isinstance(batch.get(ids), torch.Tensor):
            total += batch[ids].numel()
    if "decoder_input_ids" not in batch and isinstance(batch.get("labels"), torch.Tensor) and "input_ids" in batch:
        if batch["labels"].shape != batch["input_ids"].shape:  # seq2seq with decoder inputs made from labels
            total += int((batch["labels"] != -100).sum())
    return total


def objective_of(batch: dict[str, Any]) -> str | None:
    objective = batch.get("objective")
    if isinstance(objective, str):
        return objective
    if isinstance(objective, (list, tuple)) and objective:
        names = set(map(str, objective))
        return names.pop() if len(names) == 1 else "mixed"
    return None


def default_loss(model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The model's own token-mean cross-entropy (batch must carry labels). No KV cache: with one, transformers
    stops detecting packed documents from restarting position ids and lets them attend to each other."""
    tensors = tensors_of(batch)
    if "labels" not in tensors:
        raise UserError("batches have no 'labels': give the Trainer a loss_fn, or data that makes labels")
    return model(**tensors, use_cache=False).loss, {}


class DataStream:
    """Batches from `data` across epochs, with a position that a checkpoint saves and a resume restores."""

    def __init__(self, data: Iterable):
        self.data = data
        self.stateful = callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))
        self.epoch = 0
        self.in_epoch = 0  # batches taken in the current epoch
        self.total = 0
        self._iterator: Iterator | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "in_epoch": self.in_epoch, "total": self.total}
        if self.stateful:
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.in_epoch, self.total = state["epoch"], state["in_epoch"], state["total"]
        self._iterator = iter(self.data) if not self.stateful else None
        if self.stateful:
            self.data.load_state_dict(state["data"])
        else:  # a plain iterable: replay the epoch up to where it stopped
            self._iterator = itertools.islice(self._iterator, self.in_epoch, None)

    def next(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self.data)
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.total == 0:
                raise UserError("the training data is empty: no batch came out of it") from None
            if self.in_epoch == 0:
                raise UserError(f"the training data ran out after {self.total} batches and yields nothing when "
                                "iterated again (a one-shot iterator?); pass a re-iterable or more data") from None
            self.epoch += 1
            self.in_epoch = 0
            self._iterator = iter(self.data)
            return self.next()
        if not isinstance(batch, dict):
            raise UserError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
        self.in_epoch += 1
        self.total += 1
        return batch


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` reads back."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- engines


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed, as in Megatron/V2."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule_kwargs(config: TrainConfig) -> dict[str, Any]:
    return dict(steps=config.steps, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                schedule=config.schedule, decay_fraction=config.decay_fraction)


class TorchEngine:
    """Plain torch: AdamW, gradient accumulation by summing, an all-reduce (sum) of gradients across processes."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, config: TrainConfig, runtime: Runtime):
        self.model, self.config, self.runtime = model, config, runtime
        fused = runtime.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, eps=config.eps, fused=fused or None)
        self.scheduler = build_scheduler(self.optimizer, **_schedule_kwargs(config))
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
            lr_scheduler=lambda opt: build_scheduler(opt, **_schedule_kwargs(config)),
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

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)


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


def resolve_bf16(config: TrainConfig, runtime: Runtime) -> bool:
    if config.bf16 == "auto":
        return runtime.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.bf16 and runtime.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("bf16 is on but this GPU does not support bfloat16; set bf16: false or \"auto\"")
    return bool(config.bf16)


def resolve_attn_implementation(requested: str, model, device: torch.device) -> str:
    """The attention kernel to use: flash-attn 2 (varlen, packed documents) on CUDA when installed, else SDPA."""
    import importlib.util

    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        if getattr(model, "_supports_flash_attn", False):
            return "flash_attention_2"
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def apply_attn_implementation(model, requested: str, device: torch.device) -> str:
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


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` directory is a save that did not finish)."""
    root = Path(work_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _load_plain(path: Path) -> Any:
    """A state saved with torch.save, read back without unpickling arbitrary objects (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing: the checkpoint is incomplete or from another "
                        "run") from None
    except Exception as err:  # the unpickler's refusal has several types
        raise UserError(f"cannot read {path} safely ({str(err).splitlines()[0]}); a data state_dict must hold only "
                        "dicts, lists, numbers, strings and tensors") from None


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(work_dir)
    return dirs[-1] if dirs else None


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step; eval keys start with "eval/") and TensorBoard if installed."""

    def __init__(self, work_dir: Path, resume_step: int, enabled: bool):
        self.path = work_dir / METRICS
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run drops what came after its checkpoint, so no step appears twice
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, in order."""
    path = Path(work_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Trains `model` on `data` with `loss_fn` (see the module docstring for the contracts)."""

    def __init__(self, model, config: TrainConfig, data: Iterable, loss_fn: Callable | None = None,
                 eval_fn: Callable | None = None, weight_fn: Callable | None = None):
        if not isinstance(config, TrainConfig):
            raise UserError(f"config must be a TrainConfig, got {type(config).__name__}")
        if data is None:
            raise UserError("the training data is missing (data=None)")
        if hasattr(data, "__len__") and len(data) == 0:
            raise UserError("the training data is empty: no batch came out of it")
        self.model = model
        self.config = config
        self.data = data
        self.loss_fn = loss_fn or default_loss
        self.eval_fn = eval_fn
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.weight_fn = weight_fn or (lambda batch: target_tokens(batch, self.encoder_decoder))
        self.engine: TorchEngine | DeepSpeedEngine | None = None
        self.runtime: Runtime | None = None

    # ------------------------------------------------------------------ checks before anything is written

    def preflight(self) -> None:
        """Everything that can be found wrong before training: loss hooks, teacher vocabulary."""
        check = getattr(self.loss_fn, "check", None)
        if callable(check):
            check(self.model)
        check = getattr(self.data, "check", None)
        if callable(check):
            check()
        teacher = getattr(self.loss_fn, "teacher", None)
        if teacher is not None and getattr(self.loss_fn, "student_to_teacher", None) is None:
            check_same_vocabulary(teacher, self.model)

    def check_batch(self, batch: dict[str, Any]) -> None:
        from pretrain.long_context import check_sequence_lengths

        check_sequence_lengths(self.model.config, batch)

    # ------------------------------------------------------------------ the loop

    def train(self, work_dir: str | Path, stop_at: int | None = None) -> dict[str, Any]:
        """Train to `config.steps`, resuming from `work_dir/checkpoints/` when a checkpoint is there.

        `stop_at` ends this call early after that step, with a checkpoint (a planned preemption: the schedule
        still spans `config.steps`, and the next call resumes).
        """
        config = self.config
        work_dir = Path(work_dir)
        self.preflight()
        resume = latest_checkpoint(work_dir)
        state = json.loads((resume / "trainer_state.json").read_text()) if resume else None
        if state is not None:
            self._check_resumable(state, resume)
        runtime = self.runtime = setup_runtime(need_process_group=config.deepspeed is not None)
        if state is not None and state.get("world_size") != runtime.world_size:
            raise UserError(f"checkpoint {resume} was written by {state.get('world_size')} processes, this run has "
                            f"{runtime.world_size}; resume with the same number of processes")

        self.model.to(runtime.device)
        attn = apply_attn_implementation(self.model, config.attn_implementation, runtime.device)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model.config, "use_cache"):
                self.model.config.use_cache = False
        if state is None:
            seed_everything(config.seed + runtime.rank)
        engine = self.engine = (DeepSpeedEngine if config.deepspeed is not None else TorchEngine)(
            self.model, config, runtime)
        stream = DataStream(self.data)
        step, tokens = 0, 0
        if state is not None:
            engine.load(resume)
            step, tokens = state["step"], state["tokens"]
            set_rng_state(_load_plain(resume / f"rng-rank{runtime.rank}.pt"))
            stream.load_state_dict(_load_plain(resume / f"data-rank{runtime.rank}.pt"))

        # the first step's batches are fetched before anything is written: empty data and bad shapes fail clean
        pending = [stream.next() for _ in range(config.grad_accum_steps)] if step < config.steps else []
        for batch in pending:
            self.check_batch(batch)

        info = {
            "attn_implementation": attn, "engine": engine.name, "zero_stage": getattr(engine, "stage", None),
            "world_size": runtime.world_size, "device": str(runtime.device), "bf16": resolve_bf16(config, runtime),
            "gradient_checkpointing": config.gradient_checkpointing, "resumed_from_step": step,
        }
        if runtime.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
            zero = f" ZeRO-{info['zero_stage']}" if info["zero_stage"] is not None else ""
            line = (f"training: {attn} attention, {engine.name}{zero} engine, {runtime.world_size} process(es) on "
                    f"{runtime.device}, bf16 {'on' if info['bf16'] else 'off'}"
                    + (f", resuming at step {step}" if step else ""))
            log.info(line)
            tqdm.write(line)
        metrics_log = MetricsLog(work_dir, step, runtime.is_main)
        module = engine.module
        module.train()

        window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "objectives": {}, "metrics": {}, "seconds": 0.0}
        last: dict[str, Any] = {"step": step, "tokens": tokens}
        eval_metrics: dict[str, Any] = {}
        started = time.perf_counter()
        progress = tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=not runtime.is_main,
                        dynamic_ncols=True)
        try:
            while step < config.steps:
                step_start = time.perf_counter()
                batches = pending or [stream.next() for _ in range(config.grad_accum_steps)]
                pending = []
                for batch in batches:
                    self.check_batch(batch)
                stats = self._train_step(batches)
                step += 1
                tokens += stats["tokens"]
                window["seconds"] += time.perf_counter() - step_start
                self._accumulate(window, stats)
                last = {"step": step, "tokens": tokens, "loss": stats["loss"], "lr": stats["lr"],
                        "grad_norm": stats["grad_norm"], **{f"eval/{k}": v for k, v in eval_metrics.items()}}
                progress.update(1)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                                     tok_s=f"{window['tokens'] / max(window['seconds'], 1e-9):,.0f}")
                if step % max(config.log_every, 1) == 0 or step == config.steps:
                    metrics_log.write(self._window_record(step, tokens, stats, window))
                    window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "objectives": {}, "metrics": {},
                              "seconds": 0.0}
                if self.eval_fn is not None and (
                        (config.eval_every and step % config.eval_every == 0) or step == config.steps):
                    eval_metrics = self._evaluate(step)
                    metrics_log.write({"step": step, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
                    last.update({f"eval/{k}": v for k, v in eval_metrics.items()})  # saved with the checkpoint
                stopping = stop_at is not None and step >= stop_at
                if (config.save_every and step % config.save_every == 0) or step == config.steps or stopping:
                    self.save_checkpoint(work_dir, step, tokens, stream, last)
                if stopping:
                    break
        finally:
            progress.close()
            metrics_log.close()
        seconds = time.perf_counter() - started
        if state is not None and step == state["step"]:  # nothing left to train: report what the run ended with
            last = {**state.get("last", {}), **last}
        return {**last, "seconds": round(seconds, 3)}

    def _check_resumable(self, state: dict[str, Any], resume: Path) -> None:
        engine = "deepspeed" if self.config.deepspeed is not None else "torch"
        if state.get("engine") != engine:
            raise UserError(f"checkpoint {resume} was written by the {state.get('engine')} engine, this run uses "
                            f"{engine}; resume with the same deepspeed setting or use another work dir")
        if state["step"] > self.config.steps:
            raise UserError(f"checkpoint {resume} is at step {state['step']}, beyond steps={self.config.steps}")

    def _train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over this process's micro-batches: token-weighted, gathered across processes."""
        runtime, engine = self.runtime, self.engine
        weights = [float(self.weight_fn(batch)) for batch in batches]
        total_weight = _all_sum(runtime, sum(weights))
        if total_weight <= 0:
            raise UserError("a training step has no target tokens on any process (all labels are -100?)")
        lr = engine.lr()  # the rate this step uses (the scheduler moves on inside engine.step)
        local = {"loss": 0.0, "weight": sum(weights), "tokens": 0, "objectives": {}, "metrics": {}}
        for batch, weight in zip(batches, weights):
            tensors = {**batch, **tensors_of(batch, runtime.device)}
            with engine.autocast():
                loss, metrics = self.loss_fn(engine.module, tensors)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} on process {runtime.rank}")
            engine.backward(loss * (weight / total_weight))
            value = float(loss.detach()) * weight
            local["loss"] += value
            local["tokens"] += count_tokens(batch)
            name = objective_of(batch)
            if name is not None:
                summed, count = local["objectives"].get(name, (0.0, 0.0))
                local["objectives"][name] = (summed + value, count + weight)
            for key, metric in (metrics or {}).items():
                summed, count = local["metrics"].get(key, (0.0, 0.0))
                local["metrics"][key] = (summed + float(metric) * weight, count + weight)
        grad_norm = engine.step()
        merged = {"loss": 0.0, "weight": 0.0, "tokens": 0, "objectives": {}, "metrics": {}}
        for part in _all_gather(runtime, local):
            self._accumulate(merged, part)
        return {**merged, "loss": merged["loss"] / merged["weight"], "loss_sum": merged["loss"],
                "grad_norm": grad_norm, "lr": lr}

    @staticmethod
    def _accumulate(into: dict[str, Any], part: dict[str, Any]) -> None:
        into["loss"] += part.get("loss_sum", part["loss"])
        into["weight"] += part["weight"]
        into["tokens"] += part["tokens"]
        for key in ("objectives", "metrics"):
            for name, (summed, count) in part[key].items():
                old = into[key].get(name, (0.0, 0.0))
                into[key][name] = (old[0] + summed, old[1] + count)

    @staticmethod
    def _window_record(step: int, tokens: int, stats: dict[str, Any], window: dict[str, Any]) -> dict[str, Any]:
        record = {
            "step": step,
            "loss": window["loss"] / max(window["weight"], 1e-12),
            "step_loss": stats["loss"],
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens": tokens,
            "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for name, (summed, count) in sorted(window["objectives"].items()):
            record[f"loss/{name}"] = summed / max(count, 1e-12)
        for name, (summed, count) in sorted(window["metrics"].items()):
            if name not in record:  # a loss_fn's own "loss" is the same token mean; the trainer's wins
                record[name] = summed / max(count, 1e-12)
        return record

    def _evaluate(self, step: int) -> dict[str, Any]:
        module = self.engine.module
        module.eval()
        try:
            with torch.no_grad():
                return dict(self.eval_fn(module, step) or {})
        finally:
            module.train()

    # ------------------------------------------------------------------ saving

    def save_checkpoint(self, work_dir: Path, step: int, tokens: int, stream: DataStream,
                        last: dict[str, Any] | None = None) -> Path:
        """Write checkpoints/step-N through step-N.tmp and a rename, then drop the oldest beyond keep_checkpoints."""
        runtime = self.runtime
        root = Path(work_dir) / CHECKPOINTS
        final = root / f"step-{step:08d}"
        tmp = root / f"step-{step:08d}.tmp"
        if runtime.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier(runtime)
        self.engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{runtime.rank}.pt")
        torch.save(stream.state_dict(), tmp / f"data-rank{runtime.rank}.pt")
        _barrier(runtime)
        if runtime.is_main:
            state = {"step": step, "tokens": tokens, "engine": self.engine.name, "world_size": runtime.world_size,
                     "config_hash": config_hash(self.config), "last": last or {}}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(work_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(runtime)
        return final

    def save_model(self, out_dir: str | Path, tokenizer=None) -> Path | None:
        """Save the trained model (and tokenizer) as a safetensors checkpoint; ZeRO-3 shards are gathered first.

        Every process must call it (gathering is collective); only rank 0 writes.
        """
        from core.checkpoint import save_checkpoint

        if self.engine is None:
            raise UserError("save_model needs a trained model: call train() first")
        module = self.engine.module
        module = getattr(module, "module", module)
        written = None
        with self.engine.gathered():
            if self.runtime.is_main:
                written = save_checkpoint(module, tokenizer, out_dir)
        _barrier(self.runtime)
        return written


def check_same_vocabulary(teacher, student) -> None:
    """Distillation compares logits token by token, so both models must index the same vocabulary."""
    def size(model) -> int:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)

    if size(teacher) != size(student):
        raise UserError(f"the teacher's vocabulary ({size(teacher)} tokens) differs from the student's "
                        f"({size(student)}); distil from a teacher with the student's tokenizer or give a "
                        "student_to_teacher id map")
