"""report.md's importance across stages: scores of pruned stages land at the teacher's block and head numbers."""

from __future__ import annotations

import json

import pytest
import torch

from compress.layer import prune_layers
from compress.neuron import prune_neurons
from compress.score import score_checkpoint
from compress.scoring import ImportanceScores
from core.kind import ScoreRequest
from recipes.importance_report import HEAD_PLOT, LAYER_PLOT, OUT_DIR, collect, importance_sections, normalise
from recipes.report import write_report
from recipes.spec import RecipeConfig, StageSpec
from tests.factory import calibration_file, save_with_tokenizer, tiny_model


def _scored(run_dir, name, model, calib):
    save_with_tokenizer(model, run_dir / name)
    request = ScoreRequest(scorers={"layers": "block_influence", "heads": "activation"}, calib=str(calib),
                           num_samples=4, seq_len=16)
    score_checkpoint(run_dir / name, request, progress=False)
    return ImportanceScores.load(run_dir / name / "importance")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """teacher -> layers (decoder block 2 dropped, not scored) -> layers_recover -> neurons (4 of 8 heads), on the
    tiny OpenBA (2 encoder, 6 decoder blocks), each scored stage through the recipe's scoring hook."""
    run_dir = tmp_path_factory.mktemp("run")
    calib = calibration_file(run_dir / "calib.txt")
    model = tiny_model("openba")
    teacher = _scored(run_dir, "teacher", model, calib)
    prune_layers(model, None, drop={"decoder": [2]}, protect_first_last=False)
    save_with_tokenizer(model, run_dir / "layers")  # a stage without importance/: left out
    recovered = _scored(run_dir, "layers_recover", model, calib)
    prune_neurons(model, recovered, heads=4)
    _scored(run_dir, "neurons", model, calib)
    recipe = RecipeConfig(name="tiny", stages=[StageSpec("teacher", "teacher"), StageSpec("layers", "layer_prune"),
                                               StageSpec("layers_recover", "train"),
                                               StageSpec("neurons", "neuron_prune")])
    return run_dir, recipe, teacher, recovered


def test_pruned_blocks_and_heads_are_blank_and_kept_ones_land_at_their_original_index(pruned_run):
    run_dir, recipe, teacher, recovered = pruned_run
    stages = {stage.name: stage for stage in collect(run_dir, [spec.name for spec in recipe.stages])}
    assert list(stages) == ["teacher", "layers_recover", "neurons"]  # `layers` saved no importance scores
    assert sorted(stages["teacher"].layers["decoder"]) == [0, 1, 2, 3, 4, 5]
    assert sorted(stages["layers_recover"].layers["decoder"]) == [0, 1, 3, 4, 5]  # block 2 is blank
    assert sorted(stages["neurons"].layers["decoder"]) == [0, 1, 3, 4, 5]
    # decoder blocks 0 and 1 see the same inputs with block 2 gone: the same block influence, at the same index
    for block in (0, 1):
        assert stages["layers_recover"].layers["decoder"][block] == pytest.approx(
            float(teacher.layer_scores("decoder")[block]), rel=1e-4)
    # the neuron prune kept, per layer, the 4 heads of highest score in `layers_recover`'s numbering
    original_blocks = [0, 1, 3, 4, 5]
    for (stack, kind), heads in stages["neurons"].heads.items():
        blocks = original_blocks if stack == "decoder" else [0, 1]
        expected = {(blocks[i], int(h)) for i in range(len(blocks))
                    for h in recovered.head_scores(stack, kind, i).topk(4).indices}
        assert set(heads) == expected
    # encoder block 0's input is the embedding in both models: a kept head's activation is the teacher's own
    kept = stages["neurons"].heads[("encoder", "self")]
    first = {head: value for (layer, head), value in kept.items() if layer == 0}
    assert len(first) == 4
    for head, value in first.items():
        assert value == pytest.approx(float(teacher.head_scores("encoder", "self", 0)[head]), rel=1e-4)
    assert not any(stage.unmapped for stage in stages.values())


