"""Layer pruning: which blocks go, that the rest is untouched, reload equality, budgets, iterative mode, errors, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from core.adapters import get_adapter
from compress.layer import main, prune_layers
from compress.scoring import ImportanceScores, score_model
from core.checkpoint import count_parameters
from core.errors import UserError
from tests.compress.test_scoring import calib_for, char_tokenizer, sample_texts
from tests.factory import FAMILIES, VOCAB, model_inputs, tiny_model


def block_states(model) -> dict[str, list[dict[str, torch.Tensor]]]:
    adapter = get_adapter(model)
    return {stack: [{k: v.clone() for k, v in b.state_dict().items()} for b in adapter.blocks(stack)]
            for stack in adapter.stacks}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def make_identity(model, stack: str, index: int) -> None:
    """Zero every projection that writes into the residual stream, so the block adds nothing to it."""
    adapter = get_adapter(model)
    block = adapter.blocks(stack)[index]
    linears = [view.linear(view.o) for view in adapter.attentions(block)]
    mlp = adapter.mlp(block)
    linears.append(mlp.linear(mlp.down))
    with torch.no_grad():
        for linear in linears:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def layer_scores(**stacks) -> ImportanceScores:
    return ImportanceScores({f"layers.{s}": torch.tensor(v, dtype=torch.float32) for s, v in stacks.items()})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_made_identity_has_zero_influence_and_is_the_one_removed(family):
    model = tiny_model(family)
    make_identity(model, "decoder", 2)
    scores = score_model(model, calib_for(model), {"layers": "block_influence"}, progress=False)
    influence = scores.layer_scores("decoder")
    assert influence[2].abs().item() < 1e-5
    assert influence.abs().sort().values[1] > 1e-3  # every other block does change the state
    inputs = model_inputs(model)
    before = logits(model, inputs)
    removed = prune_layers(model, scores, {"decoder": 1})
    assert removed["decoder"] == [2]
    torch.testing.assert_close(logits(model, inputs), before, rtol=1e-5, atol=1e-5)  # removing an identity is free


@pytest.mark.parametrize("family", ["llama", "openba"])
def test_removing_nothing_is_the_identity(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    before, states = logits(model, inputs), block_states(model)
    scores = score_model(model, None, {"layers": "random"}, progress=False)
    assert prune_layers(model, scores, 0) == {stack: [] for stack in get_adapter(model).stacks}
    assert prune_layers(model, None, 0) == {stack: [] for stack in get_adapter(model).stacks}  # no scores needed
    assert torch.equal(logits(model, inputs), before)
    after = block_states(model)
    assert all(torch.equal(after[s][i][k], states[s][i][k]) for s in states for i in range(len(states[s]))
               for k in states[s][i])


@pytest.mark.parametrize("family", FAMILIES)
def test_surviving_blocks_are_untouched_and_the_reloaded_model_matches_exactly(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    original = block_states(model)
    stacks = {stack: len(adapter.blocks(stack)) for stack in adapter.stacks}
    # the second block of every stack scores lowest; every other block keeps its index order
    scores = layer_scores(**{s: [5.0, 0.0] + [5.0] * (n - 2) for s, n in stacks.items()})
    remove = {s: 1 for s, n in stacks.items() if n > 2}
    removed = prune_layers(model, scores, remove)
    assert removed == {s: ([1] if s in remove else []) for s in stacks}
    after = block_states(model)
    for stack, blocks in after.items():
        kept = [i for i in range(stacks[stack]) if i not in removed[stack]]
        assert len(blocks) == len(kept)
        for new, old in enumerate(kept):
            assert blocks[new].keys() == original[stack][old].keys()
            assert all(torch.equal(blocks[new][k], original[stack][old][k]) for k in blocks[new])
    assert model.config.original_layer_indices == {s: [i for i in range(n) if i not in removed[s]]
                                                   for s, n in stacks.items()}
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    assert reloaded.config.original_layer_indices == model.config.original_layer_indices


def test_iterative_mode_rescores_the_pruned_model_after_each_removal():
    model = tiny_model("llama", num_hidden_layers=8)
    first = layer_scores(decoder=[9, 1, 2, 3, 4, 5, 6, 9])  # one-shot would remove blocks 1 and 2
    seen = []

    def rescore(m):
        seen.append(len(m.model.layers))
        # after block 1 is gone, the block that was 6 (now 5) looks least important
        return layer_scores(decoder=[9, 5, 5, 5, 5, 0, 9])

    removed = prune_layers(model, first, 2, iterative=True, rescore_fn=rescore)
    assert seen == [7]  # rescored once, between the two removals, on the smaller model
    assert removed == {"decoder": [1, 6]}
    assert model.config.original_layer_indices == {"decoder": [0, 2, 3, 4, 5, 7]}
    assert prune_layers(tiny_model("llama", num_hidden_layers=8), first, 2) == {"decoder": [1, 2]}


def test_iterative_mode_with_real_scores_removes_the_lowest_block_of_each_rescored_model():
    model = tiny_model("llama", num_hidden_layers=6)
    calib = calib_for(model)
    calls = []

    def rescore(m):
        calls.append(1)
        return score_model(m, calib, {"layers": "block_influence"}, progress=False)

    removed = prune_layers(model, rescore(model), 2, iterative=True, rescore_fn=rescore)
    assert len(calls) == 2 and len(model.model.layers) == 4
    # replay by hand: the lowest interior block, then the lowest interior block of the rescored smaller model
    replay = tiny_model("llama", num_hidden_layers=6)
    first = int(rescore(replay).layer_scores("decoder")[1:-1].argmin()) + 1
    prune_layers(replay, None, drop={"decoder": [first]})
    second_position = int(rescore(replay).layer_scores("decoder")[1:-1].argmin()) + 1
    second = [i for i in range(6) if i != first][second_position]
    assert removed == {"decoder": sorted([first, second])}


def test_a_parameter_budget_removes_lowest_blocks_across_stacks_until_it_fits():
    model = tiny_model("openba")  # 2 encoder (both protected), 6 decoder blocks
    total = count_parameters(model)
    block = sum(p.numel() for p in model.decoder.block[1].parameters())
    scores = layer_scores(encoder=[1, 1], decoder=[9, 3, 1, 2, 4, 9])
    removed = prune_layers(model, scores, target_params=total - 2 * block)
    assert removed == {"encoder": [], "decoder": [2, 3]}
    assert count_parameters(model) <= total - 2 * block
    model = tiny_model("openba")
    removed = prune_layers(model, scores, target_params=total - 2 * block + 1)  # one block short of the budget
    assert removed["decoder"] == [2, 3]
    model = tiny_model("openba")
    removed = prune_layers(model, scores, target_params=total - block - 1)
    assert removed["decoder"] == [2, 3]  # the first removal leaves it one parameter over: a second goes
    model = tiny_model("openba")
    assert prune_layers(model, scores, target_params=total) == {"encoder": [], "decoder": []}


def test_explicit_drop_lists_in_original_numbering_replay_the_papers_stages():
    model = tiny_model("openba", num_layers=4, num_decoder_layers=10)
    original = block_states(model)
    assert prune_layers(model, None, drop={"decoder": [3, 6]}) == {"encoder": [], "decoder": [3, 6]}
    # stage 2 names original blocks 8 and 9: positions 6 and 7 of the 8 remaining
    second = prune_layers(model, None, drop={"decoder": [8, 2]}, drop_numbering="original")
    assert second["decoder"] == [2, 6]
    assert model.config.original_layer_indices == {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 4, 5, 7, 9]}
    for new, old in enumerate([0, 1, 4, 5, 7, 9]):
        state = model.decoder.block[new].state_dict()
        assert all(torch.equal(state[k], original["decoder"][old][k]) for k in state)
    with pytest.raises(UserError, match="original decoder block 6 is not in this model"):
        prune_layers(model, None, drop={"decoder": [6]}, drop_numbering="original")


def test_bad_requests_are_user_errors_and_leave_the_model_unchanged():
    model = tiny_model("llama")
    scores = layer_scores(decoder=[1, 2, 3, 4])
    states = block_states(model)
    bad = [
        (dict(remove=4), "every layer"),
        (dict(remove=3), "at most 2 of 4"),
        (dict(remove=4, protect_first_last=False), "every layer"),
        (dict(drop={"decoder": [1, 7]}), "out of range"),
        (dict(drop={"decoder": [0, 1, 2, 3]}, protect_first_last=False), "every layer"),
        (dict(drop={"decoder": [0]}), "protect_first_last"),
        (dict(drop={"encoder": [1]}), "no stack 'encoder'"),
        (dict(remove=1, target_params=10), "exactly one"),
        (dict(target_params=10), "cannot reach"),
        (dict(remove=1, iterative=True), "needs calibration data"),
    ]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message):
            prune_layers(model, scores, **kwargs)
    with pytest.raises(UserError, match="made for another model"):
        prune_layers(model, layer_scores(decoder=[1, 2, 3]), 1)
    with pytest.raises(UserError, match="no 'layers.decoder'"):
        prune_layers(model, ImportanceScores(), 1)
    after = block_states(model)
    assert len(after["decoder"]) == 4
    assert all(torch.equal(after["decoder"][i][k], states["decoder"][i][k]) for i in range(4) for k in states["decoder"][i])


# --- command line ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """Save a tiny model of a family with a char-level tokenizer; text files to calibrate on."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, text in enumerate(sample_texts()):
        (calib / f"{i}.txt").write_text(text)

    def save(family):
        model = tiny_model(family)
        path = tmp_path / family
        model.save_pretrained(path)
        char_tokenizer().save_pretrained(path)
        return model, path

    return save, calib


