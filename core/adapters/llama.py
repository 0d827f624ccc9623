"""Llama, Qwen2 and Mistral: `model.layers[i]` with `self_attn.{q,k,v,o}_proj` (grouped kv heads) and a gated MLP."""

from __future__ import annotations

import dataclasses

from .base import AttentionLayout, DecoderOnlyAdapter, MLPLayout, PerBlockField, separate_qkv


class LlamaAdapter(DecoderOnlyAdapter):
    family = "llama"
    label = "Llama"
    model_types = ("llama",)
    block_paths = {"decoder": "model.layers"}
    attention_layouts = (AttentionLayout("self_attn", "self", separate_qkv(), head_dim="head_dim"),)
    mlp_layouts = (MLPLayout("mlp", down="down_proj", up="up_proj", gate="gate_proj"),)
    block_norms = ("input_layernorm", "post_attention_layernorm")
    final_norms = ("model.norm",)
    # head_dim is stated because the default is hidden_size // num_attention_heads, which pruning breaks
    fields = dataclasses.replace(
        DecoderOnlyAdapter.fields, kv_heads="num_key_value_heads", head_dim="head_dim",
        per_block=(PerBlockField("layer_types"), PerBlockField("max_window_layers", rule="count")))
    hidden_divisible_by_heads = True  # LlamaConfig refuses to load unless hidden_size % num_attention_heads == 0

    def _after_heads(self, view, q_heads, num_kv):
        view.module.num_key_value_groups = len(q_heads) // num_kv

    @classmethod
    def shape_problem(cls, shape):
        problem = super().shape_problem(shape)
        if problem is None and cls.hidden_divisible_by_heads and shape.hidden % shape.heads:
            problem = f"LlamaConfig needs hidden_size ({shape.hidden}) divisible by the head count ({shape.heads})"
        return problem


class Qwen2MistralAdapter(LlamaAdapter):
    """Qwen2 and Mistral: Llama's layout without LlamaConfig's hidden_size % heads rule."""

    model_types = ("qwen2", "mistral")
    hidden_divisible_by_heads = False
