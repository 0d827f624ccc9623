"""Model cards: every checkpoint a stage publishes carries a Hugging Face README.md written from its manifest, whose
base model is the stage's input, whose parameter counts are the manifest's, and which records the command."""

import json
import shlex
import subprocess
import sys

import yaml

from core.checkpoint import count_parameters, load_model
from core.stage import Manifest, Stage, run_stage
from tests.child_env import ROOT, child_env
from tests.factory import calibration_file, save_with_tokenizer, tiny_model

HUB_CARD = """---
base_model: meta-llama/Llama-2-7b-hf
license: llama2
language:
- en
---

# A model someone published
"""


def card_of(directory):
    """(front matter, body) of a published card, parsed here with plain YAML."""
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_a_chain_of_stages_gets_cards_that_chain_lineage_and_match_their_manifests(tmp_path):
    model_dir, calib = tmp_path / "llama", calibration_file(tmp_path / "calib.txt")
    save_with_tokenizer(tiny_model("llama"), model_dir)
    (model_dir / "README.md").write_text(HUB_CARD)

    # stage 1: layer pruning, as a user types it
    layered = tmp_path / "layered"
    command = [sys.executable, "-m", "compress.layer", "--model", str(model_dir), "--calib", str(calib),
               "--remove", "1", "--out", str(layered), "--no-progress", "--set", "calibration.num_samples=4",
               "--set", "calibration.seq_len=32"]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = Manifest.read(layered)
    meta, body = card_of(layered)
    assert meta["base_model"] == str(model_dir)
    assert meta["lineage"] == [str(model_dir), "meta-llama/Llama-2-7b-hf"]
    assert (meta["library_name"], meta["license"], meta["language"]) == ("transformers", "llama2", ["en"])
    assert {"openba-v2", "pruning", "layer-pruning", "llama"} <= set(meta["tags"])
    before, after = manifest.parameters["before"], manifest.parameters["after"]
    assert (before, after) == (manifest.metrics["before"]["total"], manifest.metrics["after"]["total"])
    assert (before, after) == (count_parameters(tiny_model("llama")), count_parameters(load_model(layered)))
    assert f"| before | {before:,} |" in body and f"| after | {after:,} |" in body
    removed = manifest.metrics["removed"]["decoder"]
    assert f"removed decoder blocks {removed} (4 -> 3 blocks)" in body
    assert manifest.command == shlex.join(command) and f"```bash\n{shlex.join(command)}\n```" in body
    assert (model_dir / "README.md").read_text() == HUB_CARD  # the input's own card is left as it was
    assert "README.md" in manifest.outputs

    # stage 2: neuron pruning of stage 1's output; its card names stage 1 and carries the lineage on
    from compress.neuron import main as neuron_main

    pruned = tmp_path / "pruned"
    neuron_main(["--model", str(layered), "--calib", str(calib), "--ffn-width", "64", "--heads", "4", "--out",
                 str(pruned), "--no-progress", "--set", "calibration.num_samples=4", "--set", "calibration.seq_len=32"])
    second = Manifest.read(pruned)
    meta, body = card_of(pruned)
    assert meta["base_model"] == str(layered)
    assert meta["lineage"] == [str(layered), str(model_dir), "meta-llama/Llama-2-7b-hf"]
    assert meta["license"] == "llama2" and "structured-pruning" in meta["tags"]
    assert second.parameters["before"] == after
    assert second.parameters["after"] == count_parameters(load_model(pruned))
    assert f"| before | {after:,} |" in body and f"| after | {second.parameters['after']:,} |" in body
    assert "decoder: FFN width 128 -> 64, heads 8 -> 4" in body
    assert second.command and f"```bash\n{second.command}\n```" in body


def test_a_recipe_stage_card_shows_its_gate_and_replaces_the_card_it_copied(tmp_path):
    source = tmp_path / "source"
    save_with_tokenizer(tiny_model("llama"), source)
    (source / "README.md").write_text(HUB_CARD)
    gate_table = ("**Gate `offline`: passed**\n\n| task | metric | value |\n| --- | --- | --- |\n"
                  "| probe | acc | 0.75 |\n")

    def copy_and_gate(input_dir, work_dir, _config):
        for item in input_dir.iterdir():  # as the recipe's teacher kind copies a cached checkpoint
            if item.is_file():
                (work_dir / item.name).write_bytes(item.read_bytes())
        (work_dir / "gate.md").write_text(gate_table)
        return {"steps": 3, "val_loss": 2.5, "gate": {"name": "offline", "passed": True, "checks": 1}}

    config = {"kind": "train", "args": {"objective": "causal"}, "gate": {"name": "offline"}}
    out = tmp_path / "run" / "recover_1"
    manifest = run_stage(Stage("recover_1", copy_and_gate, config), source, out)
    meta, body = card_of(out)
    assert meta["base_model"] == str(source) and "continual-pretraining" in meta["tags"]
    assert "## Gate\n\n" + gate_table.rstrip() in body
    assert "objective `causal`: 3 steps" in body and "Made by stage `recover_1` (kind `train`)" in body
    assert "A model someone published" not in body  # the copied input card was replaced, its lineage kept
    assert manifest.parameters["before"] == manifest.parameters["after"] == count_parameters(tiny_model("llama"))


def test_a_stage_that_writes_data_gets_no_card_and_a_card_of_the_stage_own_is_kept(tmp_path):
    def rows(_input, work_dir, _config):
        (work_dir / "rows.jsonl").write_text("{}\n")

    data = run_stage(Stage("rows", rows, {"n": 1}), None, tmp_path / "rows")
    assert not (tmp_path / "rows" / "README.md").exists() and data.parameters == {"before": None, "after": None}

    def own_notes(_input, work_dir, _config):
        save_with_tokenizer(tiny_model("llama"), work_dir)
        (work_dir / "README.md").write_text("Trained on the night shift.\n")
        return {}

    run_stage(Stage("teacher", own_notes, {"steps": 1}), None, tmp_path / "teacher")
    meta, body = card_of(tmp_path / "teacher")
    assert "base_model" not in meta and "from scratch (no input checkpoint)" in body
    assert "## Notes written by the stage\n\nTrained on the night shift." in body
    assert json.loads((tmp_path / "teacher" / "manifest.json").read_text())["outputs"]["README.md"] > 0


def test_a_command_called_as_a_function_records_the_command_it_stands_for(tmp_path):
    from compress.layer import main as layer_main

    model_dir, out = tmp_path / "llama", tmp_path / "layered"
    save_with_tokenizer(tiny_model("llama"), model_dir)
    argv = ["--model", str(model_dir), "--drop", "decoder=1", "--out", str(out), "--no-progress"]
    layer_main(argv)
    expected = shlex.join(["python", "-m", "compress.layer", *argv])
    assert Manifest.read(out).command == expected
    assert f"```bash\n{expected}\n```" in card_of(out)[1]
