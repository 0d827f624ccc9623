"""Scoring: calibration batches, hook statistics, scorers (built-in and user), the score files and plots."""

import string
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from core.adapters import get_adapter
from compress.calibration import calibration_batches, calibration_pass
from compress.plots import plot_scores
from compress.scorers import available_scorers, get_scorer, register_scorer, v2_removal_order
from compress.scoring import ImportanceScores, score_model
from core.errors import UserError
from tests.factory import FAMILIES, VOCAB, model_inputs, tiny_model

SPECIALS = ["<pad>", "</s>", "<unk>"]
CHARS = string.digits + string.ascii_letters + string.punctuation[:28] + " \n\t"


def char_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (pad 0, eos 1, unk 2) with exactly `vocab_size` ids, built offline."""
    pieces = SPECIALS + list(CHARS)
    pieces += [f"<extra_{i}>" for i in range(vocab_size - len(pieces))]
    vocab = {piece: i for i, piece in enumerate(pieces[:vocab_size])}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sample_texts(count: int = 12) -> list[str]:
    """Real prose and code from the standard library (offline), cut into paragraphs."""
    source = Path(string.__file__).read_text() + Path(__import__("textwrap").__file__).read_text()
    paragraphs = [p for p in source.split("\n\n") if len(p) > 80]
    return paragraphs[:count]


def calib_for(model, tokenizer=None, seq_len=24, num_samples=4, batch_size=2):
    tokenizer = tokenizer or char_tokenizer()
    data = datasets.Dataset.from_dict({"text": sample_texts()})
    return calibration_batches(data, tokenizer, seq_len, num_samples, batch_size, model=model)


def expected_shapes(model) -> dict[str, int]:
    adapter = get_adapter(model)
    shapes = {}
    for stack in adapter.stacks:
        shapes[f"layers.{stack}"] = len(adapter.blocks(stack))
    for stack, index, block in adapter.all_blocks():
        for view in adapter.attentions(block):
            shapes[f"heads.{stack}.{view.kind}.{index}"] = view.num_heads
        shapes[f"channels.{stack}.{index}"] = adapter.mlp(block).width
    return shapes


# --- calibration -----------------------------------------------------------------------------------------------
def test_calibration_batches_are_full_windows_with_labels():
    model = tiny_model("llama")
    calib = calib_for(model, seq_len=24, num_samples=5, batch_size=2)
    assert [b["input_ids"].shape for b in calib] == [(2, 24), (2, 24), (1, 24)]
    assert calib.num_tokens == 5 * 24
    first = calib.batches[0]
    assert torch.equal(first["labels"], first["input_ids"])
    text = sample_texts()[0]
    assert char_tokenizer().decode(first["input_ids"][0]) == text[:24]


def test_encoder_decoder_samples_are_split_between_the_stacks():
    model = tiny_model("openba")
    calib = calibration_batches(datasets.Dataset.from_dict({"text": sample_texts()}), char_tokenizer(), seq_len=20,
                                num_samples=2, batch_size=2, model=model)
    batch = calib.batches[0]
    assert batch["input_ids"].shape == (2, 12) and batch["labels"].shape == (2, 8)  # 0.6 / 0.4 of 20
    window = char_tokenizer()(sample_texts()[0][:20], add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() + batch["labels"][0].tolist() == window


def test_calibration_reads_text_files_saved_datasets_and_corpus_splits(tmp_path):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    texts = sample_texts()
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x" * 500]}),
                          "calibration": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(tmp_path / "dsd")
    from_files = calibration_batches(tmp_path / "txt", tokenizer, 24, 4, 4, model=model)
    (tmp_path / "txt" / "index.json").write_text('{"source": "notes"}')  # metadata beside text documents
    beside_metadata = calibration_batches(tmp_path / "txt", tokenizer, 24, 4, 4, model=model)
    assert torch.equal(beside_metadata.batches[0]["input_ids"], from_files.batches[0]["input_ids"])
    (tmp_path / "txt" / "index.json").unlink()
    from_saved = calibration_batches(tmp_path / "dsd", tokenizer, 24, 4, 4, model=model)
    from_list = calibration_batches(sorted((tmp_path / "txt").iterdir()), tokenizer, 24, 4, 4, model=model)
    assert torch.equal(from_files.batches[0]["input_ids"], from_saved.batches[0]["input_ids"])
    assert torch.equal(from_files.batches[0]["input_ids"], from_list.batches[0]["input_ids"])
    assert "calibration" in from_saved.description


def test_calibration_reads_jsonl_json_csv_and_parquet_rows_and_names_a_bad_row(tmp_path):
    """A document per row in `text_column` of each table format gives the batches the same documents give as text
    files; a row that is not JSON or not a record, or a missing column, is an error naming the file, line and
    setting."""
    import json

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    texts = sample_texts()
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    table = datasets.Dataset.from_dict({"id": list(range(len(texts))), "body": texts})
    table.to_json(tmp_path / "rows.jsonl")
    table.to_csv(tmp_path / "rows.csv", index=False)
    table.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(json.dumps([{"body": t} for t in texts]))
    (tmp_path / "folder").mkdir()
    table.to_parquet(tmp_path / "folder" / "train-00000.parquet")
    from compress.calibration import CalibrationConfig

    config = CalibrationConfig(seq_len=24, num_samples=4, batch_size=4, text_column="body")
    expected = calibration_batches(tmp_path / "txt", tokenizer, model=model, config=config).batches[0]["input_ids"]
    for name in ("rows.jsonl", "rows.csv", "rows.parquet", "rows.json", "folder"):
        got = calibration_batches(tmp_path / name, tokenizer, model=model, config=config).batches[0]["input_ids"]
        assert torch.equal(got, expected), name

    for name, content, message in (
        ("bad.jsonl", '{"body": "a b"}\n{not json\n', r"bad.jsonl line 2 is not JSON"),
        ("list.jsonl", '["a b"]\n', r"list.jsonl line 1 is a list, not a record with a 'body' field"),
        ("other.jsonl", '{"text": "a b"}\n', r"other.jsonl line 1 has no 'body' field \(has \['text'\]\); name it "
                                               r"with --set calibration.text_column=NAME"),
        ("other.csv", "text\na b\n", r"other.csv line 2 has no 'body' field"),
    ):
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=message):
            calibration_batches(tmp_path / name, tokenizer, model=model, config=config)
    datasets.DatasetDict({"validation": table}).save_to_disk(tmp_path / "dsd")
    with pytest.raises(UserError, match=r"no 'calibration' or 'train' split .* --set calibration.split=NAME"):
        calibration_batches(tmp_path / "dsd", tokenizer, model=model, config=config)


def test_empty_calibration_data_is_a_user_error(tmp_path):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    with pytest.raises(UserError, match="empty"):
        calibration_batches(datasets.Dataset.from_dict({"text": ["", "  \n"]}), tokenizer, 16, 2, 2, model=model)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        calibration_batches(tmp_path / "empty.txt", tokenizer, 16, 2, 2, model=model)
    with pytest.raises(UserError, match="no text files"):
        calibration_batches(_empty_dir(tmp_path), tokenizer, 16, 2, 2, model=model)
    with pytest.raises(UserError, match="not found"):
        calibration_batches(tmp_path / "missing", tokenizer, 16, 2, 2, model=model)


def _empty_dir(tmp_path):
    path = tmp_path / "empty-dir"
    path.mkdir()
    return path


def test_calibration_in_another_tokenizer_is_a_user_error():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="another tokenizer"):
        calibration_batches(datasets.Dataset.from_dict({"text": sample_texts()}), char_tokenizer(VOCAB + 64), 16, 2,
                            2, model=model)
    tokenized = datasets.Dataset.from_dict({"input_ids": [[5, 7, 3000, 9] * 8]})
    with pytest.raises(UserError, match="another tokenizer"):
        calibration_batches(tokenized, None, 16, 2, 2, model=model)


# --- statistics and scorers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_have_the_shape_of_every_unit_and_are_finite(family):
    model = tiny_model(family)
    calib = calib_for(model)
    expected = expected_shapes(model)
    for scorers in ({"layers": "block_influence", "heads": "wanda", "channels": "activation"},
                    {"layers": "angular_distance", "heads": "taylor", "channels": "taylor"}):
        scores = score_model(model, calib, scorers, progress=False)
        assert {name: t.numel() for name, t in scores.tensors.items()} == expected
        assert all(torch.isfinite(t).all() for t in scores.tensors.values()), scores.summary()
        assert scores.meta["num_tokens"] == calib.num_tokens and scores.meta["scorers"] == scorers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "openba"])
def test_every_scorer_gives_the_cpu_scores_on_a_cuda_model(family):
    """Scorers mix per-column stats with weights and gradients; on a GPU model these must meet on one device."""
    model = tiny_model(family)
    calib = calib_for(model)
    gpu_model = tiny_model(family).cuda()
    gpu_model.load_state_dict(model.state_dict())
    for unit in ("layers", "heads", "channels"):
        for name in available_scorers(unit):
            on_cpu = score_model(model, calib, {unit: name}, progress=False)
            on_gpu = score_model(gpu_model, calib, {unit: name}, progress=False)
            assert on_gpu.tensors.keys() == on_cpu.tensors.keys()
            for key, value in on_cpu.tensors.items():
                torch.testing.assert_close(on_gpu.tensors[key], value, rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")


def test_block_influence_matches_a_hand_computation_that_skips_padding():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: these positions must not count
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    scores = score_model(model, [batch], {"layers": "block_influence"}, progress=False)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for i in range(len(hidden) - 2):  # the last entry has the final norm applied: not a block output
        h_in, h_out = hidden[i][real], hidden[i + 1][real]
        cos = (h_in * h_out).sum(-1) / (h_in.norm(dim=-1) * h_out.norm(dim=-1))
        assert scores.layer_scores("decoder")[i].item() == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    angular = score_model(model, [batch], {"layers": "angular_distance"}, progress=False).layer_scores("decoder")
    assert torch.all((angular > 0) & (angular < 0.5))


def test_zeroed_channel_and_head_score_zero_under_activation_wanda_and_taylor():
    model = tiny_model("llama")
    block = model.model.layers[1]
    with torch.no_grad():
        block.mlp.up_proj.weight[5].zero_()  # channel 5 never fires
        block.mlp.gate_proj.weight[5].zero_()
        block.mlp.down_proj.weight[:, 5].zero_()
        head_dim = block.self_attn.head_dim
        block.self_attn.o_proj.weight[:, 3 * head_dim: 4 * head_dim].zero_()  # head 3 writes nothing
    calib = calib_for(model)
    for name in ("activation", "wanda", "taylor"):
        scores = score_model(model, calib, {"channels": name, "heads": name}, progress=False)
        channels = scores.channel_scores("decoder", 1)
        assert channels[5].item() == 0.0 and channels.min() == 0.0 and (channels > 0).sum() == channels.numel() - 1
        if name != "activation":  # the head still computes: only weight-aware scorers see its zero output weights
            heads = scores.head_scores("decoder", "self", 1)
            assert heads.argmin().item() == 3 and heads[3] < 0.5 * heads.median()


def test_wanda_channel_scores_equal_weight_norm_times_input_norm():
    model = tiny_model("llama")
    calib = calib_for(model)
    seen = []
    down = model.model.layers[2].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 128)))
    calibration_pass(model, calib, progress=False)
    handle.remove()
    x = torch.cat(seen)
    expected = down.weight.detach().abs().sum(0) * x.norm(dim=0)
    scores = score_model(model, calib, {"channels": "wanda"}, progress=False)
    torch.testing.assert_close(scores.channel_scores("decoder", 2), expected, rtol=1e-5, atol=1e-6)
    activation = score_model(model, calib, {"channels": "activation"}, progress=False)
    torch.testing.assert_close(activation.channel_scores("decoder", 2), x.abs().mean(0), rtol=1e-5, atol=1e-7)


def test_taylor_channel_scores_equal_weight_times_gradient_of_the_calibration_loss():
    model = tiny_model("llama")
    calib = calib_for(model, num_samples=2, batch_size=2)
    scores = score_model(model, calib, {"channels": "taylor"}, progress=False)
    batch = calib.batches[0]
    loss = model(**batch).loss * int((batch["labels"] != -100).sum())
    mlp = model.model.layers[0].mlp
    grads = torch.autograd.grad(loss, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])
    expected = ((mlp.gate_proj.weight * grads[0]).abs().sum(1) + (mlp.up_proj.weight * grads[1]).abs().sum(1)
                + (mlp.down_proj.weight * grads[2]).abs().sum(0)).detach()
    torch.testing.assert_close(scores.channel_scores("decoder", 0), expected, rtol=1e-4, atol=1e-7)


def test_scoring_leaves_no_hooks_gradients_or_changed_flags():
    model = tiny_model("t5")
    model.shared.weight.requires_grad_(False)
    calib = calib_for(model)
    inputs = model_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    score_model(model, calib, {"layers": "skip_loss", "heads": "taylor", "channels": "wanda"}, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert model.shared.weight.requires_grad is False
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_skip_loss_is_zero_for_a_block_that_is_already_an_identity():
    model = tiny_model("llama")
    block = model.model.layers[2]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    scores = score_model(model, calib_for(model), {"layers": "skip_loss"}, progress=False).layer_scores("decoder")
    assert scores[2].abs().item() < 1e-6
    assert scores.abs().max() > 1e-4


def test_v2_heuristic_keeps_first_and_last_and_spreads_the_dropped_layers():
    model = tiny_model("openba")
    scores = score_model(model, None, {"layers": "v2_heuristic"}, progress=False).layer_scores("decoder")
    assert min(scores[0], scores[-1]) > scores[1:-1].max()
    order = v2_removal_order(36)
    assert 0 not in order and 35 not in order and sorted(order) == list(range(1, 35))
    first_six = sorted(order[:6])
    assert min(b - a for a, b in zip(first_six, first_six[1:])) >= 4  # spread apart, like the paper's picks
    assert 12 <= order[0] <= 23  # the middle goes first


def test_random_scores_are_seeded():
    model = tiny_model("qwen2")
    one = score_model(model, None, {"layers": "random", "heads": "random"}, seed=3, progress=False)
    two = score_model(model, None, {"layers": "random", "heads": "random"}, seed=3, progress=False)
    other = score_model(model, None, {"layers": "random"}, seed=4, progress=False)
    assert all(torch.equal(one[n], two[n]) for n in one.names())
    assert not torch.equal(one.layer_scores("decoder"), other.layer_scores("decoder"))


# --- user scorers ----------------------------------------------------------------------------------------------
@register_scorer("layers", "test_depth_first")
def depth_first(ctx):
    """Deeper blocks matter more (a scorer made up for the test)."""
    return torch.arange(ctx.num_blocks, dtype=torch.float32)


def norm_per_channel(ctx):
    """A plain function found by dotted path: the L2 input norm of each channel."""
    return ctx.stats["act_norm"] * 2


norm_per_channel.needs = ("act_norm",)


def test_user_scorers_by_decorator_and_by_dotted_path():
    model = tiny_model("llama")
    calib = calib_for(model)
    assert "test_depth_first" in available_scorers("layers")
    scores = score_model(model, calib, {"layers": "test_depth_first",
                                        "channels": "tests.compress.test_scoring:norm_per_channel"}, progress=False)
    assert scores.layer_scores("decoder").tolist() == [0.0, 1.0, 2.0, 3.0]
    wanda_free = score_model(model, calib, {"channels": "wanda"}, progress=False)  # same act_norm statistic
    weight = model.model.layers[0].mlp.down_proj.weight.detach().abs().sum(0)
    torch.testing.assert_close(scores.channel_scores("decoder", 0) / 2 * weight,
                               wanda_free.channel_scores("decoder", 0))
    assert scores.meta["scorers"]["channels"] == "tests.compress.test_scoring:norm_per_channel"


def test_unknown_scorers_and_bad_user_scorers_are_user_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="unknown layers scorer 'block_influense'"):
        score_model(model, calib_for(model), {"layers": "block_influense"}, progress=False)
    with pytest.raises(UserError, match="cannot import"):
        get_scorer("heads", "no_such_module_xyz:scorer")
    with pytest.raises(UserError, match="has no"):
        get_scorer("heads", "tests.compress.test_scoring:missing")
    with pytest.raises(UserError, match="unknown statistics"):
        register_scorer("heads", "bad", needs=("telepathy",))
    with pytest.raises(UserError, match="returned 3 scores"):
        score_model(model, None, {"layers": "tests.compress.test_scoring:three_scores"}, progress=False)


def three_scores(ctx):
    return torch.zeros(3)


# --- files -----------------------------------------------------------------------------------------------------
def test_scores_round_trip_through_safetensors_and_json_and_plot(tmp_path):
    model = tiny_model("openba")
    scores = score_model(model, calib_for(model), {"layers": "block_influence", "heads": "activation",
                                                   "channels": "wanda"}, progress=False)
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    assert loaded.names() == scores.names() and all(torch.equal(loaded[n], scores[n]) for n in scores.names())
    assert loaded.meta["scorers"] == scores.meta["scorers"] and loaded.meta["model_type"] == "openba"
    assert loaded.head_scores("decoder", "cross", 1).numel() == model.config.num_heads
    plots = plot_scores(scores, tmp_path, marked={"decoder": [2]})
    assert [p.name for p in plots] == ["scores_encoder.png", "scores_decoder.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    with pytest.raises(UserError, match="no scores.safetensors"):
        ImportanceScores.load(tmp_path / "nowhere")


def test_score_command_writes_scores_plots_and_manifest(tmp_path, capsys):
    from compress.score import main

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "calib").mkdir()
    for i, text in enumerate(sample_texts()):
        (tmp_path / "calib" / f"{i}.txt").write_text(text)
    main(["--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib"), "--out", str(tmp_path / "scores"),
          "--layers", "block_influence", "--heads", "wanda", "--channels", "activation", "--no-progress",
          "--set", "calibration.seq_len=24", "--set", "calibration.num_samples=4"])
    out = capsys.readouterr().out
    assert "block_influence" in out and "wanda" in out and "activation" in out
    files = {p.name for p in (tmp_path / "scores").iterdir()}
    assert {"scores.safetensors", "scores.json", "scores_decoder.png", "manifest.json"} <= files
    loaded = ImportanceScores.load(tmp_path / "scores")
    assert loaded.meta["num_tokens"] == 4 * 24
    assert {name: t.numel() for name, t in loaded.tensors.items()} == expected_shapes(model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "bad"), "--layers", "nope"])
    assert exit_info.value.code == 2 and "unknown layers scorer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_score_command_turns_a_default_unit_off_with_none_and_keeps_a_finished_output(tmp_path, capsys):
    from compress.score import main

    tiny_model("llama").save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "scores"), "--layers", "none", "--heads",
            "random", "--no-progress"]
    main(argv)  # random scores need no calibration data
    loaded = ImportanceScores.load(tmp_path / "scores")
    assert loaded.names("layers") == [] and len(loaded.names("heads")) == 4
    first = (tmp_path / "scores" / "manifest.json").read_text()
    main(argv)
    assert (tmp_path / "scores" / "manifest.json").read_text() == first
    main([*argv, "--force"])
    assert (tmp_path / "scores" / "manifest.json").read_text() != first


@pytest.mark.parametrize("case, message", [
    ("unknown scorer", "unknown heads scorer 'nope'"),
    ("no data", "need calibration data"),
    ("nothing", "nothing to score"),
    ("user files", "already holds files this stage did not write (mine.txt)"),
    ("inside input", "lies inside it"),
    ("a file", "exists and is not a directory"),
    ("no model", "does not exist"),
])
def test_score_command_refuses_bad_input_before_writing(tmp_path, capsys, case, message):
    from compress.score import main
    from tests.core.test_out_policy import refused

    model, out = tmp_path / "model", tmp_path / "scores"
    tiny_model("llama").save_pretrained(model)
    flags = {"unknown scorer": ["--heads", "nope"], "no data": [], "nothing": ["--layers", "none"]}.get(case, [])
    if case == "user files":
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    elif case == "inside input":
        out = model / "scores"
    elif case == "a file":
        out.write_text("a file")
    elif case == "no model":
        model = tmp_path / "nowhere"
    scorers = [] if case in ("no data", "nothing") else ["--heads", "random", "--layers", "random"]  # need no data
    error = refused(lambda m, o: main(["--model", str(m), "--out", str(o), *scorers, *flags, "--no-progress"]),
                    model, out, tmp_path, capsys)
    assert message in error


def test_score_command_help_has_an_example(capsys):
    from compress.score import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "example" in capsys.readouterr().out


def test_forward_statistics_of_every_unit_come_from_one_forward_per_batch():
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    calib = calib_for(model, num_samples=4, batch_size=2)
    score_model(model, calib, {"layers": "block_influence", "heads": "wanda", "channels": "activation"},
                progress=False)
    handle.remove()
    assert len(calls) == len(calib)  # one forward per batch, however many statistics

