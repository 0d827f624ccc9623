"""The run report's stage table reads parameter counts from the stage contract's manifests."""

from __future__ import annotations

from core.stage import Manifest
from recipes.report import stage_table
from recipes.spec import RecipeConfig, StageSpec


def _manifest(directory, name, kind, before, after, seconds=1.0):
    directory.mkdir(parents=True)
    Manifest(stage=name, config_hash="x", config={"kind": kind}, timings={"seconds": seconds},
             parameters={"before": before, "after": after}).write(directory)


def test_removed_counts_from_the_recipes_input_and_training_stages_show_their_parameters(tmp_path):
    recipe = RecipeConfig(stages=[StageSpec(name="s1", kind="layer_prune"), StageSpec(name="r1", kind="train"),
                                  StageSpec(name="s2", kind="neuron_prune")])
    _manifest(tmp_path / "s1", "s1", "layer_prune", 1_000_000, 840_000)
    _manifest(tmp_path / "r1", "r1", "train", 840_000, 840_000)
    _manifest(tmp_path / "s2", "s2", "neuron_prune", 840_000, 250_000)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in stage_table(recipe, tmp_path).splitlines()[2:]}
    assert rows["s1"][2:4] == ["840K", "16.0%"]  # the first prune already removed 16%
    assert rows["r1"][2:4] == ["840K", "16.0%"]  # a training stage keeps its count
    assert rows["s2"][2:4] == ["250K", "75.0%"]
