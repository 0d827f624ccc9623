"""Adapters: the one place that knows how each model family lays out its blocks, attention, MLP and embeddings.

Every pruner works through `get_adapter(model)`, so a new family is one new adapter class, not edits across the
pruners. The surgery itself (slicing rows and columns of the tensors a unit touches, renumbering layers, updating
the config) lives here too, because which tensors a unit touches is family knowledge.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from core.errors import UserError


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (`dim=0`, outputs) or columns (`dim=1`, inputs) at `index`."""
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias.data if dim == 1 else bias.data.index_select(0, index.to(bias.device)))
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Keep entries `index` of a norm over the hidden dimension (LayerNorm, RMSNorm, T5LayerNorm), in place."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            kept = param.data.index_select(0, index.to(param.device)).clone()
            setattr(norm, name, nn.Parameter(kept, requires_grad=param.requires_grad))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)


def slice_embedding(embed: nn.Embedding, index: torch.Tensor) -> nn.Embedding:
    """A new Embedding keeping embedding dimensions (columns) `index`; the vocabulary is unchanged."""
    weight = embed.weight.data.index_select(1, index.to(embed.weight.device)).clone()
    new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=embed.padding_idx, device=weight.device,
                       dtype=weight.dtype)
    new.weight.data.copy_(weight)
    new.weight.requires_grad_(embed.weight.requires_grad)
    return new


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of a projection that belong to the given heads (heads are contiguous blocks of head_dim rows)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@dataclasses.dataclass
class Projection:
    """A linear layer an attention head touches: its outputs (`dim=0`) or inputs (`dim=1`) come in per-head blocks.

    `heads` says whether the blocks follow the query heads ("q") or the key/value heads ("kv"); `parts` is how many
    head_dim-wide pieces one head owns in it (3 in a fused per-head [q, k, v] projection).
    """

    name: str
    heads: str = "q"
    parts: int = 1
    dim: int = 0


@dataclasses.dataclass
class AttentionView:
    """One attention module seen uniformly: its per-head projections, head counts and output projection."""

    module: nn.Module
    kind: str  # "self" or "cross"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    projections: list[Projection]
    o: str = "o_proj"  # the output projection; its input columns are the heads' outputs (scoring hooks read them)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def linear(self, name: str) -> nn.Linear:
        return getattr(self.module, name)


def separate_qkv(q="q_proj", k="k_proj", v="v_proj", o="o_proj") -> list[Projection]:
    return [Projection(q, "q"), Projection(k, "kv"), Projection(v, "kv"), Projection(o, "q", dim=1)]


@dataclasses.dataclass
class MLPView:
    """One feed-forward module: `up` (and `gate` when gated) produce channels that `down` consumes.

    `fused_gate_up` names one projection holding [gate; up] stacked (OpenBA), instead of `gate` and `up`.
    """

    module: nn.Module
    down: str
    up: str | None = None
    gate: str | None = None
    fused_gate_up: str | None = None

    @property
    def width(self) -> int:
        return self.linear(self.down).in_features

    def linear(self, name: str) -> nn.Linear:
        return getattr(self.module, name)


