"""Budget planner: the OpenBA-15B -> 3.4B plan reproduces the paper's shape; counts match real models; errors."""

import json

import pytest
from transformers import AutoModelForCausalLM

from core.adapters import adapter_class
from compress.budget import BudgetConfig, main, plan_budget
from core.checkpoint import count_parameters
from core.errors import UserError
from core.planning import count_on_meta
from tests.factory import VOCAB, tiny_config


@pytest.fixture(scope="module")
def openba_plan():
    return plan_budget("openba-15b", 3.4e9)


def test_openba_15b_to_3_4b_plans_the_papers_shape(openba_plan):
    final = openba_plan.final
    assert abs(final.params - 3.4e9) / 3.4e9 < 0.03
    assert final.shape.depths == {"encoder": 8, "decoder": 24}
    assert abs(final.shape.hidden - 2560) <= 128 and abs(final.shape.ffn - 6912) <= 256
    assert abs(final.shape.heads - 20) <= 2 and final.shape.head_dim == 128  # kv_channels kept
    assert 100_000 <= final.shape.vocab <= 120_000 and final.shape.vocab % 128 == 0


def test_openba_plan_steps_follow_the_papers_stages(openba_plan):
    steps = {step.name: step for step in openba_plan.steps}
    assert list(steps) == ["start", "layers", "widths", "vocab"]
    assert openba_plan.counting == "embedding_once"  # as the paper's sizes count
    assert abs(steps["start"].params - 14.6e9) / 14.6e9 < 0.01  # OpenBA-15B as reported
    assert abs(steps["layers"].params - 9.9e9) / 9.9e9 < 0.03  # S3: 8 / 24 layers
    assert abs(steps["widths"].params - 3.8e9) / 3.8e9 < 0.03  # S4: neural pruning
    assert steps["widths"].shape.vocab == 250368


def test_planned_counts_equal_the_parameters_of_a_real_model():
    config = tiny_config("llama")
    plan = plan_budget(config, 80_000, BudgetConfig(round_to=8))
    shape = plan.final.shape
    real = AutoModelForCausalLM.from_config(adapter_class("llama").reshape_config(config, shape))
    assert plan.final.params == count_parameters(real)
    assert plan.counting == "all"
    assert shape.heads % shape.kv_heads == 0 and shape.hidden % shape.heads == 0  # a shape LlamaConfig accepts


def test_embedding_once_counting_drops_only_an_untied_head():
    config = tiny_config("openba")
    head = VOCAB * config.hidden_size
    assert count_on_meta(config, embedding_once=False) - count_on_meta(config, embedding_once=True) == head
    t5 = tiny_config("t5")  # tied: nothing to drop
    assert count_on_meta(t5, embedding_once=True) == count_on_meta(t5, embedding_once=False)


def test_at_most_never_exceeds_the_target():
    plan = plan_budget("openba-15b", 3.4e9, BudgetConfig(at_most=True))
    assert plan.final.params <= 3.4e9
    assert plan.final.params > 3.0e9


def test_families_without_head_or_hidden_pruning_cut_only_what_they_can():
    config = tiny_config("gpt_neox")
    plan = plan_budget(config, 90_000, BudgetConfig(round_to=8))
    shape = plan.final.shape
    assert (shape.hidden, shape.heads) == (64, 4)
    assert shape.ffn < 128 or shape.depths["decoder"] < 4
    assert abs(plan.final.params - 90_000) / 90_000 < 0.15


def test_a_target_the_fixed_cuts_overshoot_keeps_more_layers():
    config = tiny_config("llama")
    start = plan_budget(config, 150_000, BudgetConfig(round_to=8)).steps[0].params
    plan = plan_budget(config, int(0.9 * start), BudgetConfig(round_to=8))
    assert plan.final.shape.depths["decoder"] >= 3  # 2/3 of 4 layers would cut too much: depth relaxed
    assert plan.final.shape.ffn == 128 and plan.width_ratio == 1.0


def test_unreachable_targets_are_user_errors():
    with pytest.raises(UserError, match="below the smallest model"):
        plan_budget("openba-15b", 1e6)
    with pytest.raises(UserError, match="already has"):
        plan_budget("openba-15b", 20e9)
    with pytest.raises(UserError, match="depth_ratio"):
        BudgetConfig(depth_ratio=0)


def test_cli_prints_the_plan_and_writes_it_with_a_manifest(tmp_path, capsys):
    main(["--preset", "openba-15b", "--target", "3.4B", "--out", str(tmp_path / "plan")])
    printed = capsys.readouterr().out
    assert "8/24" in printed and "2560" in printed and "6912" in printed
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["steps"][-1]["shape"]["hidden"] == 2560
    assert (tmp_path / "plan" / "manifest.json").is_file()


def test_cli_errors_write_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "openba-15b", "--target", "1M", "--out", str(tmp_path / "plan")])
    assert exit_info.value.code == 2
    assert "below the smallest model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nosuch", "--target", "3.4B"], "unknown preset 'nosuch'; presets: openba-15b, openba-tiny"),
    (["--preset", "openba-15", "--target", "3.4B"], "did you mean 'openba-15b'?"),
    (["--model", "{tmp}/nosuch", "--target", "3.4B"], "model directory {tmp}/nosuch does not exist"),
    (["--model", "{tmp}", "--target", "3.4B"], "is not a model checkpoint: it has no config.json"),
    (["--target", "3.4B"], "give exactly one of --preset NAME"),
    (["--preset", "openba-15b", "--model", "{tmp}", "--target", "3.4B"], "give exactly one of --preset NAME"),
    (["--preset", "openba-15b"], "give the parameter target"),
    (["--preset", "openba-15b", "--target", "3.4X"], "not a parameter count: '3.4X'"),
    (["--preset", "openba-15b", "--target", "3.4B", "--out", "{tmp}/mine"], "already holds files this stage did not"),
    (["--preset", "openba-15b", "--target", "3.4B", "--out", "{tmp}/mine/notes.txt"], "is not a directory"),
])
def test_bad_requests_are_one_line_and_leave_every_file_as_it_was(tmp_path, capsys, argv, message):
    from tests.core.test_out_policy import refused

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert message.replace("{tmp}", str(tmp_path)) in refused(lambda _m, _o: main(argv), None, None, tmp_path, capsys)


def test_a_rerun_of_the_same_plan_keeps_its_output_and_a_new_target_replaces_it(tmp_path, capsys):
    out = tmp_path / "plan"
    main(["--preset", "openba-15b", "--target", "3.4B", "--out", str(out)])
    first = (out / "manifest.json").read_text()
    main(["--preset", "openba-15b", "--target", "3.4e9", "--out", str(out)])  # the same target, spelled otherwise
    assert (out / "manifest.json").read_text() == first
    main(["--preset", "openba-15b", "--target", "3B", "--out", str(out)])
    assert json.loads((out / "plan.json").read_text())["target"] == 3_000_000_000


def test_budget_module_holds_no_family_field_names():
    import inspect
    import re

    import compress.budget

    source = inspect.getsource(compress.budget)
    for field in ("num_hidden_layers", "intermediate_size", "ffn_hidden_size", "d_model", "num_decoder_layers",
                  "num_attention_heads", "kv_channels"):
        assert not re.search(rf"\b{field}\b", source), field
