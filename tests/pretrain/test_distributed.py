"""The distributed path for real, on CPU: DeepSpeed ZeRO in one process, ZeRO-3 across two processes (gloo)
started by `torchrun`, the `deepspeed` launcher and `accelerate launch`.

Each run trains the same tiny OpenBA on the same rows: one process sees 4 rows per micro-batch, two processes see 2
each. Label lengths differ per row, so only a loss averaged over the tokens of all ranks (not a mean of per-rank
means) matches the single process. The workers are this file run as a script (under torchrun for two processes).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.child_env import child_env  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {
    "torchrun": lambda n, port: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                                 str(n), "--master_port", str(port)],
    "deepspeed": lambda n, port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
                                  "--master_port", str(port)],
    # --multi_gpu is accelerate's name for "several processes through torch.distributed.run"; on a CPU-only
    # machine they run on the CPU (its --cpu mode would want MPI for more than one process)
    "accelerate": lambda n, port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                   "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
                                   "--dynamo_backend", "no", "--main_process_port", str(port)],
}


def launch(work_dir: Path, engine: str, processes: int = 1, stop_at: int = 0,
           launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run the worker in a fresh interpreter (under `launcher` for several processes), as a user would."""
    script = [str(Path(__file__).resolve()), str(work_dir), engine, str(stop_at)]
    if processes > 1:
        command = LAUNCHERS[launcher](processes, free_port()) + script
    else:
        command = [sys.executable] + script
    return run_launched(command)


def run_launched(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a (launcher) command from the repository root in this environment minus any launcher variables."""
    done = subprocess.run(command, cwd=ROOT, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(work_dir: Path) -> list[float]:
    from pretrain.trainer import read_metrics

    return [r["loss"] for r in read_metrics(work_dir) if "loss" in r]


def probe_logits(model_dir: Path) -> torch.Tensor:
    from core.checkpoint import load_model
    from tests.pretrain.test_trainer import seq2seq_batches

    model = load_model(model_dir).eval()
    with torch.no_grad():
        return model(**seq2seq_batches(1, seed=11)[0]).logits


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The reference: plain torch, one process, all rows."""
    work_dir = tmp_path_factory.mktemp("dist") / "torch-1"
    launch(work_dir, "torch")
    return work_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_in_one_process_follows_the_plain_torch_loss_curve(single_process, tmp_path, stage):
    launch(tmp_path / stage, stage)
    assert losses(tmp_path / stage) == pytest.approx(losses(single_process), rel=1e-5)
    torch.testing.assert_close(probe_logits(tmp_path / stage / "model"), probe_logits(single_process / "model"),
                               rtol=1e-4, atol=1e-5)
    info = json.loads((tmp_path / stage / "train_info.json").read_text())
    assert (info["engine"], info["zero_stage"], info["world_size"]) == ("deepspeed", int(stage[-1]), 1)


@pytest.mark.slow
def test_zero3_with_optimizer_offload_and_bf16_stays_close_to_fp32(single_process, tmp_path):
    launch(tmp_path / "offload", "zero3-offload-bf16")
    assert losses(tmp_path / "offload") == pytest.approx(losses(single_process), rel=2e-2)
    info = json.loads((tmp_path / "offload" / "train_info.json").read_text())
    assert info["bf16"] is True and info["zero_stage"] == 3


@pytest.mark.slow
def test_zero3_on_two_torchrun_processes_matches_one_process(single_process, tmp_path):
    launch(tmp_path / "zero3-2", "zero3", processes=2)
    assert len(losses(tmp_path / "zero3-2")) == 6
    assert losses(tmp_path / "zero3-2") == pytest.approx(losses(single_process), rel=1e-4)
    # the gathered ZeRO-3 shards saved by rank 0 are the same model as the single process trained
    torch.testing.assert_close(probe_logits(tmp_path / "zero3-2" / "model"), probe_logits(single_process / "model"),
                               rtol=1e-3, atol=1e-4)
    info = json.loads((tmp_path / "zero3-2" / "train_info.json").read_text())
    assert (info["zero_stage"], info["world_size"]) == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_the_deepspeed_and_accelerate_launchers_run_the_same_two_process_training(single_process, tmp_path, launcher):
    launch(tmp_path / launcher, "zero3", processes=2, launcher=launcher)
    assert losses(tmp_path / launcher) == pytest.approx(losses(single_process), rel=1e-4)
    assert json.loads((tmp_path / launcher / "train_info.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_zero3_on_two_processes_resumes_exactly(single_process, tmp_path):
    launch(tmp_path / "straight", "zero3", processes=2)
    launch(tmp_path / "resumed", "zero3", processes=2, stop_at=3)
    assert len(losses(tmp_path / "resumed")) == 3
    launch(tmp_path / "resumed", "zero3", processes=2)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_plain_torch_on_two_processes_all_reduces_to_the_same_losses(single_process, tmp_path):
    launch(tmp_path / "torch-2", "torch", processes=2)
    assert losses(tmp_path / "torch-2") == pytest.approx(losses(single_process), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the worker


def _worker(work_dir: str, engine: str, stop_at: int) -> None:
    from pretrain.trainer import Trainer, TrainConfig
    from tests.pretrain.test_trainer import seq2seq_batches, tiny_openba

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    rows = 4 // world
    batches = [{k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
               for batch in seq2seq_batches(6, rows=4, seed=4)]
    stage = {"torch": None, "zero2": 2, "zero3": 3, "zero3-offload-bf16": 3}[engine]
    offload = engine.endswith("offload-bf16")
    config = TrainConfig(steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=1, grad_accum_steps=2, save_every=2,
                         log_every=1, micro_batch_size=rows, deepspeed=stage, offload_optimizer=offload, bf16=offload)
    trainer = Trainer(tiny_openba(), config, batches)
    result = trainer.train(work_dir, stop_at=stop_at or None)
    if result["step"] == config.steps:
        trainer.save_model(Path(work_dir) / "model")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    _worker(arguments[0], arguments[1], int(arguments[2]))