def block_hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state entering a block, from a forward hook's (args, kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def block_hidden_out(output) -> torch.Tensor:
    """The hidden state leaving a block: blocks return a tensor or a tuple whose first item it is."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclasses.dataclass
class ModelShape:
    """The shape fields pruning changes, in family-neutral names, for a model whose layers are all alike.

    `depths` maps each stack to its number of blocks; `heads` counts query heads, `kv_heads` key/value heads
    (equal without GQA); `head_dim` is never pruned (OpenBA-V2 keeps kv_channels).
    """

    depths: dict[str, int]
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


class Adapter:
    """Uniform view of one model family. Subclasses fill in the few names and rules that differ."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ("decoder",)
    supports_head_pruning = True
    per_layer_shapes = False  # may layers of one stack have different widths after pruning?
    shared_head_set = False  # must every layer of a stack keep the same heads (T5's shared position bias)?
    supports_hidden_pruning = True  # may the residual-stream width (hidden size) shrink?
    # Published sizes of this family count the untied LM head as the input embedding (OpenBA: Megatron shared them)
    reported_size_counts_embedding_once = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------------------------------
    def blocks(self, stack: str) -> nn.ModuleList:
        raise NotImplementedError

    def _set_blocks(self, stack: str, blocks: nn.ModuleList) -> None:
        raise NotImplementedError

    def attentions(self, block: nn.Module) -> list[AttentionView]:
        raise NotImplementedError

    def mlp(self, block: nn.Module) -> MLPView:
        raise NotImplementedError

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_head(self) -> nn.Linear | None:
        return self.model.get_output_embeddings()

    def tied(self) -> bool:
        head = self.output_head()
        return head is not None and head.weight is self.input_embeddings().weight

    def all_blocks(self) -> list[tuple[str, int, nn.Module]]:
        return [(stack, i, block) for stack in self.stacks for i, block in enumerate(self.blocks(stack))]

    # --- surgery ---------------------------------------------------------------------------------------------
    def keep_blocks(self, stack: str, keep: list[int]) -> None:
        """Keep only blocks `keep` (in their original order) of `stack`; renumber layer indices and the config."""
        blocks = self.blocks(stack)
        keep = sorted(set(int(i) for i in keep))
        if not keep:
            raise UserError(f"cannot remove every block of the {stack} stack")
        if keep[0] < 0 or keep[-1] >= len(blocks):
            raise UserError(f"block index out of range for the {stack} stack of {len(blocks)} blocks: {keep}")
        self._before_keep_blocks(stack, keep)
        new = nn.ModuleList([blocks[i] for i in keep])
        self._set_blocks(stack, new)
        for new_index, block in enumerate(new):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        self._update_depth(stack, keep)

    def _before_keep_blocks(self, stack: str, keep: list[int]) -> None:
        """Family hook run before blocks are dropped (T5 moves its shared position bias here)."""

    def _update_depth(self, stack: str, keep: list[int]) -> None:
        raise NotImplementedError

    def keep_heads(self, view: AttentionView, kv_heads: torch.Tensor) -> None:
        """Keep whole kv groups `kv_heads` (query heads of a group go with their kv head, so GQA stays valid)."""
        if not self.supports_head_pruning:
            raise UserError(f"{self.family}: head pruning is not supported ({self.head_pruning_reason()})")
        kv_heads = torch.as_tensor(sorted(int(h) for h in kv_heads), dtype=torch.long)
        if len(kv_heads) == 0:
            raise UserError("cannot remove every attention head of a layer")
        q_heads = (kv_heads[:, None] * view.group_size + torch.arange(view.group_size)[None, :]).reshape(-1)
        for proj in view.projections:
            heads = q_heads if proj.heads == "q" else kv_heads
            index = head_rows(heads, proj.parts * view.head_dim)
            setattr(view.module, proj.name, slice_linear(view.linear(proj.name), index, proj.dim))
        self._after_heads(view, q_heads, len(kv_heads))

    def _after_heads(self, view: AttentionView, q_heads: torch.Tensor, num_kv: int) -> None:
        """Family hook: update the attention module's own head-count attributes."""

    def head_pruning_reason(self) -> str:
        return ""

    def keep_channels(self, view: MLPView, channels: torch.Tensor) -> None:
        """Keep FFN channels `channels`: rows of up and gate (or both halves of a fused one), columns of down."""
        channels = torch.as_tensor(sorted(int(c) for c in channels), dtype=torch.long)
        if len(channels) == 0:
            raise UserError("cannot remove every FFN channel of a layer")
        width = view.width
        if view.fused_gate_up:
            rows = torch.cat([channels, channels + width])
            setattr(view.module, view.fused_gate_up, slice_linear(view.linear(view.fused_gate_up), rows, 0))
        for name in (view.up, view.gate):
            if name:
                setattr(view.module, name, slice_linear(view.linear(name), channels, 0))
        setattr(view.module, view.down, slice_linear(view.linear(view.down), channels, 1))

    def hidden_norms(self) -> list[nn.Module]:
        """Every norm over the residual stream: the blocks' norms and each stack's final norm."""
        raise NotImplementedError

    def keep_hidden(self, index: torch.Tensor) -> None:
        """Keep hidden (residual-stream) dimensions `index` in every tensor that reads or writes the stream.

        Readers lose input columns (q/k/v or fused qkv/kv, FFN up/gate), writers lose output rows and their bias
        entries (attention output, FFN down), norms and embeddings lose entries, the LM head loses columns. One
        mask serves the whole model, as in OpenBA-V2, because every block adds into the same stream.
        """
        if not self.supports_hidden_pruning:
            reason = self.hidden_pruning_reason()
            raise UserError(f"{self.family}: hidden-dimension pruning is not supported ({reason})")
        size = self.input_embeddings().embedding_dim
        index = torch.as_tensor(sorted(set(int(i) for i in index)), dtype=torch.long)
        if len(index) == 0:
            raise UserError("cannot remove every hidden dimension")
        if index[0] < 0 or index[-1] >= size:
            raise UserError(f"hidden index out of range for hidden size {size}")
        for _, _, block in self.all_blocks():
            for view in self.attentions(block):
                for proj in view.projections:
                    # per-head projections (dim 0) read the stream through their inputs; the output one writes it
                    hidden_dim = 1 if proj.dim == 0 else 0
                    setattr(view.module, proj.name, slice_linear(view.linear(proj.name), index, hidden_dim))
            mlp = self.mlp(block)
            for name in (mlp.up, mlp.gate, mlp.fused_gate_up):
                if name:
                    setattr(mlp.module, name, slice_linear(mlp.linear(name), index, 1))
            setattr(mlp.module, mlp.down, slice_linear(mlp.linear(mlp.down), index, 0))
        for norm in self.hidden_norms():
            slice_norm(norm, index)
        tied = self.tied()
        head = self.output_head()
        embed = slice_embedding(self.input_embeddings(), index)
        self.model.set_input_embeddings(embed)
        if head is not None:
            if tied:
                head.weight = embed.weight
                head.in_features = len(index)
            else:
                self.model.set_output_embeddings(slice_linear(head, index, 1))
        self._after_hidden(len(index))

    def _after_hidden(self, size: int) -> None:
        """Family hook: write the new hidden size into the config and any attribute that caches it."""
        raise NotImplementedError

    def hidden_pruning_reason(self) -> str:
        return ""

    def sync_widths(self) -> None:
        """Write the current head counts and FFN widths back into the config (uniform unless per-layer allowed)."""
        for stack in self.stacks:
            blocks = self.blocks(stack)
            widths = [self.mlp(b).width for b in blocks]
            heads = [self.attentions(b)[0].num_heads for b in blocks]
            kv = [self.attentions(b)[0].num_kv_heads for b in blocks]
            if not self.per_layer_shapes and (len(set(widths)) > 1 or len(set(heads)) > 1 or len(set(kv)) > 1):
                raise UserError(
                    f"{self.family} checkpoints need the same FFN width and head count in every layer "
                    f"(got widths {sorted(set(widths))}, heads {sorted(set(heads))}): prune uniformly"
                )
            self._write_widths(stack, widths, heads, kv)

    def _write_widths(self, stack: str, widths: list[int], heads: list[int], kv: list[int]) -> None:
        raise NotImplementedError

    # --- config shapes (planning without a model) --------------------------------------------------------------
    @classmethod
    def config_shape(cls, config) -> ModelShape:
        """The shape a config describes, in family-neutral names."""
        raise NotImplementedError

    @classmethod
    def _shape_fields(cls, config, shape: ModelShape) -> dict:
        """The config fields (family names) that give `shape`."""
        raise NotImplementedError

    @classmethod
    def shape_problem(cls, shape: ModelShape) -> str | None:
        """Why the family's config cannot hold `shape` (checked before any surgery), or None."""
        if shape.heads % shape.kv_heads:
            return f"{shape.heads} query heads do not split into {shape.kv_heads} key/value groups"
        return None

    @classmethod
    def reshape_config(cls, config, shape: ModelShape):
        """A new config of the same family with `shape` (uniform layers); the original is not touched."""
        problem = cls.shape_problem(shape)
        if problem:
            raise UserError(f"{cls.family}: {problem}")
        data = {**config.to_dict(), **cls._shape_fields(config, shape)}
        try:
            return type(config).from_dict(data)
        except (TypeError, ValueError) as err:
            raise UserError(f"{cls.family} config rejects shape {shape}: {str(err).splitlines()[-1].strip()}") from None


