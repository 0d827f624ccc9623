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
from pretrain.objectives import check_weights
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


# ------------------------------------------------------------------------------------------------ D-UL2


def ul2_initial_weights() -> list[float]:
    from pretrain.objectives import DUL2_INITIAL_PROPORTIONS

    return check_weights(DUL2_INITIAL_PROPORTIONS, len(DUL2_INITIAL_PROPORTIONS))


def dul2_trainer(kill_at: int | None = None, kill=None, proportions=None):
    """UL2's seven denoisers on a tiny OpenBA, re-weighted by D-UL2 at steps 3 and 6 from fixed validation batches;
    at step `kill_at` the evaluation calls `kill()` instead. Returns the trainer and its mixture.

    A checkpoint every step: a run killed at step 7 resumes from step 6, whose weights (this setup's D-UL2 update)
    do not sum to exactly 1 in floating point, and no later update replaces them. `proportions` other than D-UL2's
    starting ones stand for a fresh process: only the checkpoint can give the resumed run its weights back."""
    from pretrain.objectives import DynamicUL2, DynamicUL2Config, SpecialIds, batches_per_objective, ul2_mixture
    from pretrain.objectives.batches import ObjectiveBatches

    ids = SpecialIds(tuple(range(40, VOCAB)), {"R": 37, "S": 38, "X": 39}, eos=1, pad=0)
    mixture = ul2_mixture(ids, proportions or DynamicUL2Config().initial_proportions)
    documents = [list(np.random.default_rng(n).integers(3, 37, 40 + 7 * n)) for n in range(6)]
    options = dict(batch_size=2, input_length=32, target_length=24, max_spans=8)
    dul2 = DynamicUL2(mixture, batches_per_objective(documents, mixture, 1, seed=1, **options))

    def eval_fn(model, step):
        if step == kill_at:
            kill()
        return dul2(model, step) if step % 3 == 0 else {}

    data = ObjectiveBatches(documents, mixture, seed=0, **options)
    config = resume_config(save_every=1, eval_every=1)
    return Trainer(dropout_model(), config, data, eval_fn=eval_fn), mixture


def saved_mixture_weights(checkpoint: Path) -> list[float]:
    return torch.load(checkpoint / "data-rank0.pt", weights_only=True)["data"]["mixture"]["weights"]


def test_dynamic_ul2_mixture_weights_are_exactly_equal_after_a_crashed_run_resumes(tmp_path):
    """The weights a checkpoint saves come back bit for bit: dividing them by their float sum again on load would
    move them by ~1e-16, and the resumed run would sample objectives with other weights than the run that saved them."""
    trainer, straight = dul2_trainer()
    trainer.train(tmp_path / "straight")

    def node_lost():
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        dul2_trainer(kill_at=7, kill=node_lost)[0].train(tmp_path / "killed")
    checkpoint = checkpoint_dirs(tmp_path / "killed")[-1]
    assert checkpoint.name == "step-00000006"
    # the case that matters: weights that renormalising would move
    assert check_weights(saved_mixture_weights(checkpoint), 7) != saved_mixture_weights(checkpoint)
    trainer, resumed = dul2_trainer(proportions=[1.0] * 7)
    trainer.train(tmp_path / "killed")

    assert resumed.weights == straight.weights  # exact, not approximately
    assert resumed.weights != ul2_initial_weights()  # D-UL2 did move them
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_a_mixture_loads_its_saved_weights_unchanged():
    from pretrain.objectives import CausalLM, ObjectiveMixture, PrefixLM

    weights = [0.7, 0.2, 0.1]  # sums to 1 - 1e-16 in floating point: dividing by the sum would change them
    mixture = ObjectiveMixture([CausalLM(), PrefixLM(), PrefixLM(name="prefix-2")])
    mixture.load_state_dict({"weights": weights})
    assert mixture.weights == weights
    with pytest.raises(UserError, match="sum to 1"):
        mixture.load_state_dict({"weights": [0.5, 0.5, 0.5]})
    with pytest.raises(UserError, match="3 objectives"):
        mixture.load_state_dict({"weights": [0.5, 0.5]})


# ------------------------------------------------------------------------------------------------ a real kill


def run_worker(work_dir: Path, setup: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, str(work_dir), setup, str(kill_at)]
    return subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("setup, kill_at, resumes_at", [("random", 6, 4), ("dul2", 7, 6)])
def test_killed_process_resumes_with_identical_losses(tmp_path, setup, kill_at, resumes_at):
    assert run_worker(tmp_path / "straight", setup).returncode == 0
    killed = run_worker(tmp_path / "killed", setup, kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_dirs(tmp_path / "killed")[-1].name == f"step-{resumes_at:08d}"
    assert run_worker(tmp_path / "killed", setup).returncode == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "killed")) == 8
    if setup == "dul2":
        weights = [json.loads((tmp_path / run / "mixture_weights.json").read_text()) for run in ("straight", "killed")]
        assert weights[0] == weights[1]  # exact: JSON writes the shortest repr that reads back to the same float


def _worker(work_dir: str, setup: str, kill_at: int) -> None:
    """Train one resume setup; SIGKILL itself (no cleanup at all) at step `kill_at` (0: never)."""
    torch.set_num_threads(1)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    mixture = None
    if setup == "dul2":
        trainer, mixture = dul2_trainer(kill_at=kill_at, kill=kill)
    else:
        def eval_fn(model, step):
            if step == kill_at:
                kill()
            return {}

        trainer = Trainer(dropout_model(), resume_config(save_every=2, eval_every=1), RandomBatches(), eval_fn=eval_fn)
    trainer.train(work_dir)
    if mixture is not None:
        (Path(work_dir) / "mixture_weights.json").write_text(json.dumps(mixture.weights))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
