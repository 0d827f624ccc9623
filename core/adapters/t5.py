"""T5 (v1.0 and v1.1 gated): blocks of `layer[...]` sublayers, one relative position bias per stack held by block 0."""

from __future__ import annotations

from torch import nn

from .base import AttentionLayout, ConfigFields, MLPLayout, separate_qkv
from .encoder_decoder import DEPTHS, EncoderDecoderAdapter

FEED_FORWARD = "layer.-1.DenseReluDense"  # the last sublayer of every block


class T5Adapter(EncoderDecoderAdapter):
    family = "t5"
    label = "T5"
    model_types = ("t5",)
    attention_layouts = (  # encoder blocks have no layer.1.EncDecAttention
        AttentionLayout("layer.0.SelfAttention", "self", separate_qkv("q", "k", "v", "o"), "key_value_proj_dim"),
        AttentionLayout("layer.1.EncDecAttention", "cross", separate_qkv("q", "k", "v", "o"), "key_value_proj_dim"),
    )
    mlp_layouts = (MLPLayout(FEED_FORWARD, down="wo", up="wi_1", gate="wi_0"),  # v1.1, gated
                   MLPLayout(FEED_FORWARD, down="wo", up="wi"))
    block_norms = ("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm")
    final_norms = ("encoder.final_layer_norm", "decoder.final_layer_norm")
    fields = ConfigFields(DEPTHS, hidden="d_model", ffn="d_ff", heads="num_heads", head_dim="d_kv")
    shared_head_set = True

    def _before_keep_blocks(self, stack, keep):
        # Only block 0 owns the relative position bias that every block of the stack uses: hand it on.
        blocks = self.blocks(stack)
        first, new_first = blocks[0].layer[0].SelfAttention, blocks[keep[0]].layer[0].SelfAttention
        if new_first is not first:
            new_first.relative_attention_bias = first.relative_attention_bias
            new_first.has_relative_attention_bias = True
            del first.relative_attention_bias
            first.has_relative_attention_bias = False

    def _update_depth(self, stack, keep):
        super()._update_depth(stack, keep)
        for i, block in enumerate(self.blocks(stack)):
            block.layer[0].SelfAttention.has_relative_attention_bias = i == 0

    def _after_heads(self, view, q_heads, num_kv):
        attn = view.module
        attn.n_heads = len(q_heads)
        attn.inner_dim = attn.n_heads * attn.key_value_proj_dim
        if getattr(attn, "has_relative_attention_bias", False):
            bias = attn.relative_attention_bias
            new = nn.Embedding(bias.num_embeddings, len(q_heads), device=bias.weight.device, dtype=bias.weight.dtype)
            new.weight.data.copy_(bias.weight.data.index_select(1, q_heads.to(bias.weight.device)))
            attn.relative_attention_bias = new

    def _after_hidden(self, size):
        super()._after_hidden(size)
        for stack in (self.model.encoder, self.model.decoder):
            stack.config.d_model = size  # each stack holds its own copy of the config
        # a tied T5 scales the decoder output by model_dim ** -0.5 before the LM head
        self.model.model_dim = size
        for _, _, block in self.all_blocks():
            for view in self.attentions(block):
                view.module.d_model = size
