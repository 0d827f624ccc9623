"""A scorer a user writes for one unit (examples/my_scorers/ffn.py, the README's example), run by `compress.neuron`
through its dotted path: it prunes FFN channels of a tiny Llama and OpenBA, and is refused in one line for heads."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from core.adapters import get_adapter
from compress.calibration import CalibrationConfig, calibration_batches
from compress.neuron import prune_neurons
from core.checkpoint import load_tokenizer
from tests.compress.test_neuron import logits, run_cli
from tests.factory import calibration_file, model_inputs, save_with_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCORER = "my_scorers.ffn:output_energy"
KEPT = {"llama": 48, "openba": 200}


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def energy_by_hand(model, calib) -> dict[tuple[str, int], torch.Tensor]:
    """The example's score, from hooks of this test's own: ||x_j||_2 over the calibration tokens entering each down
    projection, times the L2 norm of down's column j."""
    assert all(mask is None for masks in calib.token_masks for mask in masks.values())  # no padding to leave out
    adapter = get_adapter(model)
    downs = {(stack, index): adapter.mlp(block).linear(adapter.mlp(block).down)
             for stack, index, block in adapter.all_blocks()}
    squares = {key: 0 for key in downs}

    def hook(key):
        def collect(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            squares[key] = squares[key] + (x * x).sum(0)
        return collect

    handles = [down.register_forward_pre_hook(hook(key)) for key, down in downs.items()]
    with torch.no_grad():
        for batch in calib.batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {key: squares[key].sqrt().float() * down.weight.detach().norm(dim=0) for key, down in downs.items()}


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_example_scorer_keeps_the_channels_it_ranks_highest_and_the_output_reloads(family, tmp_path,
                                                                                     examples_on_path, capsys):
    save_with_tokenizer(tiny_model(family), tmp_path / "model")
    calib_path = calibration_file(tmp_path / "calib.txt")
    out = tmp_path / "pruned"
    run_cli(["--model", str(tmp_path / "model"), "--calib", str(calib_path), "--scorer", SCORER,
             "--ffn-width", str(KEPT[family]), "--out", str(out)])
    assert "kept" in capsys.readouterr().out

    original = tiny_model(family)
    calib = calibration_batches(str(calib_path), load_tokenizer(tmp_path / "model"), model=original,
                                config=CalibrationConfig(num_samples=4, seq_len=32))
    expected_scores = energy_by_hand(original, calib)
    auto = AutoModelForSeq2SeqLM if family == "openba" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(str(out)).eval()
    before, after = get_adapter(tiny_model(family)), get_adapter(reloaded)
    for (stack, index, old_block), (_, _, new_block) in zip(before.all_blocks(), after.all_blocks()):
        ranked = torch.argsort(expected_scores[(stack, index)], descending=True)
        kept = ranked[:KEPT[family]].sort().values
        old_down, new_down = before.mlp(old_block), after.mlp(new_block)
        # the surviving down columns are exactly the original columns of the top-ranked channels
        assert torch.equal(new_down.linear(new_down.down).weight, old_down.linear(old_down.down).weight[:, kept])
    # heads were not pruned, and the scorer was not asked for them
    assert [v.num_heads for _, _, b in after.all_blocks() for v in after.attentions(b)] == \
        [v.num_heads for _, _, b in before.all_blocks() for v in before.attentions(b)]

    # the same prune in memory, from the hand-computed scores, gives the reloaded model's outputs
    in_memory = tiny_model(family)
    names = {f"channels.{stack}.{index}": values for (stack, index), values in expected_scores.items()}
    prune_neurons(in_memory, names, ffn_width=KEPT[family])
    inputs = model_inputs(in_memory)
    assert torch.equal(logits(reloaded, inputs), logits(in_memory, inputs))


def test_a_channel_scorer_asked_for_heads_is_one_line_naming_the_flag(tmp_path, examples_on_path, capsys):
    save_with_tokenizer(tiny_model("llama"), tmp_path / "model")
    calib_path = calibration_file(tmp_path / "calib.txt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--model", str(tmp_path / "model"), "--calib", str(calib_path), "--scorer", SCORER,
                 "--ffn-width", "48", "--heads", "4", "--out", str(tmp_path / "pruned")])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error == [f"error: scorer '{SCORER}' scores channels only, not heads, but --heads/--head-ratio prunes "
                     "heads: give a --scorer that scores heads too, or prune heads in a separate run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "model"]


def test_a_budget_with_a_channel_scorer_solves_the_ffn_width_when_heads_are_held(tmp_path, examples_on_path, capsys):
    save_with_tokenizer(tiny_model("llama"), tmp_path / "model")
    calib_path = calibration_file(tmp_path / "calib.txt")
    argv = ["--model", str(tmp_path / "model"), "--calib", str(calib_path), "--scorer", SCORER,
            "--target-params", "120000", "--out", str(tmp_path / "pruned")]
    with pytest.raises(SystemExit):
        run_cli(argv)
    assert "--target-params solves the head count: add --head-ratio 1" in capsys.readouterr().err
    run_cli([*argv, "--head-ratio", "1"])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert model.num_parameters() <= 120_000 and model.config.num_attention_heads == 8
    assert model.config.intermediate_size < 128


def test_a_plain_function_declares_its_units(tmp_path, monkeypatch):
    from compress.scorers import get_scorer
    from core.errors import UserError

    package = tmp_path / "plainpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text(
        "def channel_norm(ctx):\n    return ctx.stats['act_norm']\n"
        "channel_norm.needs = ('act_norm',)\nchannel_norm.units = ('channels',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_scorer("channels", "plainpkg.scores:channel_norm").needs == ("act_norm",)
    with pytest.raises(UserError, match="scores channels only, not heads"):
        get_scorer("heads", "plainpkg.scores:channel_norm")


def test_the_readme_shows_the_example_scorer_as_it_is_in_examples():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write your own scorer", 1)[1].split("\n## ", 1)[0]
    python_blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    source = (EXAMPLES / "my_scorers" / "ffn.py").read_text()
    assert python_blocks and all(block in source for block in python_blocks)
    assert f"--scorer {SCORER}" in section and "PYTHONPATH=examples" in section
