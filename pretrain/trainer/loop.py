"""The training loop (`Trainer`) shared by continual pretraining and LOGO.

The same `Trainer.train` runs in a plain process (torch AdamW; used by the CPU tests) and under `deepspeed`,
`torchrun` or `accelerate launch`, which set RANK/WORLD_SIZE/LOCAL_RANK in the environment. What the loop promises:

* Token-averaged loss: each micro-batch's mean loss is weighted by its number of target tokens, and the weights of
  all micro-batches of a step on all ranks are summed first, so the update follows sum(token losses) / tokens rather
  than a mean of means (which over-weights short batches).
* Exact resume: every `save_every` steps a checkpoint holds model, optimizer, scheduler, the python/numpy/torch RNG
  states of every rank and the data position (`checkpointing.py`); a resumed run continues the same loss curve.
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

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from core.errors import UserError
from pretrain.packing import for_attention_kernel
from pretrain.trainer.batches import DataStream, count_tokens, default_loss, objective_of, target_tokens, tensors_of
from pretrain.trainer.checkpointing import (check_resumable, check_world_size, latest_checkpoint, read_trainer_state,
                                            restore, save_training_checkpoint, seed_everything)
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.engines import Engine, build_engine, unwrap
from pretrain.trainer.kernels import apply_attn_implementation, resolve_bf16
from pretrain.trainer.metrics_log import MetricsLog
from pretrain.trainer.process import Runtime, all_gather, all_sum, barrier, setup_runtime

log = logging.getLogger(__name__)

TRAIN_INFO = "train_info.json"


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
        self.engine: Engine | None = None
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
        state = read_trainer_state(resume) if resume else None
        if state is not None:
            check_resumable(resume, state, config)
        runtime = self.runtime = setup_runtime(need_process_group=config.deepspeed is not None)
        if state is not None:
            check_world_size(resume, state, runtime)

        self.model.to(runtime.device)
        self.checkpoint_dtypes = {name: p.dtype for name, p in self.model.named_parameters()}
        self.master_weights_upcast = upcast_half_weights(self.model, config, runtime)
        attn = self.attn = apply_attn_implementation(self.model, config.attn_implementation, runtime.device)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model.config, "use_cache"):
                self.model.config.use_cache = False
        if state is None:
            seed_everything(config.seed + runtime.rank)
        engine = self.engine = build_engine(self.model, config, runtime)
        stream = DataStream(self.data)
        step, tokens = 0, 0
        if state is not None:
            restore(resume, engine, runtime, stream)
            step, tokens = state["step"], state["tokens"]

        # the first step's batches are fetched before anything is written: empty data and bad shapes fail clean
        pending = [stream.next() for _ in range(config.grad_accum_steps)] if step < config.steps else []
        for batch in pending:
            self.check_batch(batch)

        info = {
            "attn_implementation": attn, "engine": engine.name, "zero_stage": engine.stage,
            "world_size": runtime.world_size, "device": str(runtime.device), "bf16": resolve_bf16(config, runtime),
            "gradient_checkpointing": config.gradient_checkpointing, "resumed_from_step": step,
            "master_weights_upcast_from": self.master_weights_upcast,
        }
        if runtime.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
            zero = f" ZeRO-{info['zero_stage']}" if info["zero_stage"] is not None else ""
            line = (f"training: {attn} attention, {engine.name}{zero} engine, {runtime.world_size} process(es) on "
                    f"{runtime.device}, bf16 {'on' if info['bf16'] else 'off'}"
                    + (f", {self.master_weights_upcast} weights trained as float32" if self.master_weights_upcast
                       else "")
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
                    save_training_checkpoint(work_dir, step, tokens, engine, runtime, stream, config, last)
                if stopping:
                    break
        finally:
            progress.close()
            metrics_log.close()
        seconds = time.perf_counter() - started
        if state is not None and step == state["step"]:  # nothing left to train: report what the run ended with
            last = {**state.get("last", {}), **last}
        return {**last, "seconds": round(seconds, 3)}

    def restore_checkpoint_dtype(self, module: torch.nn.Module | None = None) -> None:
        """Cast the float32 master weights of a half-precision checkpoint back to each parameter's own dtype after
        training, so that the saved output keeps the input's dtypes (a bf16 checkpoint does not come out float32,
        twice its size; float32 norms beside bf16 matrices stay float32). ZeRO-3's gathered parameters are left
        alone (views of shards)."""
        if not getattr(self, "master_weights_upcast", None) or getattr(self.engine, "stage", None) == 3:
            return
        dtypes = getattr(self, "checkpoint_dtypes", {})
        for name, parameter in (module if module is not None else self.model).named_parameters():
            dtype = dtypes.get(name)
            if dtype is not None and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)

    def _train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over this process's micro-batches: token-weighted, gathered across processes."""
        runtime, engine = self.runtime, self.engine
        weights = [float(self.weight_fn(batch)) for batch in batches]
        total_weight = all_sum(runtime, sum(weights))
        if total_weight <= 0:
            raise UserError("a training step has no target tokens on any process (all labels are -100?)")
        lr = engine.lr()  # the rate this step uses (the scheduler moves on inside engine.step)
        local = {"loss": 0.0, "weight": sum(weights), "tokens": 0, "objectives": {}, "metrics": {}}
        for batch, weight in zip(batches, weights):
            tensors = {**batch, **tensors_of(batch, runtime.device)}
            tensors = for_attention_kernel(tensors, self.attn, bool(getattr(self.model.config, "is_encoder_decoder",
                                                                            False)))
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
        for part in all_gather(runtime, local):
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

    def save_model(self, out_dir: str | Path, tokenizer=None) -> Path | None:
        """Save the trained model (and tokenizer) as a safetensors checkpoint; ZeRO-3 shards are gathered first.

        Every process must call it (gathering is collective); only rank 0 writes.
        """
        from core.checkpoint import save_checkpoint

        if self.engine is None:
            raise UserError("save_model needs a trained model: call train() first")
        module = unwrap(self.engine.module)
        written = None
        with self.engine.gathered():
            if self.runtime.is_main:
                self.restore_checkpoint_dtype(module)
                written = save_checkpoint(module, tokenizer, out_dir)
        barrier(self.runtime)
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


def upcast_half_weights(model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> str | None:
    """Half-precision trainable weights (an fp16 release, say) become float32 master weights unless DeepSpeed's bf16
    mode keeps master copies itself. Without it, AdamW on fp16 weights has no loss scale: DeepSpeed found the
    gradient norm infinite and skipped every step without failing, plain torch reached a NaN loss. Autocast keeps
    bf16 compute where it is on. Returns the dtype upcast from, or None."""
    half = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)}
    if not half or (config.deepspeed is not None and resolve_bf16(config, runtime)):
        return None
    model.float()
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in half))
