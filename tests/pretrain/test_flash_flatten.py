"""Packed decoder-only rows under a varlen flash kernel reach the model as one row (transformers reads packed
documents from position ids only at batch size 1); the loss is the per-row loss, so no document saw another."""

from __future__ import annotations

import torch

import pretrain.trainer.loop as loop
from pretrain.packing import for_attention_kernel
from pretrain.trainer import Trainer, TrainConfig
from pretrain.trainer.batches import default_loss
from tests.factory import tiny_model


def packed_batch() -> dict:
    """Two rows of two documents each: positions restart per document, its first label is ignored."""
    torch.manual_seed(3)
    ids = torch.randint(3, 64, (2, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def run_one_step(monkeypatch, attn: str):
    seen = []

    def recording_loss(model, batch):
        seen.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return default_loss(model, batch)

    model = tiny_model("llama", attn_implementation="sdpa")
    # the kernel the trainer believes runs; sdpa still computes, so both layouts can be compared on a CPU
    monkeypatch.setattr(loop, "apply_attn_implementation", lambda m, requested, device: attn)
    trainer = Trainer(model, TrainConfig(steps=1, lr=1e-9, min_lr=0.0, bf16=False, save_every=0, eval_every=0,
                                                 warmup_steps=0),
                      [packed_batch()], loss_fn=recording_loss)
    return trainer, seen


def test_packed_rows_are_flattened_for_a_flash_kernel_and_the_loss_is_unchanged(monkeypatch, tmp_path):
    flash, flash_seen = run_one_step(monkeypatch, "flash_attention_2")
    flash.train(tmp_path / "flash")
    sdpa, sdpa_seen = run_one_step(monkeypatch, "sdpa")
    sdpa.train(tmp_path / "sdpa")
    batch = packed_batch()
    assert flash_seen[0]["input_ids"].shape == (1, 20)  # what the model receives under flash
    assert torch.equal(flash_seen[0]["position_ids"], batch["position_ids"].reshape(1, -1))
    assert sdpa_seen[0]["input_ids"].shape == (2, 10)  # sdpa builds a block-diagonal mask per row
    flat_loss, _ = default_loss(flash.model.eval(), flash_seen[0])
    row_loss, _ = default_loss(sdpa.model.eval(), sdpa_seen[0])
    torch.testing.assert_close(flat_loss, row_loss)


def test_only_packed_decoder_only_batches_of_several_rows_change():
    batch = packed_batch()
    assert for_attention_kernel(batch, "sdpa", False) is batch
    assert for_attention_kernel(batch, "flash_attention_2", True) is batch  # encoder-decoders use segment ids
    padded = {**batch, "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    assert for_attention_kernel(padded, "flash_attention_2", False) is padded
    one_row = {k: v[:1] for k, v in batch.items()}
    assert for_attention_kernel(one_row, "flash_attention_2", False) is one_row
    assert for_attention_kernel(batch, "flash_attention_2", False)["labels"].shape == (1, 20)
