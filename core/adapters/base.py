"""The family-neutral adapter: the view every pruner has of a model, and the surgery that follows from it.

A family adapter is mostly tables: where its blocks, attentions, MLPs and norms sit (attribute paths, `AttentionLayout`,
`MLPLayout`) and which config fields hold its shape (`ConfigFields`). The methods here read those tables, so a new
family is one small class in its own module, listed in `core/adapters/__init__.py`; the hooks a family overrides
(`_after_heads`, `_after_hidden`, ...) update the few attributes its modules cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from core.errors import UserError

from .slicing import head_rows, slice_embedding, slice_linear, slice_norm


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted attribute path ("model.layers", "layer.-1.DenseReluDense"), or None if it is absent."""
    module = root
    for part in path.split("."):
        if isinstance(module, nn.ModuleList) and part.lstrip("-").isdigit():
            index = int(part)
            module = module[index] if -len(module) <= index < len(module) else None
        else:
            module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclasses.dataclass(frozen=True)
class Projection:
    """A linear layer an attention head touches: its outputs (`dim=0`) or inputs (`dim=1`) come in per-head blocks.

    `heads` says whether the blocks follow the query heads ("q") or the key/value heads ("kv"); `parts` is how many
    head_dim-wide pieces one head owns in it (3 in a fused per-head [q, k, v] projection).
    """

    name: str
    heads: str = "q"
    parts: int = 1
    dim: int = 0


def separate_qkv(q="q_proj", k="k_proj", v="v_proj", o="o_proj") -> tuple[Projection, ...]:
    """The common layout: q per query head, k and v per key/value head, o reading every query head's output."""
    return (Projection(q, "q"), Projection(k, "kv"), Projection(v, "kv"), Projection(o, "q", dim=1))


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


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """Where one attention module sits in a block and how its projections split into heads.

    Head counts are read from the weights (a head's rows in the first per-head projection), so they stay right
    after pruning whatever the module caches.
    """

    path: str  # from the block ("self_attn", "layer.1.EncDecAttention"); blocks without it (encoders) are skipped
    kind: str  # "self" or "cross"
    projections: tuple[Projection, ...]
    head_dim: str  # the module attribute holding one head's size

    def view(self, block: nn.Module) -> AttentionView | None:
        module = module_at(block, self.path)
        if module is None:
            return None
        head_dim = getattr(module, self.head_dim)

        def count(heads: str) -> int | None:
            proj = next((p for p in self.projections if p.heads == heads and p.dim == 0), None)
            return None if proj is None else getattr(module, proj.name).out_features // (proj.parts * head_dim)

        num_heads = count("q")
        output = next(p.name for p in self.projections if p.dim == 1)
        return AttentionView(module, self.kind, num_heads, count("kv") or num_heads, head_dim, list(self.projections),
                             o=output)


@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """Where the feed-forward module sits in a block and the names of its projections (see `MLPView`)."""

    path: str
    down: str
    up: str | None = None
    gate: str | None = None
    fused_gate_up: str | None = None

    def view(self, block: nn.Module) -> MLPView | None:
        """The view, or None when the block's MLP lacks one of these projections (another layout of the family)."""
        module = module_at(block, self.path)
        names = [n for n in (self.down, self.up, self.gate, self.fused_gate_up) if n]
        if module is None or not all(hasattr(module, n) for n in names):
            return None
        return MLPView(module, self.down, self.up, self.gate, self.fused_gate_up)


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


@dataclasses.dataclass(frozen=True)
class PerBlockField:
    """A config field that follows the blocks of one stack.

    rule "pattern": a list with one entry per block that no width decides (attention type per layer): kept blocks
    keep their entries, a new depth repeats the pattern. "width": a list of per-block widths (OpenBA): kept blocks
    keep their entries, a uniform shape clears it. "count": a number of blocks (Qwen2's max_window_layers): capped
    at the new depth.
    """

    name: str
    stack: str = "decoder"
    rule: str = "pattern"


@dataclasses.dataclass(frozen=True)
class ConfigFields:
    """Which config fields hold a family's shape. `kv_heads` None: no grouped kv heads; `head_dim` None: the
    family derives it as hidden // heads."""

    depths: dict[str, str]  # stack -> its number of blocks
    hidden: str
    ffn: str
    heads: str
    kv_heads: str | None = None
    head_dim: str | None = None
    vocab: str = "vocab_size"
    per_block: tuple[PerBlockField, ...] = ()


