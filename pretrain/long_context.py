"""Long-context extension as config: RoPE base (theta) change, position interpolation, and the length checks.

ProLong (arXiv 2410.02660) extends by raising the RoPE base (5e5 -> 8e6 at 64K) and training at a length beyond the
evaluation length; position interpolation (linear: positions / factor) and NTK-aware scaling (a larger base) are
the other common options. Applied here to:

* OpenBA: `config.rope_theta` (self-attention only). "ntk" is a base change (theta * factor ** (d / (d - 2))), so it
  lives in the config. "linear" records the factor as `config.position_interpolation` (not
  `rope_scaling`, which transformers 5 rewrites into `rope_parameters`); the OpenBA model divides its positions by
  it, in both stacks, so a reloaded checkpoint keeps the extension. "dynamic" (NTK recomputed per length at inference) is not available for OpenBA.
* Llama-family models of transformers 5: `config.rope_parameters` ({"rope_type", "rope_theta", "factor"}), whose
  rotary modules are rebuilt so an existing model picks the change up.

Lengths: a batch whose sequences (or position ids) reach past what the model supports is an error before training:
OpenBA `max_seq_length` / `decoder_max_seq_length`, others `max_position_embeddings` (times the scaling factor of a
linear or dynamic rope). Applying an extension raises these to `train_seq_len`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.errors import UserError

SCALINGS = ("none", "linear", "dynamic", "ntk")


@dataclass
class LongContextConfig:
    """How to extend a model's context. Defaults change nothing."""

    rope_theta: float | None = None
    """New RoPE base, or None to keep the model's. ProLong: 5e5 -> 8e6 for 64K, 1.28e8 for 512K. LOGO changes
    none (Llama-3's 5e5 already scales); OpenBA trained with 1e4."""
    scaling: str = "none"
    """"linear" (position interpolation: positions / factor; needs a little training), "ntk" (static NTK-aware:
    base * factor ** (d / (d - 2)); works untrained for moderate factors), "dynamic" (NTK recomputed from the
    actual length at inference; Llama family only), or "none"."""
    factor: float = 1.0
    """Extension factor of "linear"/"ntk"/"dynamic": about target length / trained length."""
    train_seq_len: int | None = None
    """Length to train at (ProLong: beyond the evaluation length helps). It becomes the model's supported length
    (OpenBA: both max_seq_length and decoder_max_seq_length; others max_position_embeddings unless dynamic)."""
    eval_seq_len: int | None = None
    """Length evaluations run at; informational, must not exceed train_seq_len (ProLong trains longer)."""

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise UserError(f"long-context scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise UserError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.factor < 1.0:
            raise UserError(f"long-context factor must be >= 1 (it stretches the context), got {self.factor}")
        if self.scaling != "none" and self.factor == 1.0:
            raise UserError(f"scaling {self.scaling!r} with factor 1 changes nothing; set factor (target/trained)")
        for name in ("train_seq_len", "eval_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be positive, got {value}")
        if self.train_seq_len and self.eval_seq_len and self.eval_seq_len > self.train_seq_len:
            raise UserError(f"eval_seq_len ({self.eval_seq_len}) exceeds train_seq_len ({self.train_seq_len}); "
                            "train at least as long as you evaluate")


def is_openba(config) -> bool:
    return getattr(config, "model_type", None) == "openba"


def _head_dim(config) -> int:
    if is_openba(config):
        return int(config.kv_channels)
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """The NTK-aware base for stretching the context `factor` times (bloc97): theta * factor ** (d / (d - 2))."""
    return theta * factor ** (head_dim / (head_dim - 2))


# ---------------------------------------------------------------------------------------------------- lengths


def supported_lengths(config) -> tuple[int | None, int | None]:
    """(encoder or causal length, decoder length) the model supports as configured; None means unbounded."""
    if is_openba(config):
        return int(config.max_seq_length), int(config.decoder_max_seq_length)
    if getattr(config, "model_type", None) == "t5":  # relative position buckets: any length runs
        return None, None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None, None
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in ("linear", "dynamic") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or limit
        limit = max(limit, int(original * float(rope["factor"])))
    length = int(limit)
    return (length, length) if getattr(config, "is_encoder_decoder", False) else (length, None)


def _length(tensor: Any, positions: Any = None) -> int:
    """Positions a sequence occupies: its length, or the largest position id + 1 (LOGO synthesises gaps)."""
    length = int(tensor.shape[-1]) if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 else 0
    if isinstance(positions, torch.Tensor) and positions.numel():
        length = max(length, int(positions.max()) + 1)
    return length


def check_sequence_lengths(config, batch: dict[str, Any]) -> None:
    """UserError when a batch reaches past the model's supported positions (before any step is taken)."""
    encoder_max, decoder_max = supported_lengths(config)
    what = "max_seq_length" if is_openba(config) else "max_position_embeddings"
    hint = "extend the model first (pretrain.long_context: rope_theta / scaling / train_seq_len) or shorten sequences"
    length = _length(batch.get("input_ids", batch.get("inputs_embeds")), batch.get("position_ids"))
    if encoder_max is not None and length > encoder_max:
        side = "encoder " if getattr(config, "is_encoder_decoder", False) else ""
        raise UserError(f"{side}sequence length {length} exceeds what the model supports ({encoder_max}, config "
                        f"{what}); {hint}")
    if getattr(config, "is_encoder_decoder", False) and decoder_max is not None:
        decoder = batch.get("decoder_input_ids", batch.get("labels"))
        length = _length(decoder, batch.get("decoder_position_ids"))
        if length > decoder_max:
            what = "decoder_max_seq_length" if is_openba(config) else what
            raise UserError(f"decoder sequence length {length} exceeds what the model supports ({decoder_max}, "
                            f"config {what}); {hint}")


# ---------------------------------------------------------------------------------------------------- applying


def apply_long_context(model_or_config, settings: LongContextConfig) -> dict[str, Any]:
    """Change the model's RoPE and supported length in place; returns what changed (for logs and manifests).

    Accepts a model (Llama-family rotary modules are rebuilt) or a bare config (before building a model).
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = model.config if model is not None else model_or_config
    if is_openba(config):
        return _apply_openba(config, settings)
    if getattr(config, "rope_parameters", None) is None and not hasattr(config, "rope_theta"):
        raise UserError(f"model type {getattr(config, 'model_type', '?')!r} has no RoPE to extend")
    changed = _apply_rope_parameters(config, settings)
    if model is not None:
        _rebuild_rotary_modules(model)
    return changed


def _apply_openba(config, settings: LongContextConfig) -> dict[str, Any]:
    if settings.scaling == "dynamic":
        raise UserError("dynamic NTK scaling is not available for OpenBA (its rotary reads one fixed base); use "
                        "scaling: ntk (the same base at the trained length) or linear")
    before = {"rope_theta": config.rope_theta, "max_seq_length": config.max_seq_length,
              "decoder_max_seq_length": config.decoder_max_seq_length}
    theta = settings.rope_theta if settings.rope_theta is not None else config.rope_theta
    if settings.scaling == "ntk":
        theta = ntk_theta(theta, settings.factor, _head_dim(config))
    config.rope_theta = float(theta)
    if settings.scaling == "linear":
        config.position_interpolation = float(settings.factor)
    if settings.train_seq_len is not None:
        config.max_seq_length = max(config.max_seq_length, settings.train_seq_len)
        config.decoder_max_seq_length = max(config.decoder_max_seq_length, settings.train_seq_len)
    after = {"rope_theta": config.rope_theta, "max_seq_length": config.max_seq_length,
             "decoder_max_seq_length": config.decoder_max_seq_length,
             "position_interpolation": getattr(config, "position_interpolation", None)}
    return {"before": before, "after": after}


def _apply_rope_parameters(config, settings: LongContextConfig) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                              "rope_theta": getattr(config, "rope_theta", 10000.0)})
    before = {"rope_parameters": dict(rope), "max_position_embeddings": config.max_position_embeddings}
    if settings.rope_theta is not None:
        rope["rope_theta"] = float(settings.rope_theta)
    if settings.scaling == "ntk":
        rope["rope_theta"] = ntk_theta(float(rope["rope_theta"]), settings.factor, _head_dim(config))
    elif settings.scaling in ("linear", "dynamic"):
        if rope.get("rope_type", "default") not in ("default", settings.scaling):
            raise UserError(f"the model already uses rope_type {rope['rope_type']!r}; stacking {settings.scaling} "
                            "scaling on it is not supported")
        rope["rope_type"] = settings.scaling
        rope["factor"] = float(settings.factor)
    config.rope_parameters = rope
    # dynamic NTK reads max_position_embeddings as the trained length, so it must stay; the others are raised
    if settings.train_seq_len is not None and settings.scaling != "dynamic":
        config.max_position_embeddings = max(config.max_position_embeddings, settings.train_seq_len)
    after = {"rope_parameters": dict(rope), "max_position_embeddings": config.max_position_embeddings}
    return {"before": before, "after": after}


def _rebuild_rotary_modules(model: torch.nn.Module) -> int:
    """Re-create every rotary-embedding module from the (changed) config; they cache inv_freq at construction."""
    rebuilt = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                device = child.inv_freq.device
                fresh = type(child)(config=child.config).to(device)
                setattr(parent, name, fresh)
                rebuilt += 1
    if rebuilt == 0:
        raise UserError(f"found no rotary embedding module in {type(model).__name__} to rebuild")
    return rebuilt


# ---------------------------------------------------------------------------------------------------- OpenBA linear


def attach_rope_scaling(model: torch.nn.Module) -> bool:
    """True when an OpenBA model interpolates positions (`config.position_interpolation`). The model reads the
    field itself, so a plain `from_pretrained` reload keeps the extension; nothing needs attaching."""
    factor = getattr(model.config, "position_interpolation", None)
    return bool(is_openba(model.config) and factor and float(factor) != 1.0)