SMALL_CALIB = ["--set", "calibration.seq_len=24", "--set", "calibration.num_samples=4", "--no-progress"]


def reload(path, seq2seq: bool):
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_layer_command_prunes_a_saved_llama_end_to_end(saved, tmp_path, capsys):
    save, calib = saved
    _, path = save("llama")
    out = tmp_path / "pruned"
    main(["--model", str(path), "--calib", str(calib), "--remove", "1", "--out", str(out)] + SMALL_CALIB)
    table = capsys.readouterr().out
    assert "blocks before" in table and "params after" in table
    pruned, tokenizer = reload(out, seq2seq=False)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert tokenizer("abc")["input_ids"] == char_tokenizer()("abc")["input_ids"]
    manifest = json.loads((out / "manifest.json").read_text())
    scores = ImportanceScores.load(out / "scores")
    lowest = int(scores.layer_scores("decoder")[1:-1].argmin()) + 1
    assert manifest["metrics"]["removed"] == {"decoder": [lowest]} and manifest["stage"] == "layer-prune"
    assert (out / "scores" / "scores_decoder.png").is_file()
    expected = tiny_model("llama")
    prune_layers(expected, scores, 1)
    inputs = model_inputs(expected)
    assert torch.equal(logits(pruned, inputs), logits(expected, inputs))


