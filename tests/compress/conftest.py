"""Tiny random models of every supported family, built from configs (no downloads), one per session."""

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def _llama_like(config_cls, model_cls, **extra):
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, **extra)
    return model_cls(config)


def build_tiny(family: str):
    """A tiny random model of `family` in eval mode, deterministic for a given family."""
    torch.manual_seed(0)
    if family == "llama":
        model = _llama_like(LlamaConfig, LlamaForCausalLM)
    elif family == "qwen2":
        model = _llama_like(Qwen2Config, Qwen2ForCausalLM)
    elif family == "mistral":
        model = _llama_like(MistralConfig, MistralForCausalLM, sliding_window=64)
    elif family == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, max_position_embeddings=256)
        model = GPTNeoXForCausalLM(config)
    elif family == "t5":
        config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=4,
                          num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config)
    elif family == "openba":
        from core.openba import openba_config
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_config(openba_config("openba-tiny", vocab_size=VOCAB))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gpt_neox", "t5", "openba"]


def model_inputs(model, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    """Inputs that every family accepts: decoder inputs too for encoder-decoders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, length // 2), generator=generator)}
    return {"input_ids": ids}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
