"""The base T5 and OpenBA share: an encoder and a decoder stack, each a `block` list, counted by the same config fields.

Decoder blocks add a cross-attention over the encoder's output; the layouts of a family name it with a path that
encoder blocks lack, so one table describes both stacks.
"""

from __future__ import annotations

from .base import Adapter

DEPTHS = {"encoder": "num_layers", "decoder": "num_decoder_layers"}  # the config fields that count each stack's blocks


class EncoderDecoderAdapter(Adapter):
    """Two stacks, `model.encoder.block` and `model.decoder.block`; depths in `num_layers` / `num_decoder_layers`."""

    stacks = ("encoder", "decoder")
    block_paths = {"encoder": "encoder.block", "decoder": "decoder.block"}
