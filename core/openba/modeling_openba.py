"""OpenBA as a transformers model: an asymmetric encoder-decoder (12 encoder / 36 decoder layers at 15B).

Each block is pre-LN with `nn.LayerNorm` (with bias); each stack ends with a final LayerNorm. Self-attention uses RoPE
(positions from 0 in both stacks); cross-attention has no positions. The FFN is SwiGLU without biases; q/k/v/o and
the LM head have biases. The input embedding is shared by both stacks and not tied to the LM head.

Parameter names and fused layouts mirror the public HF port (github.com/OpenNLG/OpenBA, `OpenBA/modeling_openba.py`)
so its checkpoints load (with `ffn_hidden_size=11008`, see configuration_openba.py):

    shared_embedding                               input embedding of both stacks
    {encoder,decoder}.block.N.input_layernorm      LN before self-attention
    {encoder,decoder}.block.N.self_attn.qkv        fused, rows grouped per head: [q_h; k_h; v_h] for head h
    {encoder,decoder}.block.N.self_attn.o
    {encoder,decoder}.block.N.post_attn_layernorm  LN before the MLP (encoder) or the cross-attention (decoder)
    decoder.block.N.inter_attn.q                   cross-attention query
    decoder.block.N.inter_attn.kv                  fused, rows grouped per head: [k_h; v_h]
    decoder.block.N.inter_attn.o
    decoder.block.N.post_inter_attn_layernorm      LN before the decoder MLP
    {encoder,decoder}.block.N.mlp.fc_in            fused [gate; up]: silu(first half) * second half
    {encoder,decoder}.block.N.mlp.fc_out
    {encoder,decoder}.final_layernorm, lm_head

The LayerNorm names are Megatron's ("post" = after the residual add, i.e. before the next sublayer). A pruner
removing head h takes rows h*3d..(h+1)*3d of `qkv` (d = kv_channels), rows h*2d..(h+1)*2d of `kv`, rows h*d..(h+1)*d
of `q` and the same columns of `o`; removing FFN channel c takes rows c and width+c of `fc_in` and column c of
`fc_out`. Head counts and FFN widths may differ per layer (config `*_head_counts`, `*_ffn_sizes`).

Attention runs through transformers' interface: "sdpa" (default) or "eager". Flash-attention is not declared
supported: its padded and varlen paths have not been checked against these two on a GPU.

Packed documents: `encoder_segment_ids` / `decoder_segment_ids` (batch, seq) number the documents of a packed row
1, 2, ... (0 = padding). Encoder self-attention stays within a segment, decoder self-attention is causal within a
segment, cross-attention reaches only the encoder tokens of the same segment, and positions restart per segment
unless given. Under sdpa and eager the masks are built in one broadcast (`segment_mask`, equal to what
transformers' builders make with `same_segment`), under other kernels by the builders with an `and_mask_function`;
positions are never handed to the builders (see `OpenBAStack.forward`). With `config.segment_attention` "auto"
and flash-attn installed, CUDA half-precision tensors take `flash_attn_varlen_func` over the non-padding tokens
instead (`SegmentLayout`).

This file and configuration_openba.py are copied beside the weights of every saved checkpoint (`save_pretrained`),
so stock transformers and lm-eval load it with `trust_remote_code=True` where this project is not installed. Hence
they import nothing but the standard library, torch, transformers and each other; optional packages only inside a
`try` (transformers refuses remote code whose other imports are missing).
"""

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_openba import OpenBAConfig

# What a saved checkpoint names for transformers' Auto classes, and the files `save_pretrained` copies beside the
# weights (this one and its config): together they let stock transformers load the checkpoint with
# `trust_remote_code=True` where this project is not installed. Where it is, the registered classes win.
AUTO_MAP = {
    "AutoConfig": "configuration_openba.OpenBAConfig",
    "AutoModel": "modeling_openba.OpenBAModel",
    "AutoModelForSeq2SeqLM": "modeling_openba.OpenBAForConditionalGeneration",
}
MODEL_CODE_FILES = ("configuration_openba.py", "modeling_openba.py")


