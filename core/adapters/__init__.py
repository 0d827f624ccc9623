"""Model-family adapters: the one place that knows how each family lays out its blocks, attention, MLP and embeddings.

Every pruner works through `get_adapter(model)` (or `adapter_class(model_type)` to plan from a config alone), so a
new family is one new module here and one entry in `ADAPTERS`, not edits across the pruners. The surgery itself
(slicing the tensors a unit touches, renumbering layers, updating the config) lives in `base.py`, because which
tensors a unit touches is family knowledge.
"""

from __future__ import annotations

from torch import nn

from core.errors import UserError

from .base import Adapter, AttentionView, MLPView, ModelShape, Projection, block_hidden_in, block_hidden_out
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter, Qwen2MistralAdapter
from .openba import OpenBAAdapter
from .t5 import T5Adapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, Qwen2MistralAdapter, GPTNeoXAdapter, T5Adapter, OpenBAAdapter]

__all__ = ["ADAPTERS", "Adapter", "AttentionView", "MLPView", "ModelShape", "Projection", "adapter_class",
           "block_hidden_in", "block_hidden_out", "get_adapter", "register_adapter", "supported_model_types"]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `get_adapter` recognise another family (later registrations win)."""
    ADAPTERS.insert(0, cls)
    return cls


def supported_model_types() -> list[str]:
    return sorted({t for cls in ADAPTERS for t in cls.model_types})


def adapter_class(model_type: str | None) -> type[Adapter]:
    """The adapter class for a config's `model_type` (planning from a config needs no model)."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UserError(f"unsupported architecture '{model_type}': supported are {', '.join(supported_model_types())}")


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s family, or a UserError naming the unsupported model type."""
    return adapter_class(getattr(model.config, "model_type", None))(model)
