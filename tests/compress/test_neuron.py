"""Neuron pruning on tiny random models of every family: FFN channels, kv groups, hidden dims, budgets, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from core.adapters import get_adapter
from compress.neuron import hidden_scores, prune_neurons, round_width
from core.checkpoint import count_parameters
from core.errors import UserError
from tests.factory import calibration_file, model_inputs, save_with_tokenizer, tiny_model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def reload(model, path):
    model.save_pretrained(str(path))
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(str(path)).eval()


def random_scores(model, seed=0):
    """Hand-made scores in the ImportanceScores naming, plus `hidden`."""
    generator = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    scores = {"hidden": torch.rand(adapter.input_embeddings().embedding_dim, generator=generator)}
    for stack, i, block in adapter.all_blocks():
        scores[f"channels.{stack}.{i}"] = torch.rand(adapter.mlp(block).width, generator=generator)
        for view in adapter.attentions(block):
            scores[f"heads.{stack}.{view.kind}.{i}"] = torch.rand(view.num_heads, generator=generator)
    return scores


def halving(adapter):
    """Half of every unit the family can prune."""
    targets = {"ffn_ratio": 0.5}
    if adapter.supports_head_pruning:
        targets["head_ratio"] = 0.5
    if adapter.supports_hidden_pruning:
        targets["hidden_ratio"] = 0.5
    return targets


def test_keeping_every_unit_is_the_identity(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    before = logits(model, inputs)
    adapter = get_adapter(model)
    targets = {k: 1.0 for k in halving(adapter)}
    result = prune_neurons(model, random_scores(model), **targets)
    assert result.params_after == result.params_before
    assert torch.equal(logits(model, inputs), before)


def test_pruning_zeroed_channels_and_kv_groups_leaves_logits_unchanged(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    scores = random_scores(model)
    for stack, i, block in adapter.all_blocks():
        mlp = adapter.mlp(block)
        dead = torch.arange(0, mlp.width, 2)  # every other channel contributes nothing ...
        mlp.linear(mlp.down).weight.data[:, dead] = 0
        scores[f"channels.{stack}.{i}"][dead] -= 10  # ... and scores lowest
        if adapter.supports_head_pruning:
            for view in adapter.attentions(block):
                dead_heads = view.num_heads // 2  # the first half of the kv groups (and their query heads)
                view.linear(view.o).weight.data[:, : dead_heads * view.head_dim] = 0
                scores[f"heads.{stack}.{view.kind}.{i}"][:dead_heads] -= 10
    inputs = model_inputs(model)
    before = logits(model, inputs)
    heads = {"head_ratio": 0.5} if adapter.supports_head_pruning else {}
    widths = [adapter.mlp(block).width for _, _, block in adapter.all_blocks()]
    prune_neurons(model, scores, ffn_ratio=0.5, **heads)
    assert [adapter.mlp(block).width for _, _, block in adapter.all_blocks()] == [w // 2 for w in widths]
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-6, rtol=0)


def test_surviving_llama_weights_are_the_original_rows_and_columns():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks("decoder")[2]
    attn, mlp = block.self_attn, block.mlp
    original = {name: p.detach().clone() for name, p in block.named_parameters()}
    scores = random_scores(model)
    channel_scores, head_scores = scores["channels.decoder.2"], scores["heads.decoder.self.2"]
    prune_neurons(model, scores, ffn_width=48, heads=4)
    kept_channels = torch.argsort(channel_scores, descending=True)[:48].sort().values
    assert torch.equal(mlp.gate_proj.weight, original["mlp.gate_proj.weight"][kept_channels])
    assert torch.equal(mlp.up_proj.weight, original["mlp.up_proj.weight"][kept_channels])
    assert torch.equal(mlp.down_proj.weight, original["mlp.down_proj.weight"][:, kept_channels])
    groups = head_scores.reshape(4, 2).sum(1)  # 8 query heads in 4 kv groups: a group scores its heads' sum
    kept_groups = torch.argsort(groups, descending=True)[:2].sort().values
    kv_rows = (kept_groups[:, None] * 8 + torch.arange(8)).reshape(-1)
    q_rows = ((kept_groups[:, None] * 2 + torch.arange(2)).reshape(-1)[:, None] * 8 + torch.arange(8)).reshape(-1)
    assert torch.equal(attn.k_proj.weight, original["self_attn.k_proj.weight"][kv_rows])
    assert torch.equal(attn.v_proj.weight, original["self_attn.v_proj.weight"][kv_rows])
    assert torch.equal(attn.q_proj.weight, original["self_attn.q_proj.weight"][q_rows])
    assert torch.equal(attn.o_proj.weight, original["self_attn.o_proj.weight"][:, q_rows])


def test_surviving_openba_weights_follow_the_fused_layouts():
    model = tiny_model("openba")  # fc_in = [gate; up], qkv rows grouped per head as [q_h; k_h; v_h]
    block = model.decoder.block[1]
    fc_in, qkv, kv = (m.weight.detach().clone() for m in (block.mlp.fc_in, block.self_attn.qkv, block.inter_attn.kv))
    scores = random_scores(model)
    prune_neurons(model, scores, ffn_width=128, heads=2)
    channels = torch.argsort(scores["channels.decoder.1"], descending=True)[:128].sort().values
    assert torch.equal(block.mlp.fc_in.weight, fc_in[torch.cat([channels, channels + 512])])
    heads = torch.argsort(scores["heads.decoder.self.1"], descending=True)[:2].sort().values
    assert torch.equal(block.self_attn.qkv.weight, fc_qkv_rows(qkv, heads, 3 * 32))
    cross = torch.argsort(scores["heads.decoder.cross.1"], descending=True)[:2].sort().values
    assert torch.equal(block.inter_attn.kv.weight, fc_qkv_rows(kv, cross, 2 * 32))


def fc_qkv_rows(weight, heads, rows_per_head):
    return torch.cat([weight[h * rows_per_head:(h + 1) * rows_per_head] for h in heads.tolist()])


def test_pruned_model_reloads_with_equal_logits(family, tmp_path):
    model = tiny_model(family)
    prune_neurons(model, random_scores(model), **halving(get_adapter(model)))
    inputs = model_inputs(model)
    reloaded = reload(model, tmp_path)
    assert count_parameters(reloaded) == count_parameters(model)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_gqa_llama_keeps_whole_kv_groups_and_reloads(tmp_path):
    model = tiny_model("llama")  # 8 query heads, 4 kv heads
    prune_neurons(model, random_scores(model), heads=4)
    attention = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert attention.num_key_value_groups == 2
    assert attention.q_proj.out_features == 4 * 8 and attention.k_proj.out_features == 2 * 8
    inputs = model_inputs(model)
    assert torch.equal(logits(reload(model, tmp_path), inputs), logits(model, inputs))


def test_per_layer_openba_widths_follow_the_global_ranking_and_reload(tmp_path):
    model = tiny_model("openba")
    scores = random_scores(model)
    scores["channels.decoder.0"] += 1.0  # decoder layer 0's channels beat every other layer's
    scores["channels.decoder.5"] -= 1.0  # decoder layer 5's channels lose to every other layer's
    result = prune_neurons(model, scores, ffn_ratio=0.5, head_ratio=0.5, per_layer=True, round_to=16)
    widths = result.widths_after["decoder"]["ffn"]
    assert widths[0] == 512 and widths[5] == 16  # all kept / one rounding multiple, never zero
    assert all(w % 16 == 0 for w in widths)
    assert model.config.decoder_ffn_sizes == widths
    inputs = model_inputs(model)
    assert torch.equal(logits(reload(model, tmp_path), inputs), logits(model, inputs))


def test_t5_keeps_one_head_set_per_stack_ranked_by_the_summed_score():
    model = tiny_model("t5")
    scores = random_scores(model)
    for i in range(3):
        scores[f"heads.encoder.self.{i}"] = torch.tensor([0.0, 1.0, 0.0, 0.5]) if i else torch.tensor([1.0, 0, 0, 0.6])
    prune_neurons(model, scores, heads=2)
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.shape[1] == 2
    original = tiny_model("t5").encoder.block[1].layer[0].SelfAttention.q.weight
    # summed over layers: head 0 -> 1.0, head 1 -> 2.0, head 3 -> 1.6: heads 1 and 3 survive in every layer
    kept = torch.cat([original[16:32], original[48:64]])
    assert torch.equal(model.encoder.block[1].layer[0].SelfAttention.q.weight, kept)


def test_hidden_pruning_keeps_a_tied_llama_head_tied_and_reloads(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    prune_neurons(model, random_scores(model), hidden=32, heads=4, ffn_width=64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = model_inputs(model)
    assert torch.equal(logits(reload(model, tmp_path), inputs), logits(model, inputs))


def test_hidden_pruning_keeps_the_top_scored_dimensions(tmp_path):
    model = tiny_model("qwen2")
    scores = random_scores(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    prune_neurons(model, scores, hidden=40, round_to=8)
    kept = torch.argsort(scores["hidden"], descending=True)[:40].sort().values
    assert model.config.hidden_size == 40
    assert torch.equal(model.model.embed_tokens.weight, embed[:, kept])


def test_round_width_rounds_to_the_nearest_multiple_and_never_to_zero():
    assert round_width(6880, 128, 11008) == 6912  # OpenBA-V2's FFN width: 11008 * 0.625 rounded to 128
    assert round_width(3, 64, 11008) == 64
    assert round_width(100, 64, 96) == 96  # never more than exist
    assert round_width(0.2, 1, 10) == 1


def test_rounded_widths_are_multiples():
    model = tiny_model("openba")
    prune_neurons(model, random_scores(model), ffn_ratio=0.3, hidden_ratio=0.3, round_to=32)
    assert model.config.ffn_hidden_size == 160 and model.config.hidden_size == 64  # 153.6 -> 160, 57.6 -> 64


def test_budget_solves_the_largest_width_ratio_under_the_target():
    model = tiny_model("llama")
    before = count_parameters(model)
    result = prune_neurons(model, random_scores(model), target_params=int(0.7 * before))
    assert result.params_after == count_parameters(model) <= 0.7 * before
    assert result.params_after >= 0.6 * before
    assert 0.5 < result.solved_ratio < 1.0


@pytest.mark.parametrize("request_, message", [
    ({"heads": 3}, "multiple of the kv group"),
    ({"heads": 16}, "cannot keep 16 heads"),
    ({"ffn_width": 0}, "at least 1"),
    ({"ffn_width": 1000}, "cannot keep 1000 FFN"),
    ({"ffn_ratio": 1.5}, r"\(0, 1\]"),
    ({"hidden": 128}, "cannot keep 128 hidden"),
    ({"heads": 6}, "divisible"),  # LlamaConfig: hidden 64 is not a multiple of 6 heads
    ({"ffn_ratio": 0.5, "per_layer": True}, "per-layer"),
    ({"target_params": 1000}, "out of reach"),
    ({}, "nothing to prune"),
])
def test_bad_requests_are_user_errors_that_leave_the_model_unchanged(request_, message):
    model = tiny_model("llama")
    inputs = model_inputs(model)
    before = logits(model, inputs)
    with pytest.raises(UserError, match=message):
        prune_neurons(model, random_scores(model), **request_)
    assert torch.equal(logits(model, inputs), before)
    assert model.config.intermediate_size == 128 and model.config.num_attention_heads == 8


def test_families_that_cannot_prune_heads_or_hidden_say_why():
    model = tiny_model("gpt_neox")
    with pytest.raises(UserError, match="head pruning is not supported"):
        prune_neurons(model, random_scores(model), heads=2)
    with pytest.raises(UserError, match="hidden-dimension pruning is not supported"):
        prune_neurons(model, random_scores(model), hidden=32)


def test_scores_of_another_model_are_refused():
    model = tiny_model("llama")
    scores = random_scores(model)
    scores["channels.decoder.1"] = torch.rand(100)
    with pytest.raises(UserError, match="another model"):
        prune_neurons(model, scores, ffn_ratio=0.5)
    del scores["channels.decoder.1"]
    with pytest.raises(UserError, match="no 'channels.decoder.1'"):
        prune_neurons(model, scores, ffn_ratio=0.5)
    assert model.config.intermediate_size == 128


def test_activation_hidden_scores_find_the_loudest_residual_dimension():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.data[:, 5] += 50.0  # dimension 5 carries a large value through every block
    batches = [{"input_ids": model_inputs(model)["input_ids"]}]
    scores = hidden_scores(model, batches, progress=False)
    assert scores.shape == (64,) and int(scores.argmax()) == 5
    assert torch.equal(hidden_scores(model, scorer="random", seed=3), hidden_scores(model, scorer="random", seed=3))


# --- command line --------------------------------------------------------------------------------------------------
def run_cli(argv):
    from compress.neuron import main

    main([*argv, "--no-progress", "--set", "calibration.num_samples=4", "--set", "calibration.seq_len=32"])


def test_cli_prunes_by_activation_and_the_output_loads_with_plain_auto_classes(tmp_path, capsys):
    from transformers import AutoTokenizer

    from compress.neuron import load_scores

    save_with_tokenizer(tiny_model("llama"), tmp_path / "model")
    out = tmp_path / "pruned"
    run_cli(["--model", str(tmp_path / "model"), "--calib", str(calibration_file(tmp_path / "calib.txt")),
             "--ffn-width", "64", "--heads", "4", "--hidden", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "128 -> 64" in printed and "8 -> 4" in printed and "64 -> 32" in printed
    assert (out / "manifest.json").is_file() and (out / "scores" / "scores.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert AutoTokenizer.from_pretrained(str(out))("w1 w2")["input_ids"] == [4, 5]
    # the same scores applied in memory give the same model
    scores, hidden = load_scores(out / "scores")
    expected = tiny_model("llama")
    prune_neurons(expected, {**scores.tensors, "hidden": hidden}, ffn_width=64, heads=4, hidden=32)
    inputs = model_inputs(expected)
    assert torch.equal(logits(reloaded, inputs), logits(expected, inputs))


def test_cli_random_scorer_needs_no_data_and_prunes_openba(tmp_path, capsys):
    tiny_model("openba").save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "pruned"
    run_cli(["--model", str(tmp_path / "model"), "--scorer", "random", "--ffn-width", "250", "--heads", "4",
             "--hidden", "100", "--round-to", "32", "--out", str(out)])
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    config = reloaded.config
    assert (config.ffn_hidden_size, config.num_heads, config.hidden_size) == (256, 4, 96)
    assert "kept" in capsys.readouterr().out


@pytest.mark.parametrize("family, extra, message", [
    ("llama", ["--heads", "3"], "multiple of the kv group"),
    ("llama", ["--ffn-width", "64", "--scorer", "wanda"], "needs calibration data"),
    ("llama", ["--ffn-width", "64", "--scorer", "nope"], "unknown channels scorer"),
    ("gpt_neox", ["--heads", "2", "--scorer", "random"], "head pruning is not supported"),
    ("llama", ["--scorer", "random"], "nothing to prune"),
    ("llama", ["--target-params", "1000", "--scorer", "random"], "out of reach"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, family, extra, message):
    from tests.core.test_out_policy import refused

    save_with_tokenizer(tiny_model(family), tmp_path / "model")
    error = refused(lambda model, out: run_cli(["--model", str(model), "--out", str(out), *extra]),
                    tmp_path / "model", tmp_path / "pruned", tmp_path, capsys)
    assert message in error


def test_bad_inputs_and_outputs_are_refused_before_anything_is_written(tmp_path, capsys):
    """The --out policy (a folder of the user's files, the input or inside it, an existing file), a missing model and
    weights that disagree with config.json: one error line each, and every file as it was."""
    import json

    from tests.core.test_out_policy import refused

    save_with_tokenizer(tiny_model("llama"), tmp_path / "model")
    calibration_file(tmp_path / "calib.txt")

    def prune(model, out):
        run_cli(["--model", str(model), "--calib", str(tmp_path / "calib.txt"), "--ffn-width", "64", "--out", str(out)])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    (tmp_path / "report.txt").write_text("keep me")
    cases = [(tmp_path / "model", mine, "already holds files this stage did not write (notes.md)"),
             (tmp_path / "model", tmp_path / "model" / "sub", "lies inside it"),
             (tmp_path / "model", tmp_path / "model", "is the input"),
             (tmp_path / "model", tmp_path / "report.txt", "exists and is not a directory"),
             (tmp_path / "nowhere", tmp_path / "out", "does not exist")]
    for model, out, message in cases:
        assert message in refused(prune, model, out, tmp_path, capsys)
    deeper = tmp_path / "deeper"  # config.json names a layer the weights do not hold
    save_with_tokenizer(tiny_model("llama"), deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    assert "missing from the weights" in refused(prune, deeper, tmp_path / "out", tmp_path, capsys)


def test_a_finished_prune_is_kept_unless_forced(tmp_path, capsys):
    save_with_tokenizer(tiny_model("llama"), tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--scorer", "random", "--ffn-width", "64", "--out",
            str(tmp_path / "pruned")]
    run_cli(argv)
    first = (tmp_path / "pruned" / "manifest.json").read_text()
    run_cli(argv)
    assert (tmp_path / "pruned" / "manifest.json").read_text() == first
    run_cli([*argv, "--force"])
    assert (tmp_path / "pruned" / "manifest.json").read_text() != first