class Adapter:
    """Uniform view of one model family, read from the tables a subclass fills in."""

    family: str = ""  # short name, prefixes user errors
    label: str = ""  # the family's own spelling, in messages about what its config can hold
    model_types: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ()
    block_paths: dict[str, str] = {}  # stack -> path from the model to its list of blocks
    attention_layouts: tuple[AttentionLayout, ...] = ()
    mlp_layouts: tuple[MLPLayout, ...] = ()  # the first that fits a block describes its MLP
    block_norms: tuple[str, ...] = ()  # paths from a block to its norms over the residual stream (absent: skipped)
    final_norms: tuple[str, ...] = ()  # paths from the model to each stack's final norm
    fields: ConfigFields

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
        return module_at(self.model, self.block_paths[stack])

    def _set_blocks(self, stack: str, blocks: nn.ModuleList) -> None:
        parent, _, name = self.block_paths[stack].rpartition(".")
        setattr(module_at(self.model, parent) if parent else self.model, name, blocks)

    def attentions(self, block: nn.Module) -> list[AttentionView]:
        return [view for layout in self.attention_layouts if (view := layout.view(block)) is not None]

    def mlp(self, block: nn.Module) -> MLPView:
        for layout in self.mlp_layouts:
            view = layout.view(block)
            if view is not None:
                return view
        raise ValueError(f"{self.family}: no MLP layout fits block {type(block).__name__}")

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_head(self) -> nn.Linear | None:
        return self.model.get_output_embeddings()

    def tied(self) -> bool:
        head = self.output_head()
        return head is not None and head.weight is self.input_embeddings().weight

    def all_blocks(self) -> list[tuple[str, int, nn.Module]]:
        return [(stack, i, block) for stack in self.stacks for i, block in enumerate(self.blocks(stack))]

    def hidden_norms(self) -> list[nn.Module]:
        """Every norm over the residual stream: the blocks' norms and each stack's final norm."""
        norms = [module_at(block, path) for _, _, block in self.all_blocks() for path in self.block_norms]
        norms += [module_at(self.model, path) for path in self.final_norms]
        return [norm for norm in norms if norm is not None]

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
        setattr(self.config, self.fields.depths[stack], len(keep))
        for field in self.fields.per_block:
            value = getattr(self.config, field.name, None)
            if field.stack != stack or value is None:
                continue
            kept = min(value, len(keep)) if field.rule == "count" else [value[i] for i in keep]
            setattr(self.config, field.name, kept)

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

    @classmethod
    def head_pruning_reason(cls) -> str:
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
        """Write the new hidden size into the config; head_dim too, where the family would otherwise derive it from
        hidden_size // heads. Families extend this for modules that cache the hidden size."""
        if self.fields.head_dim:
            setattr(self.config, self.fields.head_dim, self.attentions(self.all_blocks()[0][2])[0].head_dim)
        setattr(self.config, self.fields.hidden, size)

    @classmethod
    def hidden_pruning_reason(cls) -> str:
        return ""

    def sync_widths(self) -> None:
        """Write the current head counts and FFN widths back into the config, which holds one of each."""
        blocks = [block for _, _, block in self.all_blocks()]
        widths = {self.mlp(b).width for b in blocks}
        heads = {v.num_heads for b in blocks for v in self.attentions(b)}
        kv = {v.num_kv_heads for b in blocks for v in self.attentions(b)}
        if len(widths) > 1 or len(heads) > 1 or len(kv) > 1:
            raise UserError(
                f"{self.family} checkpoints need the same FFN width and head count in every layer "
                f"(got widths {sorted(widths)}, heads {sorted(heads)}): prune uniformly"
            )
        view = self.attentions(blocks[0])[0]
        setattr(self.config, self.fields.ffn, widths.pop())
        setattr(self.config, self.fields.heads, view.num_heads)
        if self.fields.kv_heads:
            setattr(self.config, self.fields.kv_heads, view.num_kv_heads)
        if self.fields.head_dim:
            setattr(self.config, self.fields.head_dim, view.head_dim)

    # --- config shapes (planning without a model) --------------------------------------------------------------
    @classmethod
    def config_shape(cls, config) -> ModelShape:
        """The shape a config describes, in family-neutral names."""
        f = cls.fields
        hidden, heads = getattr(config, f.hidden), getattr(config, f.heads)
        kv_heads = (getattr(config, f.kv_heads, None) if f.kv_heads else None) or heads
        head_dim = (getattr(config, f.head_dim, None) if f.head_dim else None) or hidden // heads
        depths = {stack: getattr(config, field) for stack, field in f.depths.items()}
        return ModelShape(depths, hidden, getattr(config, f.ffn), heads, kv_heads, head_dim, getattr(config, f.vocab))

    @classmethod
    def _shape_fields(cls, config, shape: ModelShape) -> dict:
        """The config fields (family names) that give `shape`."""
        f = cls.fields
        fields = {f.depths[stack]: depth for stack, depth in shape.depths.items()}
        fields.update({f.hidden: shape.hidden, f.ffn: shape.ffn, f.heads: shape.heads, f.vocab: shape.vocab})
        if f.kv_heads:
            fields[f.kv_heads] = shape.kv_heads
        if f.head_dim:
            fields[f.head_dim] = shape.head_dim
        for field in f.per_block:
            value, depth = getattr(config, field.name, None), shape.depths[field.stack]
            if field.rule == "width":
                fields[field.name] = None  # a uniform shape: the plain fields above say it
            elif value is not None:
                fields[field.name] = min(value, depth) if field.rule == "count" else (
                    (list(value) * depth)[:depth] if value else None)
        return fields

    @classmethod
    def shape_problem(cls, shape: ModelShape) -> str | None:
        """Why the family's config cannot hold `shape` (checked before any surgery), or None."""
        if cls.fields.kv_heads is None and shape.kv_heads != shape.heads:
            return f"{cls.label} has no grouped kv heads"
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


class DecoderOnlyAdapter(Adapter):
    """One stack of blocks, called "decoder", and the config names the causal LMs of transformers share; a family
    replaces the fields it names differently or adds (`dataclasses.replace(DecoderOnlyAdapter.fields, ...)`)."""

    stacks = ("decoder",)
    fields = ConfigFields(depths={"decoder": "num_hidden_layers"}, hidden="hidden_size", ffn="intermediate_size",
                          heads="num_attention_heads")
