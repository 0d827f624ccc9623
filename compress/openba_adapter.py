"""Adapter for the OpenBA family (core/openba): fused per-head qkv, fused [gate; up] FFN, per-layer shapes allowed."""

from __future__ import annotations

from compress.adapters import Adapter, AttentionView, MLPView, ModelShape, Projection, register_adapter


@register_adapter
class OpenBAAdapter(Adapter):
    family = "openba"
    model_types = ("openba",)
    stacks = ("encoder", "decoder")
    per_layer_shapes = True  # OpenBAConfig stores a width and head count per layer
    reported_size_counts_embedding_once = True  # the paper's 14.6B / 3.8B / 3.4B count lm_head as the embedding

    def _stack(self, stack):
        return self.model.encoder if stack == "encoder" else self.model.decoder

    def blocks(self, stack):
        return self._stack(stack).block

    def _set_blocks(self, stack, blocks):
        self._stack(stack).block = blocks

    def attentions(self, block):
        views = []
        self_attn = block.self_attn
        views.append(AttentionView(self_attn, "self", self_attn.num_heads, self_attn.num_heads, self_attn.head_dim,
                                   [Projection("qkv", parts=3), Projection("o", dim=1)], o="o"))
        cross = getattr(block, "inter_attn", None)
        if cross is not None:
            projections = [Projection("q"), Projection("kv", parts=2), Projection("o", dim=1)]
            views.append(AttentionView(cross, "cross", cross.num_heads, cross.num_heads, cross.head_dim, projections, o="o"))
        return views

    def mlp(self, block):
        return MLPView(block.mlp, down="fc_out", fused_gate_up="fc_in")

    def _update_depth(self, stack, keep):
        prefix = "encoder" if stack == "encoder" else "decoder"
        for field in (f"{prefix}_ffn_sizes", f"{prefix}_head_counts"):
            values = getattr(self.config, field)
            if values is not None:
                setattr(self.config, field, [values[i] for i in keep])
        if stack == "encoder":
            self.config.num_layers = len(keep)
        else:
            self.config.num_decoder_layers = len(keep)

    def _after_heads(self, view, q_heads, num_kv):
        view.module.num_heads = len(q_heads)

    def sync_widths(self):
        for stack in self.stacks:
            blocks = self.blocks(stack)
            for block in blocks:
                counts = {view.num_heads for view in self.attentions(block)}
                if len(counts) > 1:
                    raise ValueError("an OpenBA decoder layer keeps the same head count in self- and cross-attention")
            self._write_widths(stack, [self.mlp(b).width for b in blocks],
                               [self.attentions(b)[0].num_heads for b in blocks], None)

    def _write_widths(self, stack, widths, heads, kv):
        prefix = "encoder" if stack == "encoder" else "decoder"
        setattr(self.config, f"{prefix}_ffn_sizes", widths)
        setattr(self.config, f"{prefix}_head_counts", heads)
        layers = [self.mlp(b).width for _, _, b in self.all_blocks()]
        all_heads = [v.num_heads for _, _, b in self.all_blocks() for v in self.attentions(b)]
        if len(set(layers)) == 1 and len(set(all_heads)) == 1:
            # uniform again: keep the plain fields that the public checkpoints use
            self.config.ffn_hidden_size, self.config.num_heads = layers[0], all_heads[0]
            for field in ("encoder_ffn_sizes", "decoder_ffn_sizes", "encoder_head_counts", "decoder_head_counts"):
                setattr(self.config, field, None)

    def hidden_norms(self):
        names = ("input_layernorm", "post_attn_layernorm", "post_inter_attn_layernorm")
        norms = [getattr(block, n) for _, _, block in self.all_blocks() for n in names if hasattr(block, n)]
        return norms + [self.model.encoder.final_layernorm, self.model.decoder.final_layernorm]

    def _after_hidden(self, size):
        self.config.hidden_size = size

    @classmethod
    def config_shape(cls, config):
        # per-layer shapes (after a per-layer prune) are summarised by their mean: planning works on uniform shapes
        shapes = config.layer_shapes(decoder=False) + config.layer_shapes(decoder=True)
        heads = round(sum(h for h, _ in shapes) / len(shapes))
        ffn = round(sum(f for _, f in shapes) / len(shapes))
        depths = {"encoder": config.num_layers, "decoder": config.num_decoder_layers}
        return ModelShape(depths, config.hidden_size, ffn, heads, heads, config.kv_channels, config.vocab_size)

    @classmethod
    def shape_problem(cls, shape):
        if shape.kv_heads != shape.heads:
            return "OpenBA has no grouped kv heads"
        return None

    @classmethod
    def _shape_fields(cls, config, shape):
        return {"num_layers": shape.depths["encoder"], "num_decoder_layers": shape.depths["decoder"],
                "hidden_size": shape.hidden, "ffn_hidden_size": shape.ffn, "num_heads": shape.heads,
                "kv_channels": shape.head_dim, "vocab_size": shape.vocab, "encoder_ffn_sizes": None,
                "decoder_ffn_sizes": None, "encoder_head_counts": None, "decoder_head_counts": None}
