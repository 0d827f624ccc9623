"""Keyword arguments `generate` needs beyond the stock ones, for checkpoints the stock path mishandles.

transformers 5.x sizes the decoder's key/value cache from `config.num_hidden_layers`, which T5 maps to its *encoder*
depth (`num_layers`). A T5 whose decoder is deeper than its encoder (layer pruning that removes more encoder than
decoder blocks, or T5-efficient checkpoints with asymmetric depths) then fails in `generate` with an IndexError at
the first decoder block past the encoder's depth. Empty caches grow with the blocks that use them, so passing them
explicitly generates the same tokens as `use_cache=False`.
"""

from __future__ import annotations

from typing import Any


def needs_own_cache(config) -> bool:
    """True when the stock cache would have fewer layers than the decoder has blocks."""
    if not getattr(config, "is_encoder_decoder", False):
        return False
    decoder_blocks = getattr(config, "num_decoder_layers", None)
    cache_layers = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
    return decoder_blocks is not None and cache_layers is not None and decoder_blocks > cache_layers


def generate_kwargs(model) -> dict[str, Any]:
    """`past_key_values` for `model.generate` when the stock cache would be too small (see the module docstring); {}
    otherwise. A fresh cache per call: a cache holds one generation's keys and values."""
    if not needs_own_cache(model.config):
        return {}
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return {"past_key_values": EncoderDecoderCache(DynamicCache(), DynamicCache())}
