"""Tensor surgery every family shares: new, smaller Linear / Embedding / norm modules that keep chosen rows or columns.

Structured pruning builds dense smaller matrices (never masks), so each helper returns a fresh module (or edits a norm
in place) on the same device and dtype, keeping whether its weights train.
"""

from __future__ import annotations

import torch
from torch import nn


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
