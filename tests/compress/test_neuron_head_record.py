"""The neuron pruner records which of the first model's query heads each attention keeps, through later prunes."""

from __future__ import annotations

import torch

from compress.layer import prune_layers
from compress.neuron import ORIGINAL_HEADS, prune_neurons
from core.adapters import get_adapter
from tests.factory import tiny_model


def _head_scores(model, descending_layers=()):
    """Scores that rise with the head index (fall in `descending_layers`), so the kept kv groups are known."""
    adapter = get_adapter(model)
    scores = {}
    for stack, i, block in adapter.all_blocks():
        for view in adapter.attentions(block):
            values = torch.arange(view.num_heads, dtype=torch.float)
            scores[f"heads.{stack}.{view.kind}.{i}"] = values.flip(0) if i in descending_layers else values
    return scores


def test_kept_query_heads_are_recorded_by_original_layer_through_a_layer_prune_and_a_second_head_prune():
    original = tiny_model("llama")  # 4 blocks, 8 query heads in 4 kv groups of 2
    model = tiny_model("llama")
    prune_neurons(model, _head_scores(model, descending_layers=(1, 3)), heads=4)  # groups 2, 3 (0, 1 where falling)
    assert getattr(model.config, ORIGINAL_HEADS) == {"decoder": {"self": {
        "0": [4, 5, 6, 7], "1": [0, 1, 2, 3], "2": [4, 5, 6, 7], "3": [0, 1, 2, 3]}}}
    prune_layers(model, None, drop={"decoder": [1]}, protect_first_last=False)
    prune_neurons(model, _head_scores(model), heads=2)  # keeps current group 1: current heads 2 and 3
    record = getattr(model.config, ORIGINAL_HEADS)["decoder"]["self"]
    assert {layer: record[layer] for layer in ("0", "2", "3")} == {"0": [6, 7], "2": [6, 7], "3": [2, 3]}
    # the record names the weights: each kept head's query rows are the original head's rows
    head_dim = original.config.hidden_size // original.config.num_attention_heads
    for current, layer in enumerate([0, 2, 3]):
        pruned_q = model.model.layers[current].self_attn.q_proj.weight
        first_q = original.model.layers[layer].self_attn.q_proj.weight
        for k, head in enumerate(record[str(layer)]):
            assert torch.equal(pruned_q[k * head_dim:(k + 1) * head_dim], first_q[head * head_dim:(head + 1) * head_dim])