def copy_model_code(directory) -> None:
    """Copy the files `AUTO_MAP` names into `directory`, byte for byte: the code that runs here is the code that
    ships (also from a copy loaded as remote code, whose two files sit side by side too)."""
    for name in MODEL_CODE_FILES:
        shutil.copyfile(Path(__file__).with_name(name), Path(directory) / name)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along the last dimension."""
    index = torch.arange(segment_ids.shape[-1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values


def same_segment(query_segments: torch.Tensor, key_segments: torch.Tensor):
    """Mask function for transformers' builders: a query sees keys of its own segment. A padding query (segment
    0) may see every key, so that no row of the mask is empty (its output is never used)."""

    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        query = query_segments[batch_idx, q_idx]
        return (query == key_segments[batch_idx, kv_idx]) | (query == 0)

    return allowed


def segment_mask(query_segments, key_segments, key_padding, causal: bool, implementation: str, dtype):
    """The mask transformers' builders make from `same_segment` and the key padding mask, built in one broadcast
    (the builders evaluate the mask function index by index, several times slower on packed rows): boolean
    (batch, 1, query, key) for sdpa, additive with the dtype's minimum for eager."""
    query = query_segments[:, None, :, None]
    allowed = (query == key_segments[:, None, None, :]) | (query == 0)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(allowed.shape[-2:], dtype=torch.bool, device=allowed.device).tril()
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def load_flash_varlen():
    """flash-attn's `flash_attn_varlen_func`, or None where it is not installed.

    Imported here, inside `try`, and nowhere else: transformers refuses to load remote code whose imports outside
    a `try` are missing, and this file ships beside the weights to machines without flash-attn."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def flash_varlen_available(tensor: torch.Tensor) -> bool:
    """flash_attn_varlen_func applies: flash-attn importable, CUDA tensors in half precision."""
    if not tensor.is_cuda or tensor.dtype not in (torch.float16, torch.bfloat16):
        return False
    return load_flash_varlen() is not None


class SegmentLayout:
    """The non-padding tokens of a packed (batch, seq) row set, flattened, and the cumulative lengths of their
    segments: the arguments of `flash_attn_varlen_func`. Segments must appear in the same order on the encoder and
    decoder side (as packing writes them) for cross-attention to pair them."""

    def __init__(self, segment_ids: torch.Tensor):
        batch, seq = segment_ids.shape
        flat = segment_ids.reshape(-1)
        self.index = (flat != 0).nonzero().squeeze(1)
        rows = torch.arange(batch, device=flat.device).repeat_interleave(seq)
        keys = rows[self.index] * (int(flat.max()) + 1) + flat[self.index]
        counts = torch.unique_consecutive(keys, return_counts=True)[1]
        self.cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        self.max_length = int(counts.max())


def flash_varlen_attention(query, key, value, query_layout, key_layout, causal, dropout, scaling):
    """(batch, seq, heads, dim) tensors -> attention output of the query's shape, zero at padding tokens."""
    flash_attn_varlen_func = load_flash_varlen()

    def gather(states, layout):
        return states.reshape(-1, *states.shape[2:]).index_select(0, layout.index)

    out = flash_attn_varlen_func(
        gather(query, query_layout), gather(key, key_layout), gather(value, key_layout),
        query_layout.cu_seqlens, key_layout.cu_seqlens, query_layout.max_length, key_layout.max_length,
        dropout_p=dropout, softmax_scale=scaling, causal=causal,
    )
    full = out.new_zeros(query.shape[0] * query.shape[1], *out.shape[1:])
    return full.index_copy(0, query_layout.index, out).view(query.shape)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, seq, head_dim) in float32, rotate-half convention (as the public code).

    Computed from the positions on every call rather than from a table, so any position works (long-context
    stages, synthesised LOGO positions) and there is no buffer to rebuild after meta-device or ZeRO-3 init.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    angles = position_ids[..., None].float() * (1.0 / theta**exponent)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) in float32, as the public code does, and return it in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with an additive float mask; returns (batch, seq, heads, head_dim) and the weights."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OpenBAAttention(nn.Module):
    """Self-attention (fused `qkv`, RoPE) or cross-attention (`q` and fused `kv`, no positions)."""

    def __init__(self, config: OpenBAConfig, num_heads: int, is_cross: bool, is_causal: bool):
        super().__init__()
        self.config = config
        self.is_cross = is_cross
        # read by transformers' sdpa interface, which otherwise assumes causal attention
        self.is_causal = is_causal
        self.num_heads = num_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        width = num_heads * self.head_dim
        bias = config.add_qkv_bias
        if is_cross:
            self.q = nn.Linear(config.hidden_size, width, bias=bias)
            self.kv = nn.Linear(config.hidden_size, 2 * width, bias=bias)
        else:
            self.qkv = nn.Linear(config.hidden_size, 3 * width, bias=bias)
        self.o = nn.Linear(width, config.hidden_size, bias=bias)

    def _heads(self, states: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """Split fused per-head rows into `parts` tensors of shape (batch, seq, heads, head_dim)."""
        batch, seq, _ = states.shape
        return states.view(batch, seq, self.num_heads, parts * self.head_dim).chunk(parts, dim=-1)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        rotary=None,
        encoder_hidden_states=None,
        cache=None,
        layer_idx=0,
        varlen=None,
    ):
        """`layer_idx` is the block's current depth (its cache slot), passed in so that dropping layers is safe.
        `varlen` = (query SegmentLayout, key SegmentLayout) selects flash-attn varlen for packed segments."""
        batch, seq, _ = hidden_states.shape
        if self.is_cross:
            (query,) = self._heads(self.q(hidden_states), 1)
            if varlen is not None:
                key, value = self._heads(self.kv(encoder_hidden_states), 2)
                return self._varlen(query, key, value, varlen)
            query = query.transpose(1, 2)
            if cache is not None and cache.is_updated.get(layer_idx):
                # the encoder output does not change during generation: its keys and values are computed once
                layer = cache.cross_attention_cache.layers[layer_idx]
                key, value = layer.keys, layer.values
            else:
                key, value = (t.transpose(1, 2) for t in self._heads(self.kv(encoder_hidden_states), 2))
                if cache is not None:
                    key, value = cache.cross_attention_cache.update(key, value, layer_idx)
                    cache.is_updated[layer_idx] = True
        else:
            query, key, value = self._heads(self.qkv(hidden_states), 3)
            cos, sin = rotary
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
            if varlen is not None:
                return self._varlen(query, key, value, varlen)
            query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            if cache is not None:
                key, value = cache.self_attention_cache.update(key, value, layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o(output.reshape(batch, seq, -1))

    def _varlen(self, query, key, value, varlen):
        dropout = self.config.attention_dropout if self.training else 0.0
        output = flash_varlen_attention(query, key, value, *varlen, self.is_causal, dropout, self.scaling)
        return self.o(output.reshape(*query.shape[:2], -1))


class OpenBAMLP(nn.Module):
    """SwiGLU with the public fused layout: `fc_in` holds [gate; up], `fc_out` maps back to the hidden size."""

    def __init__(self, config: OpenBAConfig, width: int):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, 2 * width, bias=config.add_ffn_bias)
        self.fc_out = nn.Linear(width, config.hidden_size, bias=config.add_ffn_bias)

    def forward(self, hidden_states):
        gate, up = self.fc_in(hidden_states).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * up)


