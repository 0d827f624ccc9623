"""The continual-pretraining stage: recovery lowers the validation loss, the scratch baseline re-initialises, under
several processes each one trains on its own shard of the documents, and bad input (a missing teacher, missing data,
truncated weights) fails before anything is written."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from core.checkpoint import save_checkpoint
from core.config import from_dict
from pretrain.continual import ContinualConfig, continual_stage, process_shard
from pretrain.corpus import CorpusConfig, load_or_build_corpus
from pretrain.data import DataConfig
from pretrain.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from tests.factory import tiny_model


def _corpus(tmp_path: Path) -> Path:
    config = CorpusConfig(max_documents=40, validation_size=0.2)
    load_or_build_corpus(config, tmp_path / "corpora")
    return tmp_path / "corpora" / f"corpus-{config.fingerprint()}"


def _model(tmp_path: Path, corpus: Path) -> Path:
    tok_dir = train_tokenizer(datasets.load_from_disk(str(corpus)), TokenizerConfig(vocab_size=512, max_training_chars=200_000), tmp_path / "tok")
    tokenizer = load_tokenizer(tok_dir)
    model = tiny_model("openba", vocab_size=len(tokenizer), hidden_size=32, num_decoder_layers=2, ffn_hidden_size=64)
    return save_checkpoint(model, tokenizer, tmp_path / "model")


def _config(corpus: Path, **extra) -> ContinualConfig:
    return from_dict(ContinualConfig, {"data": {"paths": [str(corpus)]}, "input_length": 48, "target_length": 24,
                                       "validation_batches": 1, "objective": "mix",
                                       "train": {"steps": 12, "lr": 3e-3, "micro_batch_size": 4, "eval_every": 12,
                                                 "save_every": 6, "log_every": 1}, **extra})


def test_recovery_lowers_validation_loss_and_scratch_reinitialises(tmp_path):
    corpus = _corpus(tmp_path)
    model_dir = _model(tmp_path, corpus)
    short = _config(corpus, train={"steps": 1, "lr": 1e-9, "min_lr": 0.0, "micro_batch_size": 4, "eval_every": 1})
    (tmp_path / "w0").mkdir()
    before = continual_stage(model_dir, tmp_path / "w0", short)["val_loss"]
    (tmp_path / "w1").mkdir()
    after = continual_stage(model_dir, tmp_path / "w1", _config(corpus))
    assert after["val_loss"] < before - 0.1
    assert (tmp_path / "w1" / "model.safetensors").is_file() and not (tmp_path / "w1" / "checkpoints").exists()

    from safetensors.torch import load_file

    (tmp_path / "w2").mkdir()
    continual_stage(model_dir, tmp_path / "w2", _config(corpus, init="scratch", seed=1,
                                                        train={"steps": 1, "lr": 1e-9, "min_lr": 0.0, "micro_batch_size": 4}))
    original, scratch = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "w2" / "model.safetensors"))
    name = next(k for k in original if k.endswith("qkv.weight"))
    assert original[name].shape == scratch[name].shape and not torch.allclose(original[name], scratch[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recovery_on_cuda_evaluates_on_the_gpu_what_the_cpu_measures(tmp_path, monkeypatch):
    """The validation batches are built on the CPU; evaluation must bring them to the model's device."""
    corpus = _corpus(tmp_path)
    model_dir = _model(tmp_path, corpus)
    short = _config(corpus, train={"steps": 1, "lr": 1e-9, "min_lr": 0.0, "micro_batch_size": 4, "eval_every": 1})
    for name in ("gpu", "recovered", "cpu"):
        (tmp_path / name).mkdir()
    before = continual_stage(model_dir, tmp_path / "gpu", short)["val_loss"]
    assert json.loads((tmp_path / "gpu" / "train_info.json").read_text())["device"].startswith("cuda")
    assert continual_stage(model_dir, tmp_path / "recovered", _config(corpus))["val_loss"] < before - 0.1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert continual_stage(model_dir, tmp_path / "cpu", short)["val_loss"] == pytest.approx(before, rel=2e-2)


