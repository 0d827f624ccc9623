"""The preference loss as the shared Trainer's `loss_fn`: scores the responses, adds a reference for DPO, logs.

`PreferenceObjective(model, batch) -> (loss, metrics)` is what `pretrain.trainer.Trainer` calls; `check(model)` runs
in the trainer's preflight, before anything is written; `rows(batch)` is the micro-batch weight (the loss is a mean
over rows, so micro-batches and ranks are weighted by their row counts).

DPO's reference is the model before training: a frozen copy, or, with LoRA, the same model with its adapters
switched off (no second copy of the weights in memory).
"""

from __future__ import annotations

import contextlib

import torch

from align.losses import LossConfig, ResponseLogps, preference_loss, preferred_nll
from align.packing import mask_kind, response_logps, unwrap
from core.errors import UserError
from pretrain.trainer.engines import unwrap as unwrap_engine


def rows(batch: dict) -> float:
    return float(batch["input_ids"].shape[0])


def _peft_model(model):
    model = unwrap_engine(model)
    return model if hasattr(model, "disable_adapter") else None


class PreferenceObjective:
    """LOGO (or a baseline) on preference batches from `align.batches`."""

    def __init__(self, config: LossConfig, shared_context: bool = True, reference=None, text_weight: float = 0.0):
        self.config = config
        self.shared_context = shared_context
        self.text_weight = text_weight  # x the token-mean NLL of the batch's "text" rows (align.logo.TextRegulariser)
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)

    def check(self, model) -> None:
        if self.config.needs_reference and self.reference is None and _peft_model(model) is None:
            raise UserError("the dpo loss needs a reference model: pass one, or train with LoRA (the adapters are "
                            "switched off to score the reference)")
        if self.shared_context and not getattr(unwrap(model).config, "is_encoder_decoder", False):
            mask_kind(model)

    def _used(self, batch: dict) -> dict:
        keep = self.config.responses_used
        return {**batch, "response_ids": batch["response_ids"][:, :keep], "response_mask": batch["response_mask"][:, :keep]}

    def reference_logps(self, model, batch: dict) -> ResponseLogps:
        with torch.no_grad():
            if self.reference is not None:
                device = next(self.reference.parameters()).device
                moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                return response_logps(self.reference, moved, self.shared_context).detach()
            peft = _peft_model(model)
            context = peft.disable_adapter() if peft is not None else contextlib.nullcontext()
            with context:
                return response_logps(model, batch, self.shared_context).detach()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self._used(batch)
        policy = response_logps(model, batch, self.shared_context, min_responses=self.config.responses_used)
        reference = self.reference_logps(model, batch) if self.config.needs_reference else None
        loss, metrics = preference_loss(self.config, policy, reference)
        if self.text_weight and "text" in batch:
            device = batch["input_ids"].device
            text = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch["text"].items()}
            text_nll = preferred_nll(response_logps(model, text, self.shared_context, min_responses=1)).float()
            loss = loss + self.text_weight * text_nll
            metrics = {**metrics, "loss": loss.item(), "text_nll": text_nll.item()}
        strategies = batch.get("position_strategy")
        if isinstance(strategies, (list, tuple)) and strategies:
            metrics["sparse_positions"] = sum(s == "sparse" for s in strategies) / len(strategies)
        return loss, metrics