class OpenBABlock(GradientCheckpointingLayer):
    """One pre-LN layer: self-attention, (decoder only) cross-attention, SwiGLU MLP, each with a residual."""

    def __init__(self, config: OpenBAConfig, is_decoder: bool, num_heads: int, ffn_size: int):
        super().__init__()
        self.is_decoder = is_decoder
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = OpenBAAttention(config, num_heads, is_cross=False, is_causal=is_decoder)
        self.post_attn_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        if is_decoder:
            self.inter_attn = OpenBAAttention(config, num_heads, is_cross=True, is_causal=False)
            self.post_inter_attn_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = OpenBAMLP(config, ffn_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        rotary=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        layer_idx=0,
        self_varlen=None,
        cross_varlen=None,
    ):
        normed = self.input_layernorm(hidden_states)
        attended = self.self_attn(
            normed, attention_mask, rotary=rotary, cache=cache, layer_idx=layer_idx, varlen=self_varlen
        )
        hidden_states = hidden_states + self.dropout(attended)
        mlp_norm = self.post_attn_layernorm
        if self.is_decoder:
            attended = self.inter_attn(
                self.post_attn_layernorm(hidden_states),
                encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                cache=cache,
                layer_idx=layer_idx,
                varlen=cross_varlen,
            )
            hidden_states = hidden_states + self.dropout(attended)
            mlp_norm = self.post_inter_attn_layernorm
        return hidden_states + self.dropout(self.mlp(mlp_norm(hidden_states)))


