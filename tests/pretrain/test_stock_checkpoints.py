"""Training commands on stock checkpoints (a Llama, Qwen2, Mistral, GPT-NeoX or T5 with the kind of tokenizer that
family ships, see stock.py): causal and prefix LM need no UL2 tokens, UL2 on a tokenizer without them is refused in
one line naming the flag or, with `add_sentinels`, adds them with mean-initialised embedding rows; LOGO data and
training, and the recipe's train and align kinds, run on them too."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from core.checkpoint import load_model, load_tokenizer
from core.stage import Manifest, partial_dir
from pretrain.continual import ContinualConfig, add_special_tokens, build_mixture, main
from pretrain.objectives import ObjectiveBatches
from pretrain.tokenizer import MODE_TOKENS, mode_token_ids, sentinel_ids
from tests.factory import tiny_model
from tests.pretrain.stock import FAMILIES

DECODER_ONLY = [f for f in FAMILIES if f != "t5"]


def short_run(corpus, *settings: str) -> list[str]:
    return [f"--set=data.paths=[{corpus}]", "--set=input_length=48", "--set=target_length=24",
            "--set=validation_batches=1", "--set=train.steps=2", "--set=train.lr=1e-2", "--set=train.warmup_steps=0",
            "--set=train.micro_batch_size=2", "--set=train.eval_every=2", "--set=train.save_every=2",
            *[f"--set={s}" for s in settings]]


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("family, objective", [(f, "causal") for f in DECODER_ONLY] + [(f, "prefix") for f in FAMILIES])
def test_causal_and_prefix_lm_train_a_stock_checkpoint_with_its_own_tokenizer(family, objective, stock_dirs,
                                                                              stock_corpus, tmp_path):
    source, out = stock_dirs(family), tmp_path / "out"
    packing = ["packed=false"] if family == "t5" else []  # T5 has no segment-id masks (tests/pretrain/test_packing.py)
    main(["--model", str(source), "--out", str(out), *short_run(stock_corpus, f"objective={objective}", *packing)])
    metrics = Manifest.read(out).metrics
    assert metrics["steps"] == 2 and metrics["added_tokens"] is None
    assert list(metrics["per_objective"]) == [objective] and metrics["val_loss"] < 20
    assert load_tokenizer(out).get_vocab() == load_tokenizer(source).get_vocab()
    before, after = weights(source), weights(out)
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family, missing", [("llama", 103), ("t5", 3)])
def test_ul2_on_a_tokenizer_without_its_tokens_is_refused_in_one_line_naming_the_flag(family, missing, stock_dirs,
                                                                                       stock_corpus, tmp_path, capsys):
    source, out = stock_dirs(family), tmp_path / "out"
    capsys.readouterr()  # building the fixture prints progress bars
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(source), "--out", str(out), *short_run(stock_corpus, "objective=ul2")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--set add_sentinels=true" in error and f"({missing}: " in error
    assert not out.exists() and not partial_dir(out).exists()


def _mean_rows_check(model, ids, existing: int) -> None:
    matrices = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        matrices.append(model.get_output_embeddings().bias)
    for matrix in matrices:
        expected = matrix[:existing].mean(0)
        for i in ids:
            torch.testing.assert_close(matrix[i], expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "t5", "openba"])
def test_add_sentinels_adds_the_missing_ul2_tokens_with_mean_initialised_rows(family, stock_dirs, tmp_path):
    """Llama grows by 103 rows; Qwen2 reuses its 16 padding rows and grows by the rest; T5 has its sentinels and
    padding rows for the three mode tokens; OpenBA (with a head bias) grows and gets the mean bias."""
    if family == "openba":
        tokenizer = load_tokenizer(stock_dirs("llama"))
        model = tiny_model("openba", vocab_size=len(tokenizer))
        with torch.no_grad():
            model.lm_head.bias.normal_()
    else:
        model, tokenizer = load_model(stock_dirs(family)), load_tokenizer(stock_dirs(family))
    existing, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    old_input = model.get_input_embeddings().weight[:existing].clone()
    old_head = model.get_output_embeddings().weight[:existing].clone()

    added = add_special_tokens(model, tokenizer, ContinualConfig(objective="mix", add_sentinels=True))

    expected = 3 if family == "t5" else 103
    assert len(added["tokens"]) == expected and added["rows_before"] == rows
    assert added["rows_after"] == max(rows, existing + expected) == model.config.vocab_size
    assert set(MODE_TOKENS.values()) <= set(added["tokens"]) and len(sentinel_ids(tokenizer)) == 100
    new_ids = list(mode_token_ids(tokenizer).values()) + (sentinel_ids(tokenizer) if family != "t5" else [])
    assert sorted(new_ids) == list(range(existing, existing + expected))
    _mean_rows_check(model, new_ids, existing)
    torch.testing.assert_close(model.get_input_embeddings().weight[:existing], old_input, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:existing], old_head, rtol=0, atol=0)
    # a second call finds nothing missing
    assert add_special_tokens(model, tokenizer, ContinualConfig(objective="ul2", add_sentinels=True)) is None


def test_decoder_only_ul2_rows_are_prefix_lm_style_with_loss_on_the_targets_only(stock_dirs):
    model, tokenizer = load_model(stock_dirs("gpt_neox")), load_tokenizer(stock_dirs("gpt_neox"))
    config = ContinualConfig(objective="ul2", add_sentinels=True)
    add_special_tokens(model, tokenizer, config)
    mixture = build_mixture(config, tokenizer)
    document = tokenizer("def add(a, b):\n    return a + b\n" * 20, add_special_tokens=False)["input_ids"]
    batches = ObjectiveBatches([document], mixture, batch_size=2, input_length=64, encoder_decoder=False, seed=0)
    sentinels, modes = set(sentinel_ids(tokenizer)), set(mode_token_ids(tokenizer).values())
    for _ in range(6):
        batch = next(batches)
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            first_label = next(i for i, label in enumerate(labels) if label != -100)
            assert ids[0] in modes and sentinels & set(ids[:first_label])  # inputs: mode token, sentinels
            assert labels[first_label] in sentinels and labels[first_label] == ids[first_label]
            assert all(label == -100 for label in labels[:first_label])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_ul2_with_add_sentinels_trains_and_saves_the_grown_checkpoint(family, stock_dirs, stock_corpus, tmp_path):
    source, out = stock_dirs(family), tmp_path / "out"
    main(["--model", str(source), "--out", str(out),
          *short_run(stock_corpus, "objective=ul2", "add_sentinels=true", f"packed={family != 't5'}")])
    added = Manifest.read(out).metrics["added_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    existing = len(load_tokenizer(source))
    assert len(tokenizer) == existing + len(added["tokens"])
    assert mode_token_ids(tokenizer) == {m: existing + len(added["tokens"]) - 3 + i for i, m in enumerate("RSX")}
    assert tokenizer("<extra_id_7>", add_special_tokens=False)["input_ids"] == [sentinel_ids(tokenizer)[7]]
    model_cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    model = model_cls.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == added["rows_after"] >= len(tokenizer)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == added["rows_after"]


def test_align_commands_run_on_stock_checkpoints(stock_dirs, stock_corpus, tmp_path, capsys):
    from align.build_data import main as build_data
    from align.logo import main as logo

    data_settings = ["data.samples=4", "data.chunk_size=64", "data.document_chunks=10", "data.context_chunks=6",
                     "data.full_chunks=3", "data.half_chunks=2", "data.wrong_chunks=2"]
    train_settings = ["train.steps=2", "train.grad_accum_steps=1", "train.warmup_steps=1", "train.lr=1e-2",
                      "position.window=2048", "position.chunk_size=64", "position.max_chunks=8"]
    for family in FAMILIES:
        source = stock_dirs(family)
        data, out = tmp_path / f"data-{family}", tmp_path / f"logo-{family}"
        build_data(["--tokenizer", str(source), "--out", str(data), "--corpus", str(stock_corpus),
                    *[f"--set={s}" for s in data_settings]])
        assert Manifest.read(data).metrics["rows"] == 4
        settings = train_settings + (["position.synthesize=false"] if family == "t5" else [])
        logo(["--model", str(source), "--data", str(data), "--out", str(out), *[f"--set={s}" for s in settings]])
        assert Manifest.read(out).metrics["step"] == 2
        before, after = weights(source), weights(out)
        assert any(not torch.equal(before[k], after[k]) for k in before), family
        assert load_tokenizer(out).get_vocab() == load_tokenizer(source).get_vocab()
    # T5's relative position buckets cannot take synthesised positions: refused before anything is written
    with pytest.raises(SystemExit):
        logo(["--model", str(stock_dirs("t5")), "--data", str(tmp_path / "data-t5"), "--out", str(tmp_path / "no"),
              *[f"--set={s}" for s in train_settings]])
    assert "position.synthesize=false" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not partial_dir(tmp_path / "no").exists()


def test_recipe_train_and_align_kinds_run_on_a_stock_t5(stock_dirs, stock_corpus, tmp_path):
    from recipes.openba_v2 import main as recipe

    train = {"objective": "ul2", "add_sentinels": True, "input_length": 48, "target_length": 24, "packed": False,
             "validation_batches": 1, "data": {"paths": [str(stock_corpus)]},
             "train": {"steps": 2, "micro_batch_size": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 0}}
    align = {"data": {"samples": 4, "chunk_size": 64, "document_chunks": 10, "context_chunks": 6, "full_chunks": 3,
                      "half_chunks": 2, "wrong_chunks": 2},
             "logo": {"position": {"synthesize": False, "chunk_size": 64, "max_chunks": 8},
                      "train": {"steps": 2, "grad_accum_steps": 1, "warmup_steps": 1}}}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"name": "stock_t5", "model": str(stock_dirs("t5")),
                                      "run_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
                                      "stages": [{"name": "ul2", "kind": "train", "args": train},
                                                 {"name": "logo", "kind": "align", "args": align}]}))
    recipe(["--config", str(config)])
    run = tmp_path / "run"
    assert len(Manifest.read(run / "ul2").metrics["added_tokens"]["tokens"]) == 3
    assert Manifest.read(run / "logo").metrics["step"] == 2
    assert len(load_tokenizer(run / "logo")) == len(load_tokenizer(stock_dirs("t5"))) + 3
