"""OpenBA (core/openba): fused per-head qkv, fused [gate; up] FFN, and a width and head count per layer allowed."""

from __future__ import annotations

from .base import AttentionLayout, ConfigFields, MLPLayout, PerBlockField, Projection
from .encoder_decoder import DEPTHS, EncoderDecoderAdapter

PER_LAYER_LISTS = ("encoder_ffn_sizes", "encoder_head_counts", "decoder_ffn_sizes", "decoder_head_counts")


class OpenBAAdapter(EncoderDecoderAdapter):
    family = "openba"
    label = "OpenBA"
    model_types = ("openba",)
    attention_layouts = (
        AttentionLayout("self_attn", "self", (Projection("qkv", parts=3), Projection("o", dim=1)), head_dim="head_dim"),
        AttentionLayout("inter_attn", "cross", (Projection("q"), Projection("kv", parts=2), Projection("o", dim=1)),
                        head_dim="head_dim"),
    )
    mlp_layouts = (MLPLayout("mlp", down="fc_out", fused_gate_up="fc_in"),)
    block_norms = ("input_layernorm", "post_attn_layernorm", "post_inter_attn_layernorm")
    final_norms = ("encoder.final_layernorm", "decoder.final_layernorm")
    fields = ConfigFields(DEPTHS, hidden="hidden_size", ffn="ffn_hidden_size", heads="num_heads",
                          head_dim="kv_channels",
                          per_block=tuple(PerBlockField(name, name.split("_")[0], "width") for name in PER_LAYER_LISTS))
    per_layer_shapes = True
    reported_size_counts_embedding_once = True  # the paper's 14.6B / 3.8B / 3.4B count lm_head as the embedding

    def _after_heads(self, view, q_heads, num_kv):
        view.module.num_heads = len(q_heads)

    def sync_widths(self):
        """Each layer's FFN width and head count into the per-layer lists; once every layer is alike again, the plain
        `ffn_hidden_size` / `num_heads` fields alone, as the public checkpoints have them."""
        for stack in self.stacks:
            blocks = self.blocks(stack)
            heads = []
            for block in blocks:
                counts = {view.num_heads for view in self.attentions(block)}
                if len(counts) > 1:
                    raise ValueError("an OpenBA decoder layer keeps the same head count in self- and cross-attention")
                heads.append(counts.pop())
            setattr(self.config, f"{stack}_ffn_sizes", [self.mlp(b).width for b in blocks])
            setattr(self.config, f"{stack}_head_counts", heads)
        widths = {self.mlp(b).width for _, _, b in self.all_blocks()}
        all_heads = {v.num_heads for _, _, b in self.all_blocks() for v in self.attentions(b)}
        if len(widths) == 1 and len(all_heads) == 1:
            self.config.ffn_hidden_size, self.config.num_heads = widths.pop(), all_heads.pop()
            for name in PER_LAYER_LISTS:
                setattr(self.config, name, None)

    @classmethod
    def config_shape(cls, config):
        # per-layer shapes (after a per-layer prune) are summarised by their mean: planning works on uniform shapes
        shape = super().config_shape(config)
        layers = config.layer_shapes(decoder=False) + config.layer_shapes(decoder=True)
        shape.heads = shape.kv_heads = round(sum(h for h, _ in layers) / len(layers))
        shape.ffn = round(sum(f for _, f in layers) / len(layers))
        return shape
