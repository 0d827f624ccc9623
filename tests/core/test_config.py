"""The config loader refuses typos and wrong types, naming the key, and applies overrides in order."""

import dataclasses

import pytest

from core.config import config_hash, load_config, parse_override
from core.errors import UserError


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])


@dataclasses.dataclass
class Job:
    name: str = "run"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)
    mode: str | None = None
    fast: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    job = load_config(Job, path, ["optim.lr=3e-4", "fast=true", "optim.betas=[0.8, 0.9]"])
    assert job.steps == 20
    assert job.optim.lr == pytest.approx(3e-4)
    assert job.optim.betas == [0.8, 0.9]
    assert job.fast is True


def test_unknown_key_names_nearest_spelling():
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(Job, overrides=["optim.lrr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match="'steps' must be an integer"):
        load_config(Job, overrides=["steps=many"])
    with pytest.raises(UserError, match="'fast' must be true or false"):
        load_config(Job, overrides=["fast=3"])


def test_missing_file_and_bad_override():
    with pytest.raises(UserError, match="config file not found"):
        load_config(Job, "/nonexistent.yaml")
    with pytest.raises(UserError, match="key.sub=value"):
        parse_override("novalue")


def test_hash_is_stable_and_sensitive():
    assert config_hash(Job()) == config_hash(Job())
    assert config_hash(Job()) != config_hash(Job(steps=11))


@dataclasses.dataclass
class Recipe:
    optim: Optim = dataclasses.field(default_factory=lambda: Optim(lr=5e-7, betas=[0.5, 0.5]))


def test_partial_override_keeps_the_parents_defaults_for_a_section():
    recipe = load_config(Recipe, overrides=["optim.lr=1e-3"])
    assert recipe.optim.lr == pytest.approx(1e-3)
    assert recipe.optim.betas == [0.5, 0.5]  # from Recipe's factory, not Optim's class default


def test_yaml_numbers_pyyaml_reads_as_strings_load_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 10.0e9 and 1e9 as strings; a count field reads them, and "3.4B", as on the command
    line."""
    from compress.layer import LayerPruneConfig

    @dataclasses.dataclass
    class Counts:
        steps: int = 0

    for text, expected in (("10.0e9", 10_000_000_000), ("3.4B", 3_400_000_000), ("900M", 900_000_000)):
        path = tmp_path / "layer.yaml"
        path.write_text(f"target_params: {text}\n")
        assert load_config(LayerPruneConfig, path).target_params == expected
    path.write_text("steps: 1e3\n")
    assert load_config(Counts, path).steps == 1000
    path.write_text("steps: 1.5e0\n")
    with pytest.raises(UserError, match="must be an integer"):
        load_config(Counts, path)
    path.write_text("target_params: lots\n")
    with pytest.raises(UserError, match="not a parameter count"):
        load_config(LayerPruneConfig, path)
