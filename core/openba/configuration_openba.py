"""`OpenBAConfig`: the shape of an OpenBA model, with field names that mirror the public OpenBA config.

Defaults are the released OpenBA-15B (arXiv 2309.10706; github.com/OpenNLG/OpenBA `model_config.json`), with one
change of meaning: here `ffn_hidden_size` is the SwiGLU width itself (11008 for 15B). The public config stores
Megatron's 16384 and the public model code turns it into int(2/3 * 16384) rounded up to a multiple of 256 = 11008
(`megatron_swiglu_width`). A width that is stated, not derived, is what structured pruning needs: a pruned layer
says how many channels it keeps. A public release is converted first (`python -m core.openba.convert`), which
states the width in the config.

Optional per-layer shapes (`encoder_ffn_sizes`, `decoder_ffn_sizes`, `encoder_head_counts`,
`decoder_head_counts`) let a pruner leave layers of different widths; `None` means every layer has
`ffn_hidden_size` channels and `num_heads` heads. A decoder layer's head count applies to its self- and
cross-attention alike. `kv_channels` (the head dimension) is never per layer: pruning removes heads, not dims.
"""

from transformers import PreTrainedConfig


def megatron_swiglu_width(ffn_hidden_size: int, multiple_of: int = 256) -> int:
    """The SwiGLU width the public OpenBA code builds from a Megatron `ffn_hidden_size` (16384 -> 11008)."""
    width = int(2 * ffn_hidden_size / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class OpenBAConfig(PreTrainedConfig):
    """Configuration of an OpenBA encoder-decoder (shallow encoder, deep decoder, RoPE, SwiGLU, pre-LN LayerNorm).

    Fields, with the 15B value and why one would change it:
        vocab_size: 250368 (mT5 SentencePiece + 103 task tokens, padded to 128). Vocabulary pruning lowers it.
        hidden_size: 4096. kv_channels: 128 (head dim; attention width = num_heads * kv_channels = 5120, not hidden).
        ffn_hidden_size: 11008, the SwiGLU width (see the module docstring for the public 16384).
        num_layers: 12 encoder layers. num_decoder_layers: 36 decoder layers (None: same as the encoder).
        num_heads: 40. hidden_dropout / attention_dropout: 0.1 as released; tests and short runs set 0.
        add_qkv_bias: True (q/k/v and o). add_ffn_bias: False. add_lm_head_bias: True.
        max_seq_length / decoder_max_seq_length: 1024 / 512, the lengths the model was trained at. They are
            documentation for data pipelines, not limits: RoPE is computed for any position.
        rope_theta: 10000, self-attention only (cross-attention has no positions). Long-context stages raise it.
        layernorm_epsilon: 1e-5 (torch's LayerNorm default, which the public code uses).
        initializer_range: 0.02, std of the normal init of fresh weights (loading ignores it).
        encoder_ffn_sizes, decoder_ffn_sizes, encoder_head_counts, decoder_head_counts: per-layer shapes, or None.
        segment_attention: "auto" (default), "mask" or "flash_varlen": how attention over packed documents
            (segment ids) runs. "mask" builds SDPA/eager masks; "flash_varlen" calls flash-attn's varlen kernel on the
            non-padding tokens (CUDA, fp16/bf16); "auto" takes flash_varlen where it applies, else masks. Set
            "mask" to compare the two or to rule the kernel out when debugging.
    """

    model_type = "openba"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers", "head_dim": "kv_channels"}

    vocab_size: int = 250368
    hidden_size: int = 4096
    kv_channels: int = 128
    ffn_hidden_size: int = 11008
    num_layers: int = 12
    num_decoder_layers: int | None = 36
    num_heads: int = 40
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    add_qkv_bias: bool = True
    add_ffn_bias: bool = False
    add_lm_head_bias: bool = True
    max_seq_length: int = 1024
    decoder_max_seq_length: int = 512
    rope_theta: float = 10000.0
    layernorm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    encoder_ffn_sizes: list[int] | None = None
    decoder_ffn_sizes: list[int] | None = None
    encoder_head_counts: list[int] | None = None
    decoder_head_counts: list[int] | None = None
    segment_attention: str = "auto"
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    tie_word_embeddings: bool = False
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        if self.segment_attention not in ("auto", "mask", "flash_varlen"):
            raise ValueError(f"segment_attention must be auto, mask or flash_varlen, got {self.segment_attention!r}")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name, depth in (
            ("encoder_ffn_sizes", self.num_layers),
            ("encoder_head_counts", self.num_layers),
            ("decoder_ffn_sizes", self.num_decoder_layers),
            ("decoder_head_counts", self.num_decoder_layers),
        ):
            sizes = getattr(self, name)
            if sizes is not None:
                sizes = [int(size) for size in sizes]
                if len(sizes) != depth:
                    raise ValueError(f"{name} has {len(sizes)} entries but the stack has {depth} layers")
                setattr(self, name, sizes)
        super().__post_init__(**kwargs)

    def layer_shapes(self, decoder: bool) -> list[tuple[int, int]]:
        """(head count, FFN width) of every layer of one stack, with the uniform values filled in."""
        depth = self.num_decoder_layers if decoder else self.num_layers
        heads = self.decoder_head_counts if decoder else self.encoder_head_counts
        ffns = self.decoder_ffn_sizes if decoder else self.encoder_ffn_sizes
        heads = heads if heads is not None else [self.num_heads] * depth
        ffns = ffns if ffns is not None else [self.ffn_hidden_size] * depth
        return list(zip(heads, ffns))

    def get_text_config(self, decoder=None, encoder=None):
        # transformers sizes generation caches from this view's `num_hidden_layers`; its flat encoder-decoder
        # path keeps our encoder depth there (the same bug breaks T5 with num_layers != num_decoder_layers).
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and config is not self:
            config.num_layers = self.num_decoder_layers
        return config
