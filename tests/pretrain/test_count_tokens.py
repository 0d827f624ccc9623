"""Tokens per batch for the training log's throughput: each side of a batch counted once, padding left out."""

import torch

from pretrain.trainer.batches import count_tokens


def test_each_side_counts_once_from_its_mask_ids_or_labels():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[4, 5, -100], [6, -100, -100]])
    decoder_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # decoder-only: labels have the input's shape and are not a second side
    assert count_tokens({"input_ids": ids, "attention_mask": mask, "labels": ids}) == 8
    # seq2seq fed from labels: the labels that are not -100
    assert count_tokens({"input_ids": ids, "attention_mask": mask, "labels": labels}) == 8 + 3
    # a decoder mask without decoder ids counts the decoder once (it was counted twice: mask and labels)
    assert count_tokens({"input_ids": ids, "attention_mask": mask, "labels": labels,
                         "decoder_attention_mask": decoder_mask}) == 8 + 3
    # decoder ids without a mask: every position
    assert count_tokens({"input_ids": ids, "decoder_input_ids": torch.ones(2, 3, dtype=torch.long),
                         "labels": labels}) == 10 + 6
