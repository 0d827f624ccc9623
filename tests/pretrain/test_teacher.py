"""The tiny teacher, at test size: trains below the unigram baseline on easy text, caches, resumes, has a CLI."""

import json
import random

import datasets
import pytest
import torch

from core.config import load_config, to_dict
from core.errors import UserError
from core.stage import Manifest
from pretrain import teacher as teacher_module
from pretrain.teacher import (
    TeacherConfig,
    ensure_teacher,
    main,
    teacher_dir,
    unigram_cross_entropy,
    unigram_entropy,
)

SYLLABLES = "ka lo mi re su ta vo ne pi da fu go he ji zu".split()
# enough distinct names for a 600-piece tokenizer to find its pieces
WORDS = sorted({a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:6]})[:400]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy_corpus(tmp_path_factory):
    """Code-like lines from a tiny grammar: strongly predictable from context, so a model must beat unigram."""
    rng = random.Random(0)

    def document() -> str:
        lines = []
        for _ in range(rng.randint(20, 40)):
            a, b = rng.sample(WORDS, 2)
            lines.append(rng.choice([f"def {a}_{b}(self):\n    return self.{a} + {b}\n",
                                     f"for {a} in {b}:\n    print({a})\n",
                                     f"{a} = {b}.{a}({rng.randint(0, 99)})\n"]))
        return "".join(lines)

    path = tmp_path_factory.mktemp("easy") / "corpus"
    splits = {name: datasets.Dataset.from_dict({"text": [document() for _ in range(count)]})
              for name, count in (("train", 60), ("validation", 6))}
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def quick_teacher(corpus_dir, **train) -> TeacherConfig:
    shape = {"hidden_size": 64, "kv_channels": 16, "num_heads": 4, "ffn_hidden_size": 128, "num_layers": 1,
             "num_decoder_layers": 1}
    settings = {"steps": 60, "lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 5, "micro_batch_size": 8,
                "eval_every": 30, "save_every": 10, "log_every": 10, **train}
    return load_config(TeacherConfig, None, [
        f"corpus_dir={corpus_dir}", f"model={json.dumps(shape)}", "tokenizer.vocab_size=600",
        "input_length=64", "target_length=32", "validation_batches=2",
    ] + [f"train.{k}={v}" for k, v in settings.items()])


def test_unigram_baselines_are_entropy_and_smoothed_cross_entropy():
    batches = [{"labels": torch.tensor([[5, 5, 6, -100], [7, 7, 7, 7]])}]
    p = torch.tensor([2 / 7, 1 / 7, 4 / 7])
    assert unigram_entropy(batches) == pytest.approx(float(-(p * p.log()).sum()))
    train = [{"labels": torch.tensor([[1, 1, 1, 2]])}]  # counts + 1/2 over a vocabulary of 4: [.5, 3.5, 1.5, .5] / 6
    expected = -(torch.tensor([3.5, 1.5, 0.5]) / 6).log().mean()
    assert unigram_cross_entropy(train, [{"labels": torch.tensor([[1, 2, 3, -100]])}], 4) == pytest.approx(
        float(expected))