def test_layer_command_prunes_a_saved_openba_iteratively_and_reuses_scores(saved, tmp_path, capsys):
    from compress.score import main as score_main

    save, calib = saved
    _, path = save("openba")
    main(["--model", str(path), "--calib", str(calib), "--remove", "decoder=2", "--iterative",
          "--out", str(tmp_path / "iterative")] + SMALL_CALIB)
    pruned, _ = reload(tmp_path / "iterative", seq2seq=True)
    assert pruned.config.num_decoder_layers == 4 and len(pruned.decoder.block) == 4
    score_main(["--model", str(path), "--calib", str(calib), "--out", str(tmp_path / "scores"),
                "--layers", "skip_loss", "--set", "calibration.num_samples=2"] + SMALL_CALIB)
    main(["--model", str(path), "--scores", str(tmp_path / "scores"), "--remove", "decoder=1",
          "--out", str(tmp_path / "reused"), "--no-progress"])
    removed = json.loads((tmp_path / "reused" / "manifest.json").read_text())["metrics"]["removed"]
    skip = ImportanceScores.load(tmp_path / "scores").layer_scores("decoder")
    assert removed == {"encoder": [], "decoder": [int(skip[1:-1].argmin()) + 1]}
    reused, _ = reload(tmp_path / "reused", seq2seq=True)
    assert reused.config.original_layer_indices["decoder"] == [i for i in range(6) if i not in removed["decoder"]]


def test_layer_command_errors_write_nothing(saved, tmp_path, capsys):
    save, calib = saved
    _, path = save("llama")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    big = tmp_path / "big-tokenizer"
    char_tokenizer(VOCAB + 32).save_pretrained(big)
    cases = [
        (["--calib", str(calib), "--remove", "4"], "every layer"),
        (["--calib", str(calib), "--remove", "1", "--scorer", "nope"], "unknown layers scorer 'nope'"),
        (["--calib", str(tmp_path / "empty"), "--remove", "1"], "empty"),
        (["--calib", str(calib), "--remove", "1", "--tokenizer", str(big)], "another tokenizer"),
        (["--calib", str(calib), "--drop", "decoder=9"], "out of range"),
        (["--remove", "1"], "needs scores"),
        (["--calib", str(calib), "--remove", "1", "--scorer", "tests.compress.test_scoring:three_scores"],
         "returned 3 scores"),
        (["--calib", str(calib), "--remove", "1", "--set", "calibration.seq_lenn=3"], "did you mean"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(path), "--out", str(out)] + extra + SMALL_CALIB)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_layer_command_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m compress.layer --model" in capsys.readouterr().out


def test_stage_function_chains_drop_lists_counted_in_the_original_model(tmp_path):
    """The recipe path: two layer-prune stages under run_stage, the second naming blocks of the first model."""
    from compress.layer import LayerPruneConfig, layer_prune_stage
    from core.stage import Stage, run_stage

    model = tiny_model("openba", num_layers=4, num_decoder_layers=10)
    model.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    stages = [("s1", LayerPruneConfig(drop={"encoder": [2], "decoder": [3, 6]})),
              ("s2", LayerPruneConfig(drop={"decoder": [8, 2]}, drop_numbering="original"))]
    previous = tmp_path / "base"
    for name, config in stages:
        run_stage(Stage(name, lambda i, w, c: layer_prune_stage(i, w, c), config), previous, tmp_path / name)
        previous = tmp_path / name
    pruned, _ = reload(previous, seq2seq=True)
    assert pruned.config.original_layer_indices == {"encoder": [0, 1, 3], "decoder": [0, 1, 4, 5, 7, 9]}
    assert json.loads((previous / "manifest.json").read_text())["metrics"]["removed"] == {"encoder": [],
                                                                                          "decoder": [2, 6]}
    assert pruned.config.num_layers == 3 and pruned.config.num_decoder_layers == 6
