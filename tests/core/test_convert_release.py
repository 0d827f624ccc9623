"""The public OpenBA release converts into a project checkpoint that computes the public model's logits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.openba.convert import main as convert_main
from core.openba.convert import plan_shards
from tests.core.openba_release import PIECES, TINY_RELEASE, public_forward, train_spiece, write_release


def corpus_texts() -> list[str]:
    """Code and prose from this repository, plus CJK and full-width text that nmt_nfkc normalises."""
    root = Path(__file__).resolve().parents[2]
    texts = [p.read_text() for p in sorted(root.glob("*/*.py"))[:60]]
    texts += ["北京是中国的首都。苏州处太湖平原，沿江为高沙平原，河流两侧为河淤平原。",
              "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ and ligatures ﬁ ﬂ", "Ünïcödé café naïve résumé"] * 20
    return texts


@pytest.fixture(scope="module")
def spiece_models():
    texts = corpus_texts()
    return {"mode": train_spiece(texts, mode_tokens=True), "plain": train_spiece(texts, mode_tokens=False)}


@pytest.fixture(scope="module")
def release(tmp_path_factory, spiece_models):
    directory = tmp_path_factory.mktemp("release") / "OpenBA-release"
    state = write_release(directory, spiece_models["mode"])
    return directory, state


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    src, _ = release
    out = tmp_path_factory.mktemp("converted") / "OpenBA"
    convert_main(["--src", str(src), "--out", str(out), "--no-progress", "--max-shard-size", "200KB"])
    return out


def public_encode(spiece: bytes, text: str, extra_ids: int = 100) -> list[int]:
    """The release's slow tokenizer (transformers 4.31 `PreTrainedTokenizer` + `OpenBATokenizer`): split on special
    tokens, strip the whitespace around them, SentencePiece per chunk, sentinel N at pieces + extra - 1 - N, then
    `</s>`."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spiece)
    pieces = sp.get_piece_size()
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    specials.update({f"<extra_id_{n}>": pieces + extra_ids - 1 - n for n in range(extra_ids)})
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    parts = re.split(pattern, text)
    ids = []
    for k, part in enumerate(parts):
        if part in specials:
            ids.append(specials[part])
            continue
        if k > 0:
            part = part.lstrip()
        if k < len(parts) - 1:
            part = part.rstrip()
        ids += [sp.piece_to_id(p) for p in sp.encode(part, out_type=str)]
    return ids + [specials["</s>"]]


