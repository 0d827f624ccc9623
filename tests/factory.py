"""The one place tests get tiny random models (built from configs, no downloads) and the small tokenizers and
checkpoints that go with them.

`tiny_model(family)` is "any tiny model of that family": four blocks of hidden 64 with 8 query heads in 4 kv groups
(GPT-NeoX: 4 heads, ungrouped; T5: 3 encoder and 4 decoder blocks; OpenBA: the `openba-tiny` preset), all over the
same 96-id vocabulary, so a test can feed every family the same `model_inputs`. A test that needs a particular shape says so in its overrides
(`tiny_model("llama", num_hidden_layers=8)`); a given family, seed and overrides always give the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from core.openba import OpenBAForConditionalGeneration, openba_config

VOCAB = 96
FAMILIES = ["llama", "qwen2", "mistral", "gpt_neox", "t5", "openba"]

_DECODER_ONLY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
DEFAULT_SHAPES: dict[str, dict] = {
    "llama": _DECODER_ONLY,
    "qwen2": _DECODER_ONLY,
    "mistral": {**_DECODER_ONLY, "sliding_window": 64},
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=256),
    "t5": dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=4, num_heads=4,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0),
    "openba": dict(vocab_size=VOCAB),  # over the openba-tiny preset: 2 encoder / 6 decoder blocks, hidden 192
}
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    "t5": (T5Config, T5ForConditionalGeneration),
    "openba": (None, OpenBAForConditionalGeneration),  # its config comes from the openba-tiny preset
}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """The config of `family`'s tiny model, with any field overridden."""
    if family not in _CLASSES:
        raise ValueError(f"no tiny {family!r}; families: {', '.join(FAMILIES)}")
    fields = {**DEFAULT_SHAPES[family], **overrides}
    if family == "openba":
        return openba_config("openba-tiny", **fields)
    config_class, _ = _CLASSES[family]
    return config_class(**fields)


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random `family` model in eval mode, its weights fixed by `seed` (the Trainer switches to train mode)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    _, model_class = _CLASSES[family]
    return model_class(config).eval()


def model_inputs(model, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    """Inputs of ids below VOCAB that every family accepts: decoder inputs too for encoder-decoders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    if model.config.is_encoder_decoder:
        decoder_ids = torch.randint(3, VOCAB, (batch, length // 2), generator=generator)
        return {"input_ids": ids, "decoder_input_ids": decoder_ids}
    return {"input_ids": ids}


# ------------------------------------------------------------------------------ checkpoints for the commands

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def save_with_tokenizer(model, directory) -> None:
    """Save `model` beside a word-level tokenizer whose ids (pad, eos, unk, then WORDS) are the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def calibration_file(path: Path) -> Path:
    """Twelve lines of 40 random WORDS: calibration text for a checkpoint saved by `save_with_tokenizer`."""
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=generator))
             for _ in range(12)]
    path.write_text("\n".join(lines))
    return path


BYTE_VOCAB = 3 + 256


def byte_tokenizer(directory=None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (pad 0, eos 1, unk 2, then the 256 bytes): no training, no special tokens added on
    encode, so any text is its plain bytes. Saved to `directory` when one is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{char: 3 + i for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def save_byte_checkpoint(family: str, directory, tokenizer) -> None:
    """A two-block Llama or a 1 + 2 block OpenBA over the byte vocabulary, with room for 1024 positions, saved with
    `tokenizer` by the project's checkpoint writer."""
    from core.checkpoint import save_checkpoint

    if family == "llama":
        model = tiny_model("llama", vocab_size=BYTE_VOCAB, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                           bos_token_id=None)
    elif family == "openba":
        model = tiny_model("openba", vocab_size=BYTE_VOCAB, hidden_size=64, kv_channels=16, num_heads=4,
                           ffn_hidden_size=128, num_layers=1, num_decoder_layers=2, max_seq_length=1024,
                           decoder_max_seq_length=1024)
    else:
        raise ValueError(f"no byte-level checkpoint of {family!r}: llama or openba")
    save_checkpoint(model, tokenizer, directory)
