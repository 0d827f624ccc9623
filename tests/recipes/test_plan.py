"""The dry-run planner asks each stage's kind what shape it leaves, from the stage's config resolved once: the 15B
plan reproduces the paper's sizes, ratios and budgets are honoured, and shapes that scores or a corpus decide are
estimated by the pruner's rule and marked as estimates."""

from pathlib import Path

import pytest

from compress.neuron import round_width
from recipes.openba_v2 import load_recipe, main
from recipes.plan import format_plan, plan

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "openba_v2_15b.yaml"


def planned(*overrides: str) -> dict[str, dict]:
    return {row["stage"]: row for row in plan(load_recipe(CONFIG, list(overrides)))}


def test_the_15b_plan_reproduces_the_papers_sizes():
    rows = planned()
    paper = {"input": 14.6, "s1_layers": 12.3, "s2_layers": 11.0, "s3_layers": 10.1, "s4_neurons": 3.8, "vocab": 3.4}
    sizes = {stage: round((rows[stage]["params"] - rows[stage]["untied_head"]) / 1e9, 1) for stage in paper}
    assert sizes == paper  # counted as the paper counts: the LM head once, with the embedding
    assert [rows[s]["shape"].depths for s in ("s1_layers", "s2_layers", "s3_layers")] == [
        {"encoder": 10, "decoder": 30}, {"encoder": 8, "decoder": 27}, {"encoder": 8, "decoder": 24}]
    assert not any(row["note"] for row in rows.values())  # every cut is given exactly: nothing estimated


def test_ratios_and_rounding_are_applied_as_the_pruner_applies_them():
    rows = planned("stages.s4_neurons.args={ffn_width: null, heads: null, hidden: null, ffn_ratio: 0.6, "
                   "head_ratio: 0.5, hidden_ratio: 0.6, round_to: 128}")
    shape = rows["s4_neurons"]["shape"]
    assert (shape.ffn, shape.hidden, shape.heads) == (round_width(11008 * 0.6, 128, 11008),
                                                      round_width(4096 * 0.6, 128, 4096), 20)
    assert rows["s4_recover"]["shape"] == shape


def test_budgets_are_met_with_the_count_and_marked_where_scores_choose():
    overrides = ["stages.s3_layers.args.drop=null", "stages.s3_layers.args.target_params=10000000000",
                 "stages.s4_neurons.args={ffn_width: null, heads: null, target_params: 4000000000}"]
    rows = planned(*overrides)
    layers, neurons = rows["s3_layers"], rows["s4_neurons"]
    assert layers["params"] <= 10e9 and "scores choose" in layers["note"]
    assert neurons["params"] <= 4e9 and neurons["note"] is None  # uniform widths: the pruner's solve, exactly
    assert neurons["shape"].hidden == 2560  # the explicit hidden size stays as given
    table = format_plan(list(rows.values()), 8)
    assert "s3_layers *" in table and "* s3_layers (estimate): target_params 10,000,000,000" in table


def test_vocabulary_coverage_is_an_upper_bound_that_says_the_corpus_decides(capsys):
    main(["--config", str(CONFIG), "--dry-run", "--set", "stages.vocab.args.keep=null",
          "--set", "stages.vocab.args.coverage=0.999"])
    out = capsys.readouterr().out
    assert "vocab *" in out
    assert "* vocab (estimate): coverage 0.999: at most 250,368 rows; the corpus' token counts decide" in out


@pytest.mark.parametrize("override, message", [
    ("stages.s3_layers.args.drop={decoder: [7, 24, 33]}", "decoder layers [7] (original numbering) were already "
                                                          "dropped by an earlier stage"),
    ("stages.s3_layers.args.drop={decoder: [36]}", "decoder layers [36] (original numbering) do not exist"),
    ("stages.s4_neurons.args.heads=50", "cannot keep 50 heads"),
    ("stages.s4_neurons.args.ffn_width=20000", "cannot keep 20000 FFN channels"),
    ("stages.s1_layers.args.drop={middle: [3]}", "no stack 'middle'"),
])
def test_a_plan_the_pruners_would_refuse_is_one_error_line(capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--dry-run", "--set", override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_memory_reads_each_stages_own_batch_and_lengths():
    """Training kinds keep their micro-batch and lengths in their own fields (`train.micro_batch_size`,
    `input_length`/`target_length`); the estimate must follow them, by the stated formula."""
    from recipes.plan import GIB

    base = planned()
    doubled = planned("stages.s4_recover.args.train.micro_batch_size=32",
                      "stages.s4_recover.args.input_length=1140")
    row, shape = base["s4_recover"], base["s4_recover"]["shape"]
    config = load_recipe(CONFIG, []).world_size

    def activations(micro, encoder, decoder):
        stored = shape.depths["encoder"] * encoder + shape.depths["decoder"] * decoder
        return micro * shape.hidden * (2 * stored + 34 * max(encoder, decoder)) / GIB

    states = 16 * row["params"] / config / GIB
    assert row["memory_gib"] == pytest.approx(states + activations(16, 570, 380))
    assert doubled["s4_recover"]["memory_gib"] == pytest.approx(states + activations(32, 1140, 380))
    assert doubled["s5_continual"]["memory_gib"] == pytest.approx(base["s5_continual"]["memory_gib"])


def test_the_embedded_default_plans_from_its_teacher_stage():
    """The tiny recipe makes its model in its first stage: the plan starts from that stage's preset and tokenizer
    size, and ends where the main job's report does (16.7% -> 59.5% -> 78.5% removed)."""
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "openba_v2_tiny.yaml"
    rows = {row["stage"]: row for row in plan(load_recipe(tiny, []))}
    first = rows["input"]
    assert (first["shape"].depths, first["shape"].hidden, first["shape"].vocab) == (
        {"encoder": 2, "decoder": 6}, 192, 8192)
    removed = [round(100 * (1 - rows[s]["params"] / first["params"]), 1) for s in ("layers", "neurons", "vocab")]
    assert removed == [16.7, 59.5, 78.5]


def test_align_memory_counts_the_responses_the_loss_reads():
    """Batches hold the 1 + M responses the loss reads (SFT: the preferred one), not every response a row was built
    with: an SFT stage over rows with two rejected answers stores one response's activations."""
    from recipes.kinds import AlignStageConfig
    from recipes.plan import activation_tokens

    sft = AlignStageConfig()
    sft.logo.loss.loss = "sft"
    logo = AlignStageConfig()
    logo.logo.loss.num_rejected = 1
    cap = logo.logo.batches.max_response_tokens
    assert len(sft.data.rule_rejected) == 2
    assert activation_tokens(sft, True)[2] == 1 * cap
    assert activation_tokens(logo, True)[2] == 2 * cap
