"""GPT-NeoX (Pythia): a fused per-head [q, k, v] projection, a plain (ungated) MLP, head size tied to hidden size."""

from __future__ import annotations

import dataclasses

from .base import AttentionLayout, DecoderOnlyAdapter, MLPLayout, PerBlockField, Projection

FIXED_HEAD_SIZE = "GPT-NeoX derives its head size from hidden_size / num_attention_heads"


class GPTNeoXAdapter(DecoderOnlyAdapter):
    family = "gpt_neox"
    label = "GPT-NeoX"
    model_types = ("gpt_neox",)
    block_paths = {"decoder": "gpt_neox.layers"}
    attention_layouts = (AttentionLayout("attention", "self", (Projection("query_key_value", parts=3),
                                                               Projection("dense", dim=1)), head_dim="head_size"),)
    mlp_layouts = (MLPLayout("mlp", down="dense_4h_to_h", up="dense_h_to_4h"),)
    block_norms = ("input_layernorm", "post_attention_layernorm")
    final_norms = ("gpt_neox.final_layer_norm",)
    fields = dataclasses.replace(DecoderOnlyAdapter.fields, per_block=(PerBlockField("layer_types"),))
    supports_head_pruning = False
    supports_hidden_pruning = False

    @classmethod
    def head_pruning_reason(cls):
        return f"{FIXED_HEAD_SIZE}, so heads cannot be dropped alone"

    @classmethod
    def hidden_pruning_reason(cls):
        return f"{FIXED_HEAD_SIZE}, so the hidden size is fixed"

    @classmethod
    def shape_problem(cls, shape):
        if shape.heads * shape.head_dim != shape.hidden or shape.kv_heads != shape.heads:
            return ("GPT-NeoX keeps heads x head size = hidden size and no grouped kv heads: "
                    "only depth, FFN and vocab change")
        return None
