"""Bad checkpoints fail with one line naming the problem; saving is atomic and round-trips exactly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.checkpoint import load_model, save_checkpoint
from core.errors import UserError


@pytest.fixture()
def tiny_llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
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
