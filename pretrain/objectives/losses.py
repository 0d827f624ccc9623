"""Token-averaged cross-entropy for any batch this package makes, and per-objective validation loss."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from core.errors import UserError
from pretrain.objectives.base import IGNORE_INDEX


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids", "decoder_attention_mask",
              "decoder_position_ids", "encoder_segment_ids", "decoder_segment_ids")


def model_inputs(model, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a batch that go into the model (not labels, "objective" or counters), and use_cache=False;
    decoder inputs for encoder-decoders are the labels shifted right, as the model itself would make them."""
    inputs = {k: batch[k] for k in MODEL_KEYS if isinstance(batch.get(k), torch.Tensor)}
    if "encoder_segment_ids" in inputs and not reads_segment_ids(model):
        raise UserError(f"{type(model).__name__} cannot take packed encoder-decoder rows: set packed: false (only "
                        f"OpenBA reads segment ids; transformers' T5 has one encoder mask for self- and cross-attention)")
    # a cache (transformers creates one whenever config.use_cache) turns off position-based packing detection in
    # `masking_utils`: packed decoder-only rows would silently attend across documents
    inputs["use_cache"] = False
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def reads_segment_ids(model) -> bool:
    """Whether the model's forward takes `encoder_segment_ids` by name: a model that only swallows unknown keywords
    (`**kwargs`) would ignore them and let packed examples attend to each other."""
    import inspect

    for wrapper in ("_orig_mod", "module"):  # torch.compile and DDP / DeepSpeed wrappers forward any keyword
        model = getattr(model, wrapper, model)
    return "encoder_segment_ids" in inspect.signature(type(model).forward).parameters


def shifted_labels(model, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: as is for encoder-decoders, shifted left by one for decoder-only models."""
    if getattr(model.config, "is_encoder_decoder", False):
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def on_model_device(model, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with its tensors on the model's device (fixed validation batches are kept on the CPU)."""
    from pretrain.trainer import tensors_of

    return {**batch, **tensors_of(dict(batch), next(model.parameters()).device)}


def token_mean_loss(model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-averaged cross-entropy over all target tokens of the batch (packed or not), in float32.

    A `loss_fn(model, batch) -> (loss, metrics)` for the trainer; metrics carry the token count so that gradient
    accumulation can weight micro-batches by tokens.
    """
    logits = model(**model_inputs(model, batch)).logits
    labels = shifted_labels(model, batch["labels"].to(logits.device))
    tokens = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / tokens.clamp_min(1)
    return loss, {"loss": float(loss.detach()), "target_tokens": int(tokens)}


@torch.no_grad()
def per_objective_validation_loss(model, batches_by_objective: Mapping[str, Sequence[Mapping[str, Any]]],
                                  loss_fn=token_mean_loss) -> dict[str, float]:
    """Token-weighted validation loss per objective (what D-UL2 reweights by); restores the model's train mode."""
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for name, batches in batches_by_objective.items():
            total, tokens = 0.0, 0
            for batch in batches:
                loss, metrics = loss_fn(model, on_model_device(model, batch))
                n = metrics.get("target_tokens", 1)
                total += float(loss) * n
                tokens += n
            losses[name] = total / max(tokens, 1)
    finally:
        model.train(was_training)
    return losses