def test_report_has_the_section_and_both_plots(pruned_run):
    run_dir, recipe, _, _ = pruned_run
    report = write_report(recipe, run_dir).read_text()
    assert "## Importance across stages" in report
    for plot in (LAYER_PLOT, HEAD_PLOT):
        path = run_dir / OUT_DIR / plot
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({OUT_DIR}/{plot})" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in report.splitlines() if line.startswith("| ")}
    assert rows["layers_recover"][2] == "teacher"  # compared with the closest scored stage it descends from
    assert rows["neurons"][2] == "layers_recover"
    assert rows["teacher"][2] == "-"


def test_each_stage_is_divided_by_its_mean_and_a_non_positive_mean_by_its_largest_magnitude():
    assert normalise({"a": 1.0, "b": 3.0}) == {"a": 0.5, "b": 1.5}
    assert normalise({0: 2.0, 1: 4.0, 2: 6.0}) == {0: 0.5, 1: 1.0, 2: 1.5}
    assert normalise({"a": -2.0, "b": 1.0}) == {"a": -1.0, "b": 0.5}  # mean -0.5: divided by 2
    assert normalise({}) == {}


def _fake_stage(run_dir, name, tensors, config):
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / "config.json").write_text(json.dumps(config))
    ImportanceScores({k: torch.tensor(v) for k, v in tensors.items()},
                     {"scorers": {"layers": "block_influence", "heads": "activation"}}).save(run_dir / name / "importance")


def test_recorded_indices_map_files_and_units_without_a_record_are_left_out(tmp_path):
    # teacher: 4 blocks of 4 heads; pruned: blocks 0, 2, 3 kept, 2 heads each; old: pruned heads, no head record
    _fake_stage(tmp_path, "teacher", {"layers.decoder": [1.0, 2.0, 3.0, 4.0],
                                      **{f"heads.decoder.self.{i}": [1.0, 2.0, 3.0, 4.0] for i in range(4)}}, {})
    _fake_stage(tmp_path, "pruned", {"layers.decoder": [10.0, 30.0, 40.0],
                                     **{f"heads.decoder.self.{i}": [5.0, 7.0] for i in range(3)}},
                {"original_layer_indices": {"decoder": [0, 2, 3]},
                 "original_head_indices": {"decoder": {"self": {"0": [1, 3], "2": [0, 2], "3": [2, 3]}}}})
    _fake_stage(tmp_path, "old", {"layers.decoder": [1.0, 1.0, 1.0], "heads.decoder.self.0": [1.0, 1.0]},
                {"original_layer_indices": {"decoder": [0, 2, 3]}})
    (tmp_path / "unscored").mkdir()
    stages = {s.name: s for s in collect(tmp_path, ["teacher", "unscored", "pruned", "old"])}
    assert list(stages) == ["teacher", "pruned", "old"]
    assert stages["pruned"].layers == {"decoder": {0: 10.0, 2: 30.0, 3: 40.0}}
    assert stages["pruned"].heads[("decoder", "self")] == {(0, 1): 5.0, (0, 3): 7.0, (2, 0): 5.0, (2, 2): 7.0,
                                                            (3, 2): 5.0, (3, 3): 7.0}
    assert ("decoder", "self") not in stages["old"].heads
    assert stages["old"].unmapped == ["decoder self-attention heads of block 0"]
    recipe = RecipeConfig(stages=[StageSpec(n, "train") for n in ["teacher", "unscored", "pruned", "old"]])
    lines = importance_sections(recipe, tmp_path)
    assert any(line.startswith("Left out") and "old: decoder self-attention heads of block 0" in line
               for line in lines)


def test_a_run_without_importance_scores_has_no_section(tmp_path):
    (tmp_path / "teacher").mkdir()
    recipe = RecipeConfig(stages=[StageSpec("teacher", "teacher")])
    assert importance_sections(recipe, tmp_path) == []
    assert "Importance across stages" not in write_report(recipe, tmp_path).read_text()
    assert not (tmp_path / OUT_DIR).exists()