class LlamaAdapter(Adapter):
    """Llama, Qwen2 and Mistral: `model.model.layers[i]` with `self_attn.{q,k,v,o}_proj` and a gated MLP."""

    family = "llama"
    model_types = ("llama",)
    hidden_divisible_by_heads = True  # LlamaConfig refuses to load unless hidden_size % num_attention_heads == 0

    def blocks(self, stack):
        return self.model.model.layers

    def _set_blocks(self, stack, blocks):
        self.model.model.layers = blocks

    def attentions(self, block):
        attn = block.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv = attn.k_proj.out_features // attn.head_dim
        return [AttentionView(attn, "self", heads, kv, attn.head_dim, separate_qkv())]

    def mlp(self, block):
        return MLPView(block.mlp, down="down_proj", up="up_proj", gate="gate_proj")

    def _update_depth(self, stack, keep):
        self.config.num_hidden_layers = len(keep)
        if getattr(self.config, "layer_types", None) is not None:
            self.config.layer_types = [self.config.layer_types[i] for i in keep]
        if getattr(self.config, "max_window_layers", None) is not None:
            self.config.max_window_layers = min(self.config.max_window_layers, len(keep))

    def _after_heads(self, view, q_heads, num_kv):
        view.module.num_key_value_groups = len(q_heads) // num_kv

    def _write_widths(self, stack, widths, heads, kv):
        head_dim = self.attentions(self.blocks(stack)[0])[0].head_dim
        self.config.intermediate_size = widths[0]
        self.config.num_attention_heads = heads[0]
        self.config.num_key_value_heads = kv[0]
        self.config.head_dim = head_dim

    def hidden_norms(self):
        layers = self.blocks("decoder")
        return [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [
            self.model.model.norm
        ]

    def _after_hidden(self, size):
        # head_dim stays; it must be explicit because the default is hidden_size // num_attention_heads
        self.config.head_dim = self.attentions(self.blocks("decoder")[0])[0].head_dim
        self.config.hidden_size = size

    @classmethod
    def config_shape(cls, config):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ModelShape({"decoder": config.num_hidden_layers}, config.hidden_size, config.intermediate_size,
                          config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                          head_dim, config.vocab_size)

    @classmethod
    def _shape_fields(cls, config, shape):
        depth = shape.depths["decoder"]
        fields = {"num_hidden_layers": depth, "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
                  "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "vocab_size": shape.vocab}
        if getattr(config, "layer_types", None) is not None:
            types = list(config.layer_types)
            fields["layer_types"] = (types * depth)[:depth] if types else None
        if getattr(config, "max_window_layers", None) is not None:
            fields["max_window_layers"] = min(config.max_window_layers, depth)
        return fields

    @classmethod
    def shape_problem(cls, shape):
        problem = super().shape_problem(shape)
        if problem is None and cls.hidden_divisible_by_heads and shape.hidden % shape.heads:
            problem = f"LlamaConfig needs hidden_size ({shape.hidden}) divisible by the head count ({shape.heads})"
        return problem


class LlamaFamilyAdapter(LlamaAdapter):
    """Qwen2 and Mistral: Llama's layout without LlamaConfig's hidden_size % heads rule."""

    model_types = ("qwen2", "mistral")
    hidden_divisible_by_heads = False


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX (Pythia): fused per-head q/k/v projection and a plain (ungated) MLP."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)
    supports_head_pruning = False

    def head_pruning_reason(self):
        return "GPT-NeoX derives its head size from hidden_size / num_attention_heads, so heads cannot be dropped alone"

    def blocks(self, stack):
        return self.model.gpt_neox.layers

    def _set_blocks(self, stack, blocks):
        self.model.gpt_neox.layers = blocks

    def attentions(self, block):
        attn = block.attention
        heads = self.config.num_attention_heads
        projections = [Projection("query_key_value", parts=3), Projection("dense", dim=1)]
        return [AttentionView(attn, "self", heads, heads, attn.head_size, projections, o="dense")]

    def mlp(self, block):
        return MLPView(block.mlp, down="dense_4h_to_h", up="dense_h_to_4h")

    def _update_depth(self, stack, keep):
        self.config.num_hidden_layers = len(keep)
        if getattr(self.config, "layer_types", None) is not None:
            self.config.layer_types = [self.config.layer_types[i] for i in keep]

    def _write_widths(self, stack, widths, heads, kv):
        self.config.intermediate_size = widths[0]

    supports_hidden_pruning = False

    def hidden_pruning_reason(self):
        return "GPT-NeoX derives its head size from hidden_size / num_attention_heads, so the hidden size is fixed"

    @classmethod
    def config_shape(cls, config):
        heads = config.num_attention_heads
        return ModelShape({"decoder": config.num_hidden_layers}, config.hidden_size, config.intermediate_size,
                          heads, heads, config.hidden_size // heads, config.vocab_size)

    @classmethod
    def shape_problem(cls, shape):
        if shape.heads * shape.head_dim != shape.hidden or shape.kv_heads != shape.heads:
            return ("GPT-NeoX keeps heads x head size = hidden size and no grouped kv heads: "
                    "only depth, FFN and vocab change")
        return None

    @classmethod
    def _shape_fields(cls, config, shape):
        depth = shape.depths["decoder"]
        fields = {"num_hidden_layers": depth, "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
                  "num_attention_heads": shape.heads, "vocab_size": shape.vocab}
        if getattr(config, "layer_types", None) is not None:
            fields["layer_types"] = (list(config.layer_types) * depth)[:depth]
        return fields


class T5Adapter(Adapter):
    """T5 (v1.0 and v1.1 gated): encoder and decoder stacks of `block[i].layer[...]`, a shared position bias."""

    family = "t5"
    model_types = ("t5",)
    stacks = ("encoder", "decoder")
    shared_head_set = True

    def _stack(self, stack):
        return self.model.encoder if stack == "encoder" else self.model.decoder

    def blocks(self, stack):
        return self._stack(stack).block

    def _set_blocks(self, stack, blocks):
        self._stack(stack).block = blocks

    def attentions(self, block):
        views = []
        for layer in block.layer:
            for name, kind in (("SelfAttention", "self"), ("EncDecAttention", "cross")):
                attn = getattr(layer, name, None)
                if attn is not None:
                    heads = attn.q.out_features // attn.key_value_proj_dim
                    projections = separate_qkv("q", "k", "v", "o")
                    views.append(AttentionView(attn, kind, heads, heads, attn.key_value_proj_dim, projections, o="o"))
        return views

    def mlp(self, block):
        ff = block.layer[-1].DenseReluDense
        if hasattr(ff, "wi_0"):
            return MLPView(ff, down="wo", up="wi_1", gate="wi_0")
        return MLPView(ff, down="wo", up="wi")

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
        if stack == "encoder":
            self.config.num_layers = len(keep)
        else:
            self.config.num_decoder_layers = len(keep)
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

    def _write_widths(self, stack, widths, heads, kv):
        if len(set(self._all_heads())) > 1 or len(set(self._all_widths())) > 1:
            raise UserError("t5 checkpoints need the same FFN width and head count in both stacks: prune uniformly")
        self.config.d_ff = widths[0]
        self.config.num_heads = heads[0]

    def _all_heads(self):
        return [v.num_heads for _, _, b in self.all_blocks() for v in self.attentions(b)]

    def hidden_norms(self):
        norms = [layer.layer_norm for _, _, block in self.all_blocks() for layer in block.layer]
        return norms + [self.model.encoder.final_layer_norm, self.model.decoder.final_layer_norm]

    def _after_hidden(self, size):
        self.config.d_model = size
        for stack in (self.model.encoder, self.model.decoder):
            stack.config.d_model = size
        # a tied T5 scales the decoder output by model_dim ** -0.5 before the LM head
        self.model.model_dim = size
        for _, _, block in self.all_blocks():
            for view in self.attentions(block):
                view.module.d_model = size

    @classmethod
    def config_shape(cls, config):
        depths = {"encoder": config.num_layers, "decoder": config.num_decoder_layers}
        return ModelShape(depths, config.d_model, config.d_ff, config.num_heads, config.num_heads, config.d_kv,
                          config.vocab_size)

    @classmethod
    def shape_problem(cls, shape):
        if shape.kv_heads != shape.heads:
            return "T5 has no grouped kv heads"
        return None

    @classmethod
    def _shape_fields(cls, config, shape):
        return {"num_layers": shape.depths["encoder"], "num_decoder_layers": shape.depths["decoder"],
                "d_model": shape.hidden, "d_ff": shape.ffn, "num_heads": shape.heads, "d_kv": shape.head_dim,
                "vocab_size": shape.vocab}

    def _all_widths(self):
        return [self.mlp(b).width for _, _, b in self.all_blocks()]


ADAPTERS: list[type[Adapter]] = [LlamaAdapter, LlamaFamilyAdapter, GPTNeoXAdapter, T5Adapter]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `get_adapter` recognise another family (later registrations win)."""
    ADAPTERS.insert(0, cls)
    return cls


def supported_model_types() -> list[str]:
    _load_builtin_adapters()
    return sorted({t for cls in ADAPTERS for t in cls.model_types})


def adapter_class(model_type: str | None) -> type[Adapter]:
    """The adapter class for a config's `model_type` (planning from a config needs no model)."""
    _load_builtin_adapters()
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UserError(f"unsupported architecture '{model_type}': supported are {', '.join(supported_model_types())}")


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s family, or a UserError naming the unsupported model type."""
    return adapter_class(getattr(model.config, "model_type", None))(model)


def _load_builtin_adapters() -> None:
    import compress.openba_adapter  # noqa: F401  (registers itself)