def test_converted_config_states_the_swiglu_width_and_maps_every_field(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "openba"
    assert config["ffn_hidden_size"] == 256  # int(2/3 * 192) = 128, rounded up to 256
    for key in ("vocab_size", "hidden_size", "kv_channels", "num_layers", "num_decoder_layers", "num_heads",
                "max_seq_length", "decoder_max_seq_length"):
        assert config[key] == TINY_RELEASE[key], key
    assert config["add_qkv_bias"] and config["add_lm_head_bias"] and not config["add_ffn_bias"]
    assert config["rope_theta"] == 10000.0 and config["layernorm_epsilon"] == 1e-5
    assert config["dtype"] == "float16"
    assert "initializer_factor" not in config and config.get("tokenizer_class") != "OpenBATokenizer"
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["metrics"]["ffn_hidden_size"] == {"release (Megatron)": 192, "swiglu_width": 256}


def test_weights_are_safetensors_shards_with_an_index_and_keep_fp16(converted, release):
    _, state = release
    from safetensors import safe_open

    assert not list(converted.glob("*.bin"))
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((converted / f).is_file() for f in files)
    seen = {}
    for file in files:
        with safe_open(str(converted / file), framework="pt") as handle:
            for key in handle.keys():
                seen[key] = handle.get_tensor(key)
    assert set(seen) == set(state)
    for key, tensor in state.items():
        assert seen[key].dtype == torch.float16
        assert torch.equal(seen[key], tensor), key


def test_converted_model_gives_the_public_models_logits(converted, release):
    from core.checkpoint import load_model

    src, state = release
    config = json.loads((src / "config.json").read_text())
    model = load_model(converted, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, PIECES, (2, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    decoder_input_ids = torch.randint(3, PIECES, (2, 7), generator=g)
    decoder_input_ids[:, 0] = 0
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    reference = public_forward(state, config, input_ids, decoder_input_ids, attention_mask)
    assert ours.shape == (2, 7, TINY_RELEASE["vocab_size"])
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_tokenizer_encodes_as_the_public_tokenizer_does(converted, spiece_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    spiece = spiece_models["mode"]
    assert (converted / "spiece.model").read_bytes() == spiece
    assert len(tokenizer) == PIECES + 100
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == PIECES + 99
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == PIECES
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    texts = [
        "<S> 苏州处太湖平原，沿江为高沙平原，河 <extra_id_0>", "<S>hello world<extra_id_0>", "plain text", "",
        "  leading and   inner   spaces  ", "tabs\tand\nnewlines\n\nhere", "x <extra_id_3> y <extra_id_12>z",
        "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ ﬁ", "<R> spans </s> after eos", "emoji 😀 unknown", "<X>",
    ] + [text[i:i + 300] for text in corpus_texts()[:12] for i in (0, 500)]
    for text in texts:
        assert tokenizer(text)["input_ids"] == public_encode(spiece, text), text[:60]
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "auto_map" not in config  # no remote code needed


def test_mode_tokens_are_added_on_request_with_mean_rows(release, spiece_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    src = tmp_path / "release-plain"
    state = write_release(src, spiece_models["plain"], shards=1)
    out = tmp_path / "converted"
    convert_main(["--src", str(src), "--out", str(out), "--no-progress", "--add-mode-tokens", "--dtype", "float32"])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<R>", "<S>", "<X>")]
    assert ids == [PIECES + 100, PIECES + 101, PIECES + 102]
    assert tokenizer("<S> hi <extra_id_0>")["input_ids"][0] == PIECES + 101
    weights = load_file(str(out / "model.safetensors"))
    assert weights["shared_embedding.weight"].dtype == torch.float32
    assert weights["shared_embedding.weight"].shape[0] == TINY_RELEASE["vocab_size"]  # padding rows reused
    mean = state["shared_embedding.weight"][: PIECES + 100].float().mean(0)
    for token_id in ids:
        torch.testing.assert_close(weights["shared_embedding.weight"][token_id], mean)
    torch.testing.assert_close(weights["lm_head.bias"][ids[0]], state["lm_head.bias"][: PIECES + 100].float().mean())
    assert torch.equal(weights["shared_embedding.weight"][:PIECES + 100], state["shared_embedding.weight"][:PIECES + 100].float())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["tokenizer"]["added_mode_tokens"] == {"<R>": 900, "<S>": 901, "<X>": 902}
    assert manifest["metrics"]["tokenizer"]["added_rows"]["vocab_grew"] is False


def test_shards_are_planned_in_order_under_the_size_bound():
    sizes = {"a": 40, "b": 40, "c": 40, "d": 100, "e": 10}
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "d", "e"]]


def _run_convert(src: Path, out: Path, capsys, *extra: str) -> str:
    """Exit 2, one error line, no traceback, and every file under the release's folder as it was."""
    from tests.core.test_out_policy import refused

    err = refused(lambda s, o: convert_main(["--src", str(s), "--out", str(o), "--no-progress", *extra]), src, out,
                  src.parent, capsys)
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    return err


def _copy(src: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "release"
    shutil.copytree(src, copy)
    return copy


def test_a_missing_shard_is_one_error_and_nothing_is_written(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    err = _run_convert(src, tmp_path / "out", capsys)
    assert "lacks weight shard(s) pytorch_model-00002-of-00002.bin" in err


def test_a_shard_that_disagrees_with_the_index_is_one_error(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    moved = next(k for k, v in index["weight_map"].items() if v.startswith("pytorch_model-00001"))
    index["weight_map"][moved] = "pytorch_model-00002-of-00002.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    err = _run_convert(src, tmp_path / "out", capsys)
    assert f"puts {moved} in pytorch_model-00002-of-00002.bin, but it is found in pytorch_model-00001" in err


def test_a_tensor_shape_that_disagrees_with_the_config_is_one_error(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["num_heads"] = 4
    (src / "config.json").write_text(json.dumps(config))
    err = _run_convert(src, tmp_path / "out", capsys)
    assert "self_attn.qkv.weight has shape [240, 64] but the config implies [192, 64]" in err


def test_an_unknown_config_field_is_one_error(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["num_head"] = 5
    (src / "config.json").write_text(json.dumps(config))
    err = _run_convert(src, tmp_path / "out", capsys)
    assert "'num_head'" in err and "did you mean 'num_heads'" in err


def test_an_out_of_the_users_files_is_one_error_and_left_as_it_was(release, tmp_path, capsys):
    from tests.core.test_out_policy import refused

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    message = refused(lambda s, o: convert_main(["--src", str(s), "--out", str(o), "--no-progress"]), release[0], out,
                      tmp_path, capsys)
    assert "already holds files this stage did not write (notes.txt)" in message


def test_an_out_inside_the_release_is_one_error(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    assert "lies inside it" in _run_convert(src, src / "converted", capsys)


def test_an_unknown_dtype_is_one_error(release, tmp_path, capsys):
    assert "dtype must be one of bfloat16, float16, float32, got 'int8'" in _run_convert(
        _copy(release[0], tmp_path), tmp_path / "out", capsys, "--dtype", "int8")


def test_a_finished_conversion_is_kept_on_a_rerun(converted, release):
    from core.stage import Manifest

    first = Manifest.read(converted)
    assert first.stage == "convert-openba-release" and first.parameters["after"] > 0
    convert_main(["--src", str(release[0]), "--out", str(converted), "--no-progress", "--max-shard-size", "200KB"])
    assert Manifest.read(converted).timings == first.timings


def test_a_truncated_shard_is_one_error(release, tmp_path, capsys):
    src = _copy(release[0], tmp_path)
    shard = src / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:500])
    err = _run_convert(src, tmp_path / "out", capsys)
    assert "cannot read release shard" in err and "pytorch_model-00001-of-00002.bin" in err


def test_the_loader_refuses_a_raw_release_and_names_the_converter(release):
    from core.checkpoint import load_model

    with pytest.raises(UserError, match=r"public OpenBA release.*python -m core\.openba\.convert --src"):
        load_model(release[0])


@pytest.mark.parametrize("module, args", [
    ("compress.layer", ["--remove", "1"]),
    ("compress.neuron", ["--ffn-width", "128"]),
    ("compress.vocab", ["--keep", "500"]),
    ("compress.score", ["--calib", "TEXT"]),
    ("compress.budget", ["--target", "1e5"]),
    ("pretrain.continual", []),
    ("align.logo", ["--data", "DATA"]),
    ("eval.gate", ["--gate", "eval/gates/offline.yaml"]),
])
def test_every_command_pointed_at_a_raw_release_names_the_converter(module, args, release, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    (tmp_path / "calib.txt").write_text("some calibration text\n" * 20)
    paths = {"DATA": str(tmp_path / "data"), "TEXT": str(tmp_path / "calib.txt")}
    argv = ["--model", str(release[0])] + [paths.get(a, a) for a in args]
    if module != "compress.budget":
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in release[0].iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m core.openba.convert --src" in err[0], err
    assert sorted(p.name for p in release[0].iterdir()) == before
    assert not (tmp_path / "out").exists()


def test_stock_transformers_without_the_project_loads_the_converted_release(converted, release, tmp_path):
    """A converted release loads where this project is not installed, with the public model's logits."""
    from safetensors.torch import load_file

    from tests.core.test_portable_checkpoint import run_without_project

    src, state = release
    text = "<S> def add(a, b): return a + b <extra_id_0>"
    run_without_project("""
        import sys
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        directory, text, out = sys.argv[1:4]
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        batch = tokenizer([text], return_tensors="pt")
        decoder_input_ids = torch.tensor([[0, 5, 9, 17]])
        with torch.no_grad():
            logits = model(**batch, decoder_input_ids=decoder_input_ids).logits
        assert_nothing_of_the_project_ran()
        save_file({"input_ids": batch["input_ids"], "decoder_input_ids": decoder_input_ids, "logits": logits}, out)
    """, tmp_path, str(converted), text, str(tmp_path / "child.safetensors"))
    child = load_file(str(tmp_path / "child.safetensors"))
    spiece = (src / "spiece.model").read_bytes()
    assert child["input_ids"][0].tolist() == public_encode(spiece, text)
    config = json.loads((src / "config.json").read_text())
    reference = public_forward(state, config, child["input_ids"], child["decoder_input_ids"])
    torch.testing.assert_close(child["logits"], reference, atol=2e-4, rtol=1e-4)
