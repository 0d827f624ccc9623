"""Checkpoints resume exactly: a stopped, crashed or killed run continues the loss curve of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from pretrain.trainer import Trainer, TrainConfig, checkpoint_dirs, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.child_env import child_env  # noqa: E402
from tests.pretrain.test_trainer import VOCAB, seq2seq_batches, tiny_openba  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resume_config(**overrides) -> TrainConfig:
    # dropout on, accumulation, and 5 batches for 16 micro-batches: RNG, data position and epochs all matter
    settings = dict(steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, grad_accum_steps=2, save_every=100,
                    log_every=1, micro_batch_size=4)
    return TrainConfig(**{**settings, **overrides})


def dropout_model(seed: int = 0):
    return tiny_openba(seed, hidden_dropout=0.2, attention_dropout=0.1)


def losses(work_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(work_dir) if "loss" in r]


class RandomBatches:
    """Stateful data: batches drawn from its own numpy Generator, so only a restored state gives the same batches."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.drawn = 0

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.drawn = state["drawn"]

    def __iter__(self):
        while True:
            self.drawn += 1
            labels = torch.as_tensor(self.rng.integers(3, VOCAB, (2, 5)))
            labels[:, int(self.rng.integers(1, 5)):] = -100
            yield {"input_ids": torch.as_tensor(self.rng.integers(3, VOCAB, (2, 9))), "labels": labels}


def test_stopped_run_resumes_with_identical_losses_and_weights(tmp_path):
    straight = dropout_model()
    Trainer(straight, resume_config(), seq2seq_batches(5)).train(tmp_path / "straight")

    Trainer(dropout_model(), resume_config(), seq2seq_batches(5)).train(tmp_path / "stopped", stop_at=3)
    assert [p.name for p in checkpoint_dirs(tmp_path / "stopped")] == ["step-00000003"]
    resumed = dropout_model(seed=1)  # other initial weights: everything must come from the checkpoint
    result = Trainer(resumed, resume_config(), seq2seq_batches(5)).train(tmp_path / "stopped")

    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 8 and result["step"] == 8
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_crash_resumes_from_the_last_checkpoint_without_duplicate_metrics(tmp_path):
    Trainer(dropout_model(), resume_config(), seq2seq_batches(5)).train(tmp_path / "straight")

    def crash_at_5(model, step):
        if step == 5:
            raise RuntimeError("node lost")
        return {}

    config = resume_config(save_every=2, eval_every=1)
    with pytest.raises(RuntimeError, match="node lost"):
        Trainer(dropout_model(), config, seq2seq_batches(5), eval_fn=crash_at_5).train(tmp_path / "crashed")
    assert checkpoint_dirs(tmp_path / "crashed")[-1].name == "step-00000004"
    Trainer(dropout_model(seed=2), config, seq2seq_batches(5)).train(tmp_path / "crashed")

    assert [r["step"] for r in read_metrics(tmp_path / "crashed") if "loss" in r] == list(range(1, 9))
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    # keep_checkpoints=2: only the two latest survive
    assert [p.name for p in checkpoint_dirs(tmp_path / "crashed")] == ["step-00000006", "step-00000008"]


def test_stateful_data_resumes_at_its_saved_position(tmp_path):
    Trainer(dropout_model(), resume_config(), RandomBatches()).train(tmp_path / "straight")
    Trainer(dropout_model(), resume_config(), RandomBatches()).train(tmp_path / "stopped", stop_at=5)
    data = RandomBatches(seed=99)  # a wrong seed: only load_state_dict can put it back on track
    Trainer(dropout_model(), resume_config(), data).train(tmp_path / "stopped")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert data.drawn == 16


def test_finished_run_returns_its_final_metrics_without_training_again(tmp_path):
    def eval_fn(model, step):
        return {"val": float(step)}

    config = resume_config(steps=3, warmup_steps=0)
    first = Trainer(tiny_openba(), config, seq2seq_batches(2), eval_fn=eval_fn).train(tmp_path)
    again = Trainer(tiny_openba(), config, seq2seq_batches(2), eval_fn=eval_fn).train(tmp_path)
    assert again["step"] == 3 and again["loss"] == first["loss"] and again["eval/val"] == first["eval/val"] == 3.0
    assert len(losses(tmp_path)) == 3


def test_unfinished_checkpoint_directory_is_ignored(tmp_path):
    Trainer(tiny_openba(), resume_config(steps=2, warmup_steps=0), seq2seq_batches(2)).train(tmp_path, stop_at=1)
    (tmp_path / "checkpoints" / "step-00000002.tmp").mkdir()  # a save killed half-way
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001"]


def test_resuming_with_another_engine_is_a_user_error(tmp_path):
    Trainer(tiny_openba(), resume_config(steps=2, warmup_steps=0), seq2seq_batches(2)).train(tmp_path, stop_at=1)
    with pytest.raises(UserError, match="written by the torch engine"):
        Trainer(tiny_openba(), resume_config(steps=2, warmup_steps=0, deepspeed=2), seq2seq_batches(2)).train(tmp_path)
    state = json.loads((checkpoint_dirs(tmp_path)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["world_size"] == 1


def test_a_data_state_that_needs_unpickling_is_refused_on_resume(tmp_path):
    class NumpyState(RandomBatches):
        def state_dict(self):
            return {"array": np.arange(3)}

    Trainer(tiny_openba(), resume_config(steps=2, warmup_steps=0), NumpyState()).train(tmp_path, stop_at=1)
    with pytest.raises(UserError, match="cannot read .*data-rank0.pt safely"):
        Trainer(tiny_openba(), resume_config(steps=2, warmup_steps=0), NumpyState()).train(tmp_path)


# ------------------------------------------------------------------------------------------------ a real kill


def run_worker(work_dir: Path, kill_at: int | None) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, str(work_dir)] + ([str(kill_at)] if kill_at else [])
    return subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_process_resumes_with_identical_losses(tmp_path):
    assert run_worker(tmp_path / "straight", None).returncode == 0
    killed = run_worker(tmp_path / "killed", kill_at=6)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_dirs(tmp_path / "killed")[-1].name == "step-00000004"
    assert run_worker(tmp_path / "killed", None).returncode == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "killed")) == 8


def _worker(work_dir: str, kill_at: int | None) -> None:
    """Train the resume setup; SIGKILL itself (no cleanup at all) at step `kill_at`."""
    torch.set_num_threads(1)

    def eval_fn(model, step):
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    config = resume_config(save_every=2, eval_every=1)
    Trainer(dropout_model(), config, RandomBatches(), eval_fn=eval_fn).train(work_dir)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
