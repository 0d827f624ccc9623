"""Packing examples into fixed-length rows with document-aware attention, and padded batches to compare against.

A packed row holds several examples (documents, or objective examples cut from them) back to back. Attention must
not cross them and positions restart per example, so each example sees exactly what it would see alone:

- decoder-only (transformers' Llama family): `position_ids` restart at 0 per example and `attention_mask` is left
  out. transformers 5 then finds the examples from the positions (`masking_utils.find_packed_sequence_indices`) and
  builds a block-diagonal causal mask for sdpa/eager, and its flash-attention path turns the same positions into
  `cu_seqlens` for `flash_attn_varlen_func` (batch size 1 only: use `flatten_rows`). Padding at a row's end is one
  more "example" with its own restarting positions and no loss.
- encoder-decoder (OpenBA): `encoder_segment_ids` / `decoder_segment_ids` (1, 2, ... per example, 0 = padding);
  the model builds the masks from them (core/openba/modeling_openba.py), `position_ids` / `decoder_position_ids` restart
  per example and `decoder_input_ids` are shifted right per example (the first token of each sees the start token,
  not the previous example's end).

Loss is token-averaged over all target tokens of a batch (`objectives.token_mean_loss`); the first label of each
decoder-only example is ignored because it would be predicted from the previous example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """A row being filled: token lists per side (decoder-only rows use only the `inputs` side)."""

    inputs: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    input_segments: list[int] = field(default_factory=list)
    input_positions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    decoder_inputs: list[int] = field(default_factory=list)
    target_segments: list[int] = field(default_factory=list)
    target_positions: list[int] = field(default_factory=list)
    examples: int = 0

    def add_decoder_only(self, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        self.examples += 1
        self.inputs += input_ids
        # the first token would be predicted from the previous example's last token
        self.labels += [IGNORE_INDEX] + list(labels[1:])
        self.input_segments += [self.examples] * len(input_ids)
        self.input_positions += range(len(input_ids))

    def add_encoder_decoder(self, input_ids: Sequence[int], labels: Sequence[int], decoder_start: int) -> None:
        self.examples += 1
        self.inputs += input_ids
        self.input_segments += [self.examples] * len(input_ids)
        self.input_positions += range(len(input_ids))
        self.targets += labels
        self.decoder_inputs += [decoder_start] + list(labels[:-1])
        self.target_segments += [self.examples] * len(labels)
        self.target_positions += range(len(labels))


def _pad(values: list[int], length: int, fill: int) -> list[int]:
    if len(values) > length:
        raise ValueError(f"row of {len(values)} tokens exceeds its length {length}")
    return values + [fill] * (length - len(values))


def _pad_positions(positions: list[int], length: int) -> list[int]:
    """Padding gets positions 0, 1, ... of its own, so position-based packing detection sees it as a separate span."""
    return positions + list(range(length - len(positions)))


def fitted_length(longest: int, limit: int, multiple: int) -> int:
    """The longest row rounded up to `multiple` (kernels like aligned shapes), never past the configured `limit`."""
    return min(-(-max(longest, 1) // multiple) * multiple, limit)


def collate_packed(rows: Sequence[PackedRow], encoder_decoder: bool, input_length: int, target_length: int | None,
                   pad_id: int, fit_to_rows: bool = False, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Tensors for packed rows (see the module docstring for which keys each architecture gets).

    `fit_to_rows` (encoder-decoder): each side is as long as its longest row (rounded up to `multiple`, at most
    the configured length) instead of the configured length. A denoiser's target/input ratio is fixed (S: ~1/3,
    X-1: ~1), so with fixed 570/380 sides one of them is mostly padding whatever the denoiser mix; fitted sides
    hold only the real tokens and their rounding."""
    tensor = lambda lists: torch.tensor(lists, dtype=torch.long)  # noqa: E731
    if encoder_decoder and fit_to_rows:
        input_length = fitted_length(max(len(r.inputs) for r in rows), input_length, multiple)
        target_length = fitted_length(max(len(r.targets) for r in rows), target_length, multiple)
    if not encoder_decoder:
        return {
            "input_ids": tensor([_pad(r.inputs, input_length, pad_id) for r in rows]),
            "labels": tensor([_pad(r.labels, input_length, IGNORE_INDEX) for r in rows]),
            "position_ids": tensor([_pad_positions(r.input_positions, input_length) for r in rows]),
        }
    encoder_segments = tensor([_pad(r.input_segments, input_length, 0) for r in rows])
    decoder_segments = tensor([_pad(r.target_segments, target_length, 0) for r in rows])
    # the padding masks change nothing next to the segment ids; they let token counters skip padding
    return {
        "input_ids": tensor([_pad(r.inputs, input_length, pad_id) for r in rows]),
        "attention_mask": (encoder_segments != 0).long(),
        "encoder_segment_ids": encoder_segments,
        "position_ids": tensor([_pad(r.input_positions, input_length, 0) for r in rows]),
        "labels": tensor([_pad(r.targets, target_length, IGNORE_INDEX) for r in rows]),
        "decoder_input_ids": tensor([_pad(r.decoder_inputs, target_length, pad_id) for r in rows]),
        "decoder_attention_mask": (decoder_segments != 0).long(),
        "decoder_segment_ids": decoder_segments,
        "decoder_position_ids": tensor([_pad(r.target_positions, target_length, 0) for r in rows]),
    }


