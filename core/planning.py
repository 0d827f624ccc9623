"""Planning without weights: what shape each stage leaves and how many parameters that shape has.

The dry-run planner (recipes/plan.py) and the budget planner (compress/budget.py) count shapes; so does a stage
kind's `shape_after(config, shape, model)` when its config is a parameter budget, which only a count can turn into a
shape. A shape is counted by writing it into the family's config (the adapter's `reshape_config`) and building
that model on the meta device: no memory, no weights, a fraction of a second even at 15B.
"""

from __future__ import annotations

import dataclasses
import json
from core.adapters import Adapter, ModelShape, adapter_class


def count_on_meta(config, embedding_once: bool = False) -> int:
    """Unique parameters of a model built from `config` on the meta device. `embedding_once` leaves out an untied
    LM head, as OpenBA's reported sizes do (Megatron shared it with the embedding); a tied head is counted once
    either way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from core.adapters import get_adapter
    from core.checkpoint import count_parameters

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    count = count_parameters(model)
    if embedding_once:
        adapter = get_adapter(model)
        head = adapter.output_head()
        if head is not None and not adapter.tied():
            count -= head.weight.numel()
    return count


class PlannedModel:
    """The model a plan starts from: its family (the adapter class: which cuts it allows, which shapes its config
    accepts), its config, and the parameter count of any shape of it (each shape built once)."""

    def __init__(self, config, embedding_once: bool = False):
        self.config = config
        self.adapter: type[Adapter] = adapter_class(getattr(config, "model_type", None))
        self.embedding_once = embedding_once
        self._counts: dict[str, int] = {}

    @property
    def shape(self) -> ModelShape:
        return self.adapter.config_shape(self.config)

    def config_for(self, shape: ModelShape):
        """The family's config with `shape` (a UserError names the rule a shape breaks)."""
        return self.adapter.reshape_config(self.config, shape)

    def count(self, shape: ModelShape) -> int:
        key = json.dumps(dataclasses.asdict(shape), sort_keys=True)
        if key not in self._counts:
            self._counts[key] = count_on_meta(self.config_for(shape), self.embedding_once)
        return self._counts[key]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What `shape_after` returns when the config alone cannot fix the shape (scores or a corpus decide it): the
    pruner's own rule applied to what the plan knows, and a note saying what was assumed, shown with the plan."""

    shape: ModelShape
    note: str


def planned_shape(result: ModelShape | Estimate) -> tuple[ModelShape, str | None]:
    """(shape, note or None) of a `shape_after` result."""
    if isinstance(result, Estimate):
        return result.shape, result.note
    return result, None