def test_each_process_trains_on_its_own_shard(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    config = DataConfig(paths=[str(corpus)])
    assert process_shard(config) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shards.append(list(process_shard(config)["text"]))
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(list(datasets.load_from_disk(str(corpus))["train"]["text"]))


@pytest.mark.slow
def test_the_command_under_torchrun_with_zero3_publishes_one_whole_checkpoint(tmp_path):
    """`torchrun --nproc_per_node 2 -m pretrain.continual` with ZeRO-3: both processes run the stage, the first alone
    writes the (gathered, whole) weights and publishes the directory."""
    import sys

    from safetensors.torch import load_file

    from tests.pretrain.test_distributed import free_port, run_launched

    corpus = _corpus(tmp_path)
    model_dir = _model(tmp_path, corpus)
    out = tmp_path / "recovered"
    settings = [f"data.paths=[{corpus}]", "input_length=48", "target_length=24", "validation_batches=1",
                "objective=mix", "train.steps=3", "train.lr=3e-3", "train.micro_batch_size=2", "train.eval_every=3",
                "train.save_every=2", "train.deepspeed=3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "pretrain.continual", "--model", str(model_dir),
               "--out", str(out), *[f"--set={s}" for s in settings]]
    run_launched(command, env={"OMP_NUM_THREADS": None})  # the trainer splits the cores itself
    assert not (tmp_path / "recovered.partial").exists() and not (out / "checkpoints").exists()
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, weight in after.items():
        assert weight.shape == before[name].shape and torch.isfinite(weight).all(), name
    assert any(not torch.equal(before[name], after[name]) for name in before)
    from core.stage import Manifest

    assert Manifest.read(out).metrics["steps"] == 3


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continual")
    _model(root, _corpus(root))
    return root


def _continual(model: Path, out: Path, *extra: str) -> None:
    from pretrain.continual import main

    corpus = next((model.parent / "corpora").iterdir())
    main(["--model", str(model), "--out", str(out), "--no-progress", f"--set=data.paths=[{corpus}]",
          "--set=input_length=48", "--set=target_length=24", "--set=validation_batches=1", "--set=objective=mix",
          "--set=train.steps=1", "--set=train.micro_batch_size=2", *extra])


def _copy_model(workspace: Path, root: Path) -> Path:
    import shutil

    return Path(shutil.copytree(workspace / "model", root / "model"))


@pytest.mark.parametrize("case", ["missing teacher", "missing data", "truncated weights", "more layers than weights",
                                  "distill without teacher", "missing data is found before the weights are read"])
def test_bad_input_is_one_error_before_anything_is_written(case, workspace, tmp_path, capsys):
    from tests.core.test_out_policy import refused

    model = _copy_model(workspace, tmp_path)
    (tmp_path / "corpora").symlink_to(workspace / "corpora")
    extra: list[str] = []
    if case == "missing teacher":
        extra, expected = ["--teacher", str(tmp_path / "no-teacher")], "does not exist"
    elif case == "missing data":
        extra, expected = ["--set=data.paths=[" + str(tmp_path / "no-corpus") + "]"], "data path not found"
    elif case == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = "corrupt safetensors file"
    elif case == "more layers than weights":
        config = json.loads((model / "config.json").read_text())
        config["num_decoder_layers"] += 1
        (model / "config.json").write_text(json.dumps(config))
        expected = "missing from the weights"
    elif case == "distill without teacher":
        extra, expected = ["--set=distill.kd_weight=0.5"], "no teacher checkpoint is given"
    else:
        (model / "model.safetensors").write_bytes(b"not read")
        extra, expected = ["--set=data.paths=[" + str(tmp_path / "no-corpus") + "]"], "data path not found"
    message = refused(lambda m, o: _continual(m, o, *extra), model, tmp_path / "out", tmp_path, capsys)
    assert expected in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_command_trains_publishes_and_skips_a_finished_rerun(workspace, tmp_path, capsys):
    from core.stage import Manifest

    out = tmp_path / "recovered"
    _continual(workspace / "model", out, "--teacher", str(workspace / "model"))
    first = Manifest.read(out)
    assert first.stage == "continual" and first.metrics["steps"] == 1
    assert first.config["distill"] is not None and first.metrics["distilled_from"] == str(workspace / "model")
    assert first.parameters["after"] == first.parameters["before"] and "parameters" not in first.metrics
    assert "validation loss" in capsys.readouterr().out
    _continual(workspace / "model", out, "--teacher", str(workspace / "model"))
    assert Manifest.read(out).timings == first.timings  # finished with this config and input: kept
