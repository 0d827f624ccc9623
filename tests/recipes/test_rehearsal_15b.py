"""The 15B recipe rehearsed end to end (benchmarks/rehearse_15b.py): a model of OpenBA-15B's depth in the public
release layout, converted, planned, then `recipes/configs/openba_v2_15b.yaml` run under DeepSpeed's launcher on two
processes with the config's own layer indices. One rehearsal (about five minutes on two cores) serves every test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.child_env import child_env  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = ROOT / "recipes" / "configs" / "openba_v2_15b.yaml"
# The blocks S1-S3 keep, by their index in the 15-billion-parameter model: S1 drops encoder 4, 8 and decoder 7, 11,
# 18, 20, 22, 30; S2 encoder 6, 10 and decoder 4, 16, 27; S3 decoder 10, 24, 33 (all in original numbering)
KEPT = {
    "encoder": [i for i in range(12) if i not in {4, 8, 6, 10}],
    "decoder": [i for i in range(36) if i not in {7, 11, 18, 20, 22, 30, 4, 16, 27, 10, 24, 33}],
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rehearse_15b") / "rehearsal"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rehearse_15b.py"), "--out", str(out), "--keep"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def recipe_of(out: Path):
    from recipes.openba_v2 import load_recipe

    return load_recipe(CONFIG, json.loads((out / "rehearsal.json").read_text())["overrides"])


def test_every_stage_publishes_a_manifest_and_a_checkpoint_of_the_dry_runs_shape(rehearsal):
    from transformers import AutoConfig

    import core.openba  # noqa: F401  (registers OpenBA)
    from core.adapters import adapter_class
    from core.stage import Manifest
    from recipes.plan import plan

    recipe = recipe_of(rehearsal)
    planned = {row["stage"]: row["shape"] for row in plan(recipe)}
    assert list(planned) == ["input"] + [spec.name for spec in recipe.stages]
    assert planned["input"].depths == {"encoder": 12, "decoder": 36}
    for spec in recipe.stages:
        directory = rehearsal / "run" / spec.name
        assert Manifest.read(directory).stage == spec.name
        config = AutoConfig.from_pretrained(str(directory))
        assert adapter_class(config.model_type).config_shape(config) == planned[spec.name], spec.name
    final = AutoConfig.from_pretrained(str(rehearsal / "run" / recipe.stages[-1].name))
    assert (final.num_layers, final.num_decoder_layers) == (8, 24) == tuple(planned["logo"].depths.values())
    assert (final.hidden_size, final.vocab_size) == (40, 640)  # the scaled S4 hidden size; 600 ids padded to 128


def test_the_layer_stages_keep_the_blocks_the_config_names_in_original_numbering(rehearsal):
    """By weights, not only by the recorded indices: each block left after S3 is nearest to the converted model's
    block of the same original index (recovery training moved them only slightly)."""
    from safetensors.torch import load_file

    config = json.loads((rehearsal / "run" / "s3_layers" / "config.json").read_text())
    assert config["original_layer_indices"] == KEPT
    original = load_file(str(rehearsal / "converted" / "model.safetensors"))
    pruned = load_file(str(rehearsal / "run" / "s3_layers" / "model.safetensors"))
    for stack, depth in (("encoder", 12), ("decoder", 36)):
        blocks = torch.stack([original[f"{stack}.block.{i}.self_attn.qkv.weight"].float() for i in range(depth)])
        for position, index in enumerate(KEPT[stack]):
            kept = pruned[f"{stack}.block.{position}.self_attn.qkv.weight"].float()
            distances = (blocks - kept).flatten(1).norm(dim=1)
            assert int(distances.argmin()) == index, (stack, position)
            assert distances[index] < 0.1 * distances.sort().values[1]


def test_every_training_stage_took_its_steps_with_zero3_on_two_processes(rehearsal):
    summary = json.loads((rehearsal / "rehearsal.json").read_text())
    trained = {stage["stage"]: stage["training"] for stage in summary["stages"] if "training" in stage}
    assert set(trained) == {"s1_recover", "s2_recover", "s3_recover", "s4_recover", "s5_continual", "logo"}
    for name, training in trained.items():
        assert (training["engine"], training["zero_stage"], training["world_size"]) == ("deepspeed", 3, 2), name
        assert training["bf16"] is True, name
        assert training["steps"] == 2 and training["skipped"] == 0, name  # finite gradient norms: real updates


def test_recovery_stages_change_the_weights_they_read(rehearsal):
    """DeepSpeed skips a step whose gradients overflow without failing: fp16 release weights trained without bf16
    ran every recovery step and wrote back their input unchanged."""
    from safetensors.torch import load_file

    recipe = recipe_of(rehearsal)
    names = [spec.name for spec in recipe.stages]
    for spec in recipe.stages:
        if spec.kind != "train":
            continue
        before = load_file(str(rehearsal / "run" / names[names.index(spec.name) - 1] / "model.safetensors"))
        after = load_file(str(rehearsal / "run" / spec.name / "model.safetensors"))
        changed = sum(int((before[name] != after[name]).sum()) for name in before)
        assert changed > 0.1 * sum(tensor.numel() for tensor in before.values()), spec.name


def test_each_gate_ran_on_its_stage_and_logo_used_the_configs_response_room(rehearsal):
    recipe = recipe_of(rehearsal)
    for spec in recipe.stages:
        gate = json.loads((rehearsal / "run" / spec.name / "gate.json").read_text())
        assert gate["passed"] is True, spec.name
    metrics = json.loads((rehearsal / "run" / "logo" / "manifest.json").read_text())["metrics"]
    assert metrics["preference_data"]["rows"] == 6
    assert metrics["rows"] == 6  # no row refused for a response one token over the limit (the config cuts them)
