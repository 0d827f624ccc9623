"""What the loop reads: batches (their tensors, target tokens, objective name, default loss) and `DataStream`, the
data's position across epochs that a checkpoint saves and a resume restores."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from core.errors import UserError


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
    """Tokens the model reads (not padding): encoder/prompt side plus the decoder side of seq2seq batches, each
    counted once (from its mask, else its ids, else, for a decoder fed from labels, the labels that are not -100)."""
    def side(ids: str, mask: str) -> int | None:
        if isinstance(batch.get(mask), torch.Tensor):
            return int(batch[mask].sum())
        if isinstance(batch.get(ids), torch.Tensor):
            return batch[ids].numel()
        return None

    total = side("input_ids", "attention_mask") or 0
    decoder = side("decoder_input_ids", "decoder_attention_mask")
    labels = batch.get("labels")
    if decoder is None and isinstance(labels, torch.Tensor) and isinstance(batch.get("input_ids"), torch.Tensor):
        if labels.shape != batch["input_ids"].shape:  # seq2seq with decoder inputs made from labels
            decoder = int((labels != -100).sum())
    return total + (decoder or 0)


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
