"""The config loader refuses typos and wrong types, naming the key, and applies overrides in order."""

import dataclasses
from pathlib import Path

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


@dataclasses.dataclass
class Stage:
    name: str
    paths: list[str] = dataclasses.field(default_factory=list)
    args: dict = dataclasses.field(default_factory=dict)
    optim: Optim = dataclasses.field(default_factory=Optim)
    data: str | None = None


def test_yaml_as_people_write_it_loads_or_fails_with_the_line(tmp_path):
    """Empty `args:` and `optim:` keep their defaults, a single path is a one-item list, `~/` is the home folder,
    anchors merge with overrides; a tab, a key given twice, a list at the top or a missing required key is one
    error line that says where."""
    path = tmp_path / "stage.yaml"
    path.write_text("base: &base {name: a, paths: ~/corpus.jsonl}\n")
    with pytest.raises(UserError, match="unknown config key 'base'"):
        load_config(Stage, path)
    path.write_text("name: a\npaths: ~/corpus.jsonl\nargs:\noptim:\ndata: ~/qa\n")
    stage = load_config(Stage, path)
    home = str(Path.home())
    assert stage.paths == [f"{home}/corpus.jsonl"] and stage.data == f"{home}/qa"
    assert stage.args == {} and stage.optim == Optim()
    path.write_text("name: a\noptim: &o {lr: 0.1, betas: [0.1, 0.2]}\nargs:\n  <<: *o\n  lr: 0.3\n")
    assert load_config(Stage, path).args == {"lr": 0.3, "betas": [0.1, 0.2]}
    assert load_config(Stage, overrides=["name=b", "paths=x.txt"]).paths == ["x.txt"]

    for text, message in (
        ("name: a\noptim:\n\tlr: 0.1\n", r"line 3, column 1\): found character .* spaces, not tabs"),
        ("name: a\noptim:\n  lr: 0.1\n  lr: 0.2\n", r"line 4, column 3\): key 'lr' is given twice \(first on line 3\)"),
        ("- name: a\n", "must hold a mapping .* not a list"),
        ("paths: [a]\n", "needs key 'name'"),
        ("name: a\noptim: {lr: }\n", "'optim.lr' must be a number, got None"),
    ):
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_config(Stage, path)
    path.write_text("")
    with pytest.raises(UserError, match="needs key 'name'"):
        load_config(Stage, path)
    assert not (tmp_path / "~").exists()
