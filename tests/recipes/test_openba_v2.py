"""The recipe end to end on a miniature: every stage runs and leaves a complete manifest, the final checkpoint loads
with plain from_pretrained, a killed training stage resumes to the same weights, and a failing gate stops the run
without publishing the stage and without touching the stages before it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import core.openba  # noqa: F401  (registers OpenBA with the Auto classes for from_pretrained)
from core.errors import UserError
from core.stage import MANIFEST, Manifest, partial_dir
from recipes.openba_v2 import load_recipe, main

MINI = Path(__file__).parent / "mini.yaml"
ROOT = Path(__file__).resolve().parents[2]
MANIFEST_KEYS = {"stage", "config_hash", "config", "inputs", "outputs", "metrics", "timings", "versions", "status"}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """One full run of the miniature recipe, shared by the tests of this module (they copy it before changing it)."""
    base = tmp_path_factory.mktemp("recipe")
    run_dir, cache = base / "run", base / "cache"
    main(["--config", str(MINI), "--set", f"run_dir={run_dir}", "--set", f"cache_dir={cache}"])
    return run_dir, cache


def copy_run(run_dir: Path, target: Path, upto: str) -> Path:
    """A copy of the completed stages up to and including `upto` (a run directory can be moved: stages recognise
    their inputs by the upstream manifest, not by its path)."""
    names = [spec.name for spec in load_recipe(MINI, []).stages]
    for name in names[: names.index(upto) + 1]:
        shutil.copytree(run_dir / name, target / name)
    return target


def test_every_stage_ran_and_left_a_complete_manifest(mini_run):
    run_dir, _ = mini_run
    recipe = load_recipe(MINI, [])
    for spec in recipe.stages:
        manifest = json.loads((run_dir / spec.name / MANIFEST).read_text())
        assert MANIFEST_KEYS <= set(manifest), spec.name
        assert manifest["status"] == "complete"
        assert manifest["config"]["kind"] == spec.kind
        assert manifest["outputs"], spec.name
        assert {"torch", "transformers"} <= set(manifest["versions"])
        assert manifest["metrics"]["gate"]["passed"] is True
        assert not partial_dir(run_dir / spec.name).exists()
    report = (run_dir / "report.md").read_text()
    for spec in recipe.stages:
        assert f"| {spec.name} |" in report
    assert "| pruned + recovered | continual |" in report and "same shape from scratch" in report
    assert (run_dir / "eval" / "metrics_by_stage.png").is_file()


def test_pruning_shrinks_the_model_and_the_final_checkpoint_loads(mini_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run_dir, _ = mini_run
    teacher = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "teacher")
    final = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "continual")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "continual")
    assert final.config.num_decoder_layers == teacher.config.num_decoder_layers - 1
    assert final.config.hidden_size == 32 and final.config.ffn_hidden_size == 64 and final.config.num_heads == 2
    assert len(tokenizer) == 400
    assert sum(p.numel() for p in final.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = final(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()


def test_rerun_skips_completed_stages(mini_run, tmp_path):
    run_dir, cache = mini_run
    before = {p.name: (p / MANIFEST).stat().st_mtime_ns for p in run_dir.iterdir() if (p / MANIFEST).is_file()}
    main(["--config", str(MINI), "--set", f"run_dir={run_dir}", "--set", f"cache_dir={cache}"])
    after = {p.name: (p / MANIFEST).stat().st_mtime_ns for p in run_dir.iterdir() if (p / MANIFEST).is_file()}
    assert before == after


def _run_only(run_dir: Path, cache: Path, config: Path, stage: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "recipes.openba_v2", "--config", str(config), "--set", f"run_dir={run_dir}",
               "--set", f"cache_dir={cache}", "--only", stage]
    return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_training_stage_resumes_to_the_same_weights(mini_run, tmp_path):
    run_dir, cache = mini_run
    data = yaml.safe_load(MINI.read_text())
    continual = next(s for s in data["stages"] if s["name"] == "continual")
    continual["args"]["train"].update(steps=10, save_every=2)
    config = tmp_path / "longer.yaml"
    config.write_text(yaml.safe_dump(data))

    uninterrupted = copy_run(run_dir, tmp_path / "a", "vocab")
    assert _run_only(uninterrupted, cache, config, "continual").wait(timeout=900) == 0

    killed = copy_run(run_dir, tmp_path / "b", "vocab")
    process = _run_only(killed, cache, config, "continual")
    checkpoints = partial_dir(killed / "continual") / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no training checkpoint appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "continual").exists()
    assert _run_only(killed, cache, config, "continual").wait(timeout=900) == 0

    manifest = Manifest.read(killed / "continual")
    assert manifest.timings["resumed"] is True
    expected = load_file(str(uninterrupted / "continual" / "model.safetensors"))
    resumed = load_file(str(killed / "continual" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_failing_gate_stops_the_recipe_and_keeps_earlier_stages(mini_run, tmp_path):
    run_dir, cache = mini_run
    data = yaml.safe_load(MINI.read_text())
    data["gates"]["impossible"] = {**data["gates"]["recovered"],
                                   "rules": [{"task": "corpus_ppl", "metric": "bits_per_byte", "max": 0.01}]}
    next(s for s in data["stages"] if s["name"] == "continual")["gate"] = "impossible"
    config = tmp_path / "impossible.yaml"
    config.write_text(yaml.safe_dump(data))
    copy = copy_run(run_dir, tmp_path / "run", "vocab")
    earlier = {p.name: (p / MANIFEST).read_bytes() for p in copy.iterdir()}
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(config), "--set", f"run_dir={copy}", "--set", f"cache_dir={cache}"])
    assert stopped.value.code == 1
    assert not (copy / "continual").exists()
    assert {p.name: (p / MANIFEST).read_bytes() for p in copy.iterdir() if (p / MANIFEST).is_file()} == earlier
    assert "bits_per_byte" in (partial_dir(copy / "continual") / "gate.md").read_text()


def test_bad_recipes_fail_before_any_stage_runs(tmp_path):
    data = yaml.safe_load(MINI.read_text())
    data["stages"][1]["gate"] = "nonexistent"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--set", f"run_dir={tmp_path / 'run'}", "--set", f"cache_dir={tmp_path}"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="names no stage 'nope'"):
        load_recipe(MINI, ["stages.nope.args.x=1"])
    with pytest.raises(UserError, match=r"did you mean 'stages.layers.args.scorer'"):
        from recipes.kinds import Context
        from recipes.openba_v2 import check_recipe

        check_recipe(load_recipe(MINI, ["stages.layers.args.scorr=x"]), Context(tmp_path, tmp_path))
    with pytest.raises(UserError, match="mistake_window"):  # own mistakes asked at another window than LOGO's
        check_recipe(load_recipe(MINI, ['stages.logo.args.data.rule_rejected=["own_mistake"]']),
                     Context(tmp_path, tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["stages"][-1].update(input="nope"), r"stage 'scratch' reads stage 'nope', which does not come before"),
    (lambda d: d["stages"][1].update(input="scratch"), r"reads stage 'scratch', which does not come before"),
    (lambda d: d["stages"][1].update(kind="layer_prun"), r"unknown stage kind 'layer_prun' \(did you mean 'layer_prune'"),
    (lambda d: d["gates"].update(pruned=None), r"gate 'pruned' must be a mapping .* or the path of a gate YAML"),
    (lambda d: d["gates"].update(pruned="BAD_GATE"), r"gate.yaml is not valid YAML \(line 2, column 1\)"),
    (lambda d: d.update(stages=None), r"the recipe has no stages: list them under `stages:`"),
])
def test_a_users_recipe_mistake_is_one_error_line_and_writes_nothing(change, message, tmp_path, capsys):
    (tmp_path / "gate.yaml").write_text("rules: [\n")
    data = yaml.safe_load(MINI.read_text())
    change(data)
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(data).replace("BAD_GATE", str(tmp_path / "gate.yaml")))
    for dry in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as stopped:
            main(["--config", str(config), "--set", f"run_dir={tmp_path / 'run'}", "--set",
                  f"cache_dir={tmp_path / 'cache'}", *dry])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.yaml", "mine.yaml"]


def test_stage_tokens_read_as_on_the_command_line():
    recipe = load_recipe(MINI, ["stages.continual.tokens=3.4B", "stages.sft.tokens=10_000"])
    assert [s.tokens for s in recipe.stages if s.tokens] == [3.4e9, 10_000]


def test_dry_run_plans_the_15b_recipe_without_weights(capsys):
    main(["--config", str(ROOT / "recipes" / "configs" / "openba_v2_15b.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert "s4_neurons" in out and "2560" in out and "6912" in out
    assert "3.45B" in out  # the paper's 3.4B, counted like the paper (LM head counted once with the embedding)


def test_dry_run_refuses_a_layer_an_earlier_stage_dropped():
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "recipes" / "configs" / "openba_v2_15b.yaml"), "--dry-run",
              "--set", "stages.s3_layers.args.drop={decoder: [7, 24, 33]}"])