class OpenBAStack(nn.Module):
    """The encoder or the decoder: embedding (shared, owned by the parent model), blocks, final LayerNorm."""

    main_input_name = "input_ids"  # generate() reads it from the encoder

    def __init__(self, config: OpenBAConfig, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            OpenBABlock(config, is_decoder, heads, ffn) for heads, ffn in config.layer_shapes(decoder=is_decoder)
        )
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        use_cache=False,
        output_hidden_states=False,
        output_attentions=False,
        segment_ids=None,
        encoder_segment_ids=None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`segment_ids`: this stack's packed-document ids (0 = padding); the decoder also needs the encoder's
        `encoder_segment_ids` for its cross-attention."""
        if output_attentions:
            raise NotImplementedError("OpenBA does not return attention weights; use forward hooks instead")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]

        if not self.is_decoder:
            cache = None
        elif use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif cache is not None and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        past = cache.get_seq_length() if cache is not None else 0
        if segment_ids is not None:
            if past:
                raise ValueError("segment ids describe a whole packed row; they cannot continue a cache")
            if self.is_decoder and encoder_segment_ids is None:
                raise ValueError("decoder segment ids need the encoder's segment ids for cross-attention")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)
            else:
                position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).expand(batch, seq)
        interpolation = getattr(self.config, "position_interpolation", None)
        if interpolation and float(interpolation) != 1.0:  # linear position interpolation (long-context extension)
            position_ids = position_ids.float() / float(interpolation)
        rotary = rotary_cos_sin(position_ids, self.config.kv_channels, self.config.rope_theta)

        self_varlen = cross_varlen = None
        if segment_ids is not None and self._use_flash_varlen(inputs_embeds):
            layout = SegmentLayout(segment_ids)
            self_varlen = (layout, layout)
            if self.is_decoder:
                cross_varlen = (layout, SegmentLayout(encoder_segment_ids))

        # position_ids are not passed to the mask builders: they would read a jump in positions (LOGO synthesis)
        # as the start of a new packed document and cut attention there. Packed documents use segment ids instead.
        self_segments = same_segment(segment_ids, segment_ids) if segment_ids is not None else None
        implementation = self.config._attn_implementation
        if self_varlen is not None:
            mask = cross_mask = None
        elif segment_ids is not None and implementation in ("sdpa", "eager"):
            dtype = inputs_embeds.dtype
            mask = segment_mask(segment_ids, segment_ids, attention_mask, self.is_decoder, implementation, dtype)
            cross_mask = None
            if self.is_decoder:
                cross_mask = segment_mask(segment_ids, encoder_segment_ids, encoder_attention_mask, False,
                                          implementation, dtype)
        elif self.is_decoder:
            self_cache = cache.self_attention_cache if cache is not None else None
            mask = create_causal_mask(
                self.config, inputs_embeds, attention_mask, self_cache, and_mask_function=self_segments
            )
            cross_segments = same_segment(segment_ids, encoder_segment_ids) if segment_ids is not None else None
            cross_mask = create_bidirectional_mask(
                self.config,
                inputs_embeds,
                encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                and_mask_function=cross_segments,
            )
        else:
            mask = create_bidirectional_mask(self.config, inputs_embeds, attention_mask, and_mask_function=self_segments)
            cross_mask = None

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for index, block in enumerate(self.block):
            hidden_states = block(
                hidden_states,
                mask,
                rotary,
                encoder_hidden_states,
                cross_mask,
                cache=cache,
                layer_idx=index,
                self_varlen=self_varlen,
                cross_varlen=cross_varlen,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.final_layernorm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states
        )


    def _use_flash_varlen(self, tensor: torch.Tensor) -> bool:
        choice = getattr(self.config, "segment_attention", "auto")
        if choice == "flash_varlen" and not flash_varlen_available(tensor):
            raise ValueError("segment_attention='flash_varlen' needs flash-attn and CUDA fp16/bf16 tensors")
        return choice == "flash_varlen" or (choice == "auto" and flash_varlen_available(tensor))


class OpenBAPreTrainedModel(PreTrainedModel):
    config: OpenBAConfig
    config_class = OpenBAConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenBABlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # both stacks read the one input embedding; the LM head is not tied to it
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared_embedding.weight",
        "decoder.embed_tokens.weight": "shared_embedding.weight",
    }

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """transformers' save, plus `auto_map` in config.json and the model code beside the weights, so that every
        copy of an OpenBA checkpoint loads on its own (see `AUTO_MAP`). Any incoming `auto_map` (e.g. the public
        release's, naming its own code) is replaced: the code that ships is this code."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            copy_model_code(save_directory)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: decoder_start_token_id, then the labels minus the last, -100 -> pad."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def get_input_embeddings(self):
        return self.shared_embedding

    def set_input_embeddings(self, embeddings):
        self.shared_embedding = self.encoder.embed_tokens = self.decoder.embed_tokens = embeddings

    def get_encoder(self):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def _encode_and_decode(
        self,
        *,
        input_ids,
        attention_mask,
        position_ids,
        inputs_embeds,
        encoder_outputs,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        decoder_inputs_embeds,
        cache,
        use_cache,
        output_hidden_states,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
    ) -> tuple[BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions]:
        """Run the encoder (unless its outputs are given) and the decoder; shared by both model classes."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("packed documents need both encoder_segment_ids and decoder_segment_ids")
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
                segment_ids=encoder_segment_ids,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            segment_ids=decoder_segment_ids,
            encoder_segment_ids=encoder_segment_ids,
        )
        return encoder_outputs, decoder_outputs


class OpenBAModel(OpenBAPreTrainedModel):
    """Encoder and decoder without the LM head; returns the decoder's last hidden state."""

    def __init__(self, config: OpenBAConfig):
        super().__init__(config)
        self.shared_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = OpenBAStack(config, self.shared_embedding, is_decoder=False)
        self.decoder = OpenBAStack(config, self.shared_embedding, is_decoder=True)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        position_ids=None,
        decoder_position_ids=None,
        encoder_outputs=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        encoder_outputs, decoder_outputs = self._encode_and_decode(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )


class OpenBAForConditionalGeneration(OpenBAPreTrainedModel, GenerationMixin):
    """OpenBA with its LM head (untied, with bias). `labels` give the token-mean cross-entropy (ignoring -100)."""

    def __init__(self, config: OpenBAConfig):
        super().__init__(config)
        self.shared_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = OpenBAStack(config, self.shared_embedding, is_decoder=False)
        self.decoder = OpenBAStack(config, self.shared_embedding, is_decoder=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.add_lm_head_bias)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, head):
        self.lm_head = head

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        position_ids=None,
        decoder_position_ids=None,
        encoder_outputs=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None:
            use_cache = False  # training: a cache would only hold memory
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self._shift_right(labels)
        encoder_outputs, decoder_outputs = self._encode_and_decode(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
        )
        logits = self.lm_head(decoder_outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1), ignore_index=-100
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)
