"""What the prune kinds tell the dry-run planner (`StageKind.shape_after`) is what their pruners do to weights: the
same shapes and parameter counts for counts, ratios, rounding and budgets; an estimate, marked as one, only where
scores decide the shape; and the pruners' errors before any weights exist."""

import dataclasses

import pytest
import torch

from compress.layer import KIND as LAYER, LayerPruneConfig, prune_layers
from compress.neuron import KIND as NEURON, NeuronPruneConfig, prune_neurons
from compress.scoring import ImportanceScores
from core.adapters import get_adapter
from core.checkpoint import count_parameters
from core.errors import UserError
from core.planning import Estimate, PlannedModel, planned_shape
from tests.compress.test_neuron import halving, random_scores
from tests.factory import tiny_model


def planned(model) -> PlannedModel:
    return PlannedModel(model.config)


def shape_of(model):
    return get_adapter(model).config_shape(model.config)


def layer_scores(model, seed=0) -> ImportanceScores:
    generator = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    return ImportanceScores({ImportanceScores.layer_name(stack): torch.rand(len(adapter.blocks(stack)),
                                                                            generator=generator)
                             for stack in adapter.stacks})


# --- neuron pruning ------------------------------------------------------------------------------------------------
def test_ratios_and_rounding_plan_the_shape_and_count_the_pruner_makes(family):
    model = tiny_model(family)
    targets = halving(get_adapter(model))
    config = NeuronPruneConfig(**targets, round_to=8)
    plan = planned(model)
    shape = NEURON.shape_after(config, plan.shape, plan)
    prune_neurons(model, random_scores(model), **targets, round_to=8)
    assert shape == shape_of(model)
    assert plan.count(shape) == count_parameters(model)


def test_counts_round_as_the_pruner_rounds():
    model = tiny_model("openba")
    plan = planned(model)
    shape = NEURON.shape_after(NeuronPruneConfig(ffn_width=250, hidden=100, heads=4, round_to=32), plan.shape, plan)
    assert (shape.ffn, shape.hidden, shape.heads) == (256, 96, 4)  # as test_cli_random_scorer_needs_no_data...


@pytest.mark.parametrize("family", ["llama", "t5", "openba"])
def test_a_budget_plans_exactly_the_widths_the_pruner_solves_for(family):
    model = tiny_model(family)
    plan = planned(model)
    target = int(0.7 * count_parameters(model))
    shape = NEURON.shape_after(NeuronPruneConfig(target_params=target), plan.shape, plan)
    result = prune_neurons(model, random_scores(model), target_params=target)
    assert shape == shape_of(model) and plan.count(shape) == result.params_after <= target


def test_per_layer_widths_are_an_estimate_that_says_so():
    model = tiny_model("openba")
    plan = planned(model)
    result = NEURON.shape_after(NeuronPruneConfig(ffn_ratio=0.5, per_layer=True), plan.shape, plan)
    assert isinstance(result, Estimate) and "per_layer" in result.note
    assert result.shape.ffn == plan.shape.ffn // 2


@pytest.mark.parametrize("family, config, message", [
    ("llama", NeuronPruneConfig(ffn_width=1000), "cannot keep 1000 FFN channels"),
    ("llama", NeuronPruneConfig(heads=3), "multiple of the kv group"),
    ("gpt_neox", NeuronPruneConfig(heads=2), "head pruning is not supported"),
    ("llama", NeuronPruneConfig(ffn_ratio=0.5, per_layer=True), "same width in every layer"),
    ("llama", NeuronPruneConfig(), "nothing to prune"),
    ("llama", NeuronPruneConfig(target_params=1000), "out of reach"),
])
def test_neuron_requests_the_pruner_refuses_are_refused_by_the_plan(family, config, message):
    model = tiny_model(family)
    plan = planned(model)
    with pytest.raises(UserError, match=message):
        NEURON.shape_after(config, plan.shape, plan)


# --- layer pruning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    LayerPruneConfig(remove=1),
    LayerPruneConfig(remove={"decoder": 2}),
    LayerPruneConfig(drop={"decoder": [1, 2]}),
])
def test_drops_and_counts_plan_the_depths_the_pruner_leaves(config):
    model = tiny_model("t5")
    plan = planned(model)
    shape = LAYER.shape_after(config, plan.shape, plan)
    prune_layers(model, layer_scores(model), config.remove, drop=config.drop)
    assert shape == shape_of(model) and plan.count(shape) == count_parameters(model)


def test_a_layer_budget_is_an_estimate_with_the_exact_count_to_reach_it():
    model = tiny_model("t5")  # 3 encoder and 4 decoder blocks; decoder blocks are larger (cross-attention)
    plan = planned(model)
    start = plan.count(plan.shape)
    target = start - 1  # one block of any stack is enough
    result = LAYER.shape_after(LayerPruneConfig(target_params=target), plan.shape, plan)
    assert isinstance(result, Estimate) and "1 blocks" in result.note and "scores choose" in result.note
    assert sum(result.shape.depths.values()) == 6 and plan.count(result.shape) <= target
    # the pruner, whichever block its scores pick, also stops after one block
    pruned = tiny_model("t5")
    prune_layers(pruned, layer_scores(pruned), target_params=target)
    assert sum(shape_of(pruned).depths.values()) == 6

    target = int(0.6 * start)
    deep = LAYER.shape_after(LayerPruneConfig(target_params=target), plan.shape, plan)
    assert plan.count(deep.shape) <= target
    cut = [stack for stack, depth in deep.shape.depths.items() if depth < plan.shape.depths[stack]]
    assert any(plan.count(dataclasses.replace(deep.shape, depths={**deep.shape.depths, stack: depth + 1})) > target
               for stack, depth in deep.shape.depths.items() if stack in cut)  # no block more than it needs


def test_a_budget_already_met_keeps_every_block_exactly():
    model = tiny_model("llama")
    plan = planned(model)
    shape, note = planned_shape(LAYER.shape_after(LayerPruneConfig(target_params=10**9), plan.shape, plan))
    assert shape == plan.shape and note is None


@pytest.mark.parametrize("config, message", [
    (LayerPruneConfig(remove=3), "at most 2 of 4"),
    (LayerPruneConfig(remove={"encoder": 1}), "no stack 'encoder'"),
    (LayerPruneConfig(drop={"decoder": [7]}), "out of range"),
    (LayerPruneConfig(), "exactly one of remove, drop or target_params"),
    (LayerPruneConfig(target_params=1000), "cannot reach 1,000 parameters by removing layers"),
])
def test_layer_requests_the_pruner_refuses_are_refused_by_the_plan(config, message):
    plan = planned(tiny_model("llama"))
    with pytest.raises(UserError, match=message):
        LAYER.shape_after(config, plan.shape, plan)
