"""Named OpenBA shapes: the released 15B model and a tiny model of the same proportions for tests.

`openba-15b` -- 12 encoder / 36 decoder layers, hidden 4096, 40 heads of 128 (width 5120), SwiGLU width 11008.
    The FFN width is 11008, not the paper's d_ff 16384: the public code builds int(2/3 * 16384) rounded up to 256
    = 11008 (`megatron_swiglu_width`), and only 11008 reproduces the paper's 14.6B (OpenBA README, "Model
    Structure" table). That figure counts the embedding once, as Megatron trained it (the LM head was the input
    embedding plus a bias; the HF conversion copies it into an untied `lm_head`). Counted that way the preset has
    14.57B parameters (0.2% from 14.6B); as an untied HF model it has 15.59B. With width 16384 it would be 17.74B
    (18.76B untied), 21% off.
`openba-tiny` -- the same shape in miniature: 2 encoder / 6 decoder layers (1:3 as 12:36), hidden 192, 8 heads of
    32 so the attention width 256 differs from hidden, SwiGLU 512 (the 15B ratio 11008/4096 gives 516). 8.29M
    parameters with vocabulary 8192, 3.2M of them in the embedding and LM head; hidden 256 would give 13M. The
    vocabulary is an override because it must equal the tokenizer's piece count. Dropout 0: tiny models train for
    seconds in tests, where dropout only adds noise.
"""

import torch

from .configuration_openba import OpenBAConfig

PRESETS: dict[str, dict] = {
    "openba-15b": {
        "vocab_size": 250368,
        "hidden_size": 4096,
        "kv_channels": 128,
        "ffn_hidden_size": 11008,
        "num_layers": 12,
        "num_decoder_layers": 36,
        "num_heads": 40,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "max_seq_length": 1024,
        "decoder_max_seq_length": 512,
    },
    "openba-tiny": {
        "vocab_size": 8192,
        "hidden_size": 192,
        "kv_channels": 32,
        "ffn_hidden_size": 512,
        "num_layers": 2,
        "num_decoder_layers": 6,
        "num_heads": 8,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "max_seq_length": 1024,
        "decoder_max_seq_length": 1024,
    },
}


def openba_config(name: str, **overrides) -> OpenBAConfig:
    """The config of preset `name`, with any field overridden (e.g. `vocab_size=len(tokenizer)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown OpenBA preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return OpenBAConfig(**{**PRESETS[name], **overrides})


def count_parameters(config: OpenBAConfig) -> int:
    """Parameters of `OpenBAForConditionalGeneration(config)`, counted on the meta device (no memory, no time)."""
    from .modeling_openba import OpenBAForConditionalGeneration

    with torch.device("meta"):
        model = OpenBAForConditionalGeneration(config)
    return sum(parameter.numel() for parameter in model.parameters())