def collate_padded(features: Sequence[dict[str, list[int]]], encoder_decoder: bool, input_length: int,
                   target_length: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the fixed lengths (plain UL2 / causal batches, the packing baseline)."""
    tensor = lambda lists: torch.tensor(lists, dtype=torch.long)  # noqa: E731
    batch = {
        "input_ids": tensor([_pad(f["input_ids"], input_length, pad_id) for f in features]),
        "attention_mask": tensor([_pad([1] * len(f["input_ids"]), input_length, 0) for f in features]),
    }
    label_length = target_length if encoder_decoder else input_length
    batch["labels"] = tensor([_pad(f["labels"], label_length, IGNORE_INDEX) for f in features])
    return batch


def flatten_rows(batch: dict) -> dict:
    """Packed decoder-only rows as one row of batch*length tokens: flash-attention's position-id path in
    transformers (`_is_packed_sequence`) only handles batch size 1. Equivalent under sdpa/eager too."""
    return {k: (v.reshape(1, -1) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def for_attention_kernel(batch: dict, attn_implementation: str, encoder_decoder: bool) -> dict:
    """The batch as the attention kernel needs it. Under a varlen flash kernel, packed decoder-only rows (positions
    that restart per example, no attention mask) become one row: transformers reads the examples from position ids
    only at batch size 1, and at batch size > 1 it would let one document attend to another. Anything else, and
    sdpa/eager (which build block-diagonal masks per row), pass unchanged."""
    input_ids = batch.get("input_ids")
    packed = "position_ids" in batch and "attention_mask" not in batch
    if (encoder_decoder or not packed or not isinstance(input_ids, torch.Tensor) or input_ids.shape[0] == 1
            or not str(attn_implementation).startswith("flash")):
        return batch
    return flatten_rows(batch)


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index per token (0, 1, ...) from positions that restart per example (transformers' own rule)."""
    from transformers.masking_utils import find_packed_sequence_indices

    found = find_packed_sequence_indices(position_ids)
    return torch.zeros_like(position_ids) if found is None else found


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 wherever the segment id changes (the rule OpenBA applies to its segment ids)."""
    from core.openba.modeling_openba import segment_positions

    return segment_positions(segment_ids)


def document_attention_mask(query_segments: torch.Tensor, key_segments: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (batch, 1, query, key) mask, True = may attend: same segment, and key <= query when causal.

    The explicit form of what the position-id and segment-id paths compute; passing it as a 4D `attention_mask`
    works for any transformers model (used by tests and for models whose mask code ignores positions)."""
    mask = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    if causal:
        q, k = query_segments.shape[-1], key_segments.shape[-1]
        mask = mask & torch.ones(q, k, dtype=torch.bool, device=mask.device).tril()
    return mask


def padding_stats(batch: dict, pad_id: int) -> dict[str, int]:
    """Real and total token slots of a batch, both sides for encoder-decoder batches (pad ids are never text)."""
    stats = {"tokens": int((batch["input_ids"] != pad_id).sum()), "slots": batch["input_ids"].numel()}
    if "decoder_segment_ids" in batch or batch["labels"].shape != batch["input_ids"].shape:
        stats["target_tokens"] = int((batch["labels"] != IGNORE_INDEX).sum())
        stats["target_slots"] = batch["labels"].numel()
    return stats


def non_padding_share(stats: dict[str, int]) -> float:
    """Share of token slots (all sides together) that hold real tokens."""
    return (stats["tokens"] + stats.get("target_tokens", 0)) / max(stats["slots"] + stats.get("target_slots", 0), 1)