def test_teacher_trains_below_the_unigram_baseline_and_is_reused_from_the_cache(easy_corpus, tmp_path):
    config = quick_teacher(easy_corpus)
    path = ensure_teacher(config, tmp_path)
    assert path == teacher_dir(config, tmp_path)
    metrics = Manifest.read(path).metrics
    assert metrics["val_loss"] < metrics["unigram_entropy"] - 0.5, metrics
    # a unigram fit on other (training) text cannot beat the validation text's own frequencies
    assert metrics["unigram_cross_entropy"] > metrics["unigram_entropy"]
    assert metrics["train_loss"] < metrics["unigram_entropy"]
    assert metrics["non_padding_share"] > 0.9  # packed rows
    assert "S" in metrics["per_objective"]  # the mixture's bulk shows up in the per-denoiser losses

    from core.checkpoint import load_model, load_tokenizer

    model, tokenizer = load_model(path), load_tokenizer(path)
    assert model.config.model_type == "openba" and model.config.vocab_size == len(tokenizer) == 600
    assert not (path / "checkpoints").exists()  # optimizer states are not shipped

    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_teacher(config, tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained


def test_a_killed_teacher_resumes_from_its_checkpoint(easy_corpus, tmp_path, monkeypatch):
    config = quick_teacher(easy_corpus, steps=20, eval_every=0, save_every=5)
    original = teacher_module.Trainer.train

    def killed_at_10(self, work_dir, stop_at=None):
        original(self, work_dir, stop_at=10)
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_module.Trainer, "train", killed_at_10)
    with pytest.raises(KeyboardInterrupt):
        ensure_teacher(config, tmp_path)
    monkeypatch.setattr(teacher_module.Trainer, "train", original)
    path = ensure_teacher(config, tmp_path)
    assert json.loads((path / "train_info.json").read_text())["resumed_from_step"] == 10
    steps = [r["step"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [10, 20]
    assert Manifest.read(path).timings["resumed"] is True


def test_cli_copies_the_teacher_to_out_and_prints_both_losses(easy_corpus, tmp_path, capsys):
    config_file = tmp_path / "teacher.yaml"
    config_file.write_text(json.dumps(to_dict(quick_teacher(easy_corpus, steps=40))))
    main(["--config", str(config_file), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
          "--threads", "1"])
    printed = capsys.readouterr().out
    assert "validation loss (nats/token)" in printed and "unigram entropy of val targets" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "manifest.json").is_file()


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=100", "comes from the tokenizer"),
    ("model.hidden_sise=64", "not OpenBA preset fields"),
    ("preset=openba-huge", "unknown OpenBA preset"),
    ("objective_weights=[1, 1]", "needs 7 weights"),
])
def test_bad_teacher_config_is_a_user_error_before_any_work(override, message, tmp_path):
    config = load_config(TeacherConfig, None, [override])
    with pytest.raises(UserError, match=message):
        ensure_teacher(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_help_has_an_example_and_bad_input_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "python -m pretrain.teacher --out" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["--set", "train.stepz=3", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert done.value.code == 2 and "did you mean 'train.steps'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing corpus", "bad preset", "threads", "users folder", "out in the cache"])
def test_bad_input_is_one_error_and_nothing_is_written(case, easy_corpus, tmp_path, capsys):
    from tests.core.test_out_policy import refused

    config_file = tmp_path / "teacher.yaml"
    config_file.write_text(json.dumps(to_dict(quick_teacher(easy_corpus, steps=6))))
    out, extra = tmp_path / "out", []
    if case == "missing corpus":
        extra, expected = ["--corpus-dir", str(tmp_path / "nowhere")], "is not a saved DatasetDict"
    elif case == "bad preset":
        extra, expected = ["--preset", "openba-huge"], "unknown OpenBA preset"
    elif case == "threads":
        extra, expected = ["--threads", "0"], "--threads must be at least 1"
    elif case == "users folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "already holds files this stage did not write (notes.txt)"
    else:
        out, expected = tmp_path / "cache" / "mine", "lies inside it"

    def teacher(_model, output):
        main(["--config", str(config_file), "--cache-dir", str(tmp_path / "cache"), "--out", str(output), *extra])

    assert expected in refused(teacher, None, out, tmp_path, capsys)
    assert not (tmp_path / "cache").exists()


def test_a_teacher_above_the_unigram_baseline_fails_its_verdict():
    from pretrain.teacher import verdict

    def manifest(val_loss):
        return Manifest("teacher", "hash", {}, metrics={"val_loss": val_loss, "unigram_entropy": 5.0})

    assert verdict(manifest(4.0)) is None
    assert "not below the unigram baseline 5.000" in verdict(manifest(5.0))
