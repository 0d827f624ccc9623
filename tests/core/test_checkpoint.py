"""Bad checkpoints fail with one line naming the problem; saving is atomic and round-trips exactly."""

import json
import re
from pathlib import Path

import pytest
import torch

from core.checkpoint import load_model, save_checkpoint
from core.errors import UserError
from tests.factory import tiny_model


@pytest.fixture()
def tiny_llama_dir(tmp_path):
    model = tiny_model("llama")
    out = save_checkpoint(model, None, tmp_path / "llama")
    return model, out


def test_save_load_round_trip_is_exact(tiny_llama_dir):
    model, path = tiny_llama_dir
    assert not path.with_name("llama.tmp").exists()
    loaded = load_model(path).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tiny_llama_dir):
    _, path = tiny_llama_dir
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "made_up_family"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unsupported architecture 'made_up_family'"):
        load_model(path)


def test_corrupt_safetensors_names_the_file(tiny_llama_dir):
    _, path = tiny_llama_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt safetensors file .*model.safetensors"):
        load_model(path)


def test_failed_save_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def save_pretrained(self, directory, **kwargs):
            (Path(directory) / "half.safetensors").write_text("x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(Broken(), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


FAMILY_DEPTH_KEYS = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "mistral": "num_hidden_layers",
                     "gpt_neox": "num_hidden_layers", "t5": "num_layers", "openba": "num_decoder_layers"}
FAMILY_WIDTH_KEYS = {"llama": "intermediate_size", "qwen2": "intermediate_size", "mistral": "intermediate_size",
                     "gpt_neox": "intermediate_size", "t5": "d_ff", "openba": "ffn_hidden_size"}


@pytest.mark.parametrize("family", sorted(FAMILY_DEPTH_KEYS))
@pytest.mark.parametrize("change, message", [
    ("deeper", "tensor(s) the config implies are missing from the weights"),
    ("shallower", "tensor(s) in the weights are not in the model the config describes"),
    ("wider", "tensor(s) have another shape than the config implies"),
])
def test_weights_that_disagree_with_the_config_are_an_error_never_random_initialisation(family, change, message,
                                                                                         tmp_path, capsys):
    from compress.layer import main as layer_main

    directory = tmp_path / family
    tiny_model(family).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    key = FAMILY_WIDTH_KEYS[family] if change == "wider" else FAMILY_DEPTH_KEYS[family]
    config[key] += {"deeper": 1, "shallower": -1, "wider": 8}[change]
    config.pop("layer_types", None)  # Qwen2 lists one per layer; it is rebuilt from the depth
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"do not match its config.json: .*{re.escape(message)}"):
        load_model(directory)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        layer_main(["--model", str(directory), "--remove", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in directory.iterdir()) == before and not (tmp_path / "out").exists()
