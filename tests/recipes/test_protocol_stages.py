"""Recipe stages run through the stage protocol: prepare before anything is written, optional importance scores of
any stage's output, and the same refusals as the commands."""

from __future__ import annotations

import json

import pytest
import yaml

from recipes.openba_v2 import main
from tests.factory import calibration_file, save_with_tokenizer, tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    save_with_tokenizer(tiny_model("llama"), root / "llama")
    calibration_file(root / "calib.txt")
    return root


def write_recipe(path, model, run_dir, stages):
    path.write_text(yaml.safe_dump({"name": "t", "run_dir": str(run_dir), "model": str(model), "stages": stages,
                                    "min_free_disk_gb": 0.01}))
    return path


def test_any_stage_can_score_its_output(llama, tmp_path):
    calib = str(llama / "calib.txt")
    stages = [
        {"name": "layers", "kind": "layer_prune", "args": {"drop": {"decoder": [1]}},
         "score": {"scorers": {"layers": "block_influence", "heads": "activation"}, "calib": calib,
                   "num_samples": 4, "seq_len": 32}},
        {"name": "train", "kind": "train",
         "args": {"objective": "causal", "input_length": 64, "target_length": 32, "data": {"paths": [calib]},
                  "train": {"steps": 2, "save_every": 0,
                                                                               "eval_every": 0}},
         "score": {"scorers": {"layers": "block_influence"}, "calib": calib, "num_samples": 4, "seq_len": 32}},
    ]
    config = write_recipe(tmp_path / "r.yaml", llama / "llama", tmp_path / "run", stages)
    main(["--config", str(config)])
    for name, units in (("layers", {"layers", "heads"}), ("train", {"layers"})):
        out = tmp_path / "run" / name
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["metrics"]["importance"]["scorers"]) == units
        scores = json.loads((out / "importance" / "scores.json").read_text())
        assert scores["tensors"]["layers.decoder"]["shape"] == [3]  # the pruned model's blocks, scored after it ran
        assert scores["tensors"]["layers.decoder"]["finite"]
        assert ("heads.decoder.self.0" in scores["tensors"]) == ("heads" in units)
        assert list((out / "importance").glob("*.png"))


def test_a_stage_whose_inputs_fail_to_prepare_writes_nothing(llama, tmp_path, capsys):
    stages = [{"name": "layers", "kind": "layer_prune", "args": {"remove": 1, "calib": str(tmp_path / "missing")}}]
    config = write_recipe(tmp_path / "r.yaml", llama / "llama", tmp_path / "run", stages)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "layers").exists() and not (tmp_path / "run" / "layers.partial").exists()


def test_an_unknown_stage_selection_writes_no_run_directory(llama, tmp_path, capsys):
    stages = [{"name": "layers", "kind": "layer_prune", "args": {"drop": {"decoder": [1]}}}]
    config = write_recipe(tmp_path / "r.yaml", llama / "llama", tmp_path / "run", stages)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--from", "nosuch"])
    assert exit_info.value.code == 2
    assert "no stage named 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("qa_text, message", [
    (None, "QA data not found"),
    ('{"context": "a", "question": "b"}\n', "no column 'answer'"),
    ('{"context": "a", "question": \n', "line 1"),
])
def test_an_align_stage_with_a_bad_qa_file_writes_nothing(llama, tmp_path, capsys, qa_text, message):
    """The recipe's align stage reads its QA file in prepare: one line, and no stage directory."""
    qa = tmp_path / "qa.jsonl"
    if qa_text is not None:
        qa.write_text(qa_text)
    stages = [{"name": "align", "kind": "align",
               "args": {"data": {"qa": str(qa), "samples": 2, "chunk_size": 32, "context_chunks": 2, "full_chunks": 1, "half_chunks": 1,
                                 "document_chunks": 4}}}]
    config = write_recipe(tmp_path / "r.yaml", llama / "llama", tmp_path / "run", stages)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "align").exists() and not (tmp_path / "run" / "align.partial").exists()
