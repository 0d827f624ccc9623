"""`python -m align.logo` under `torchrun` with two processes on CPU (gloo), for real: each rank reads its own half
of every step's rows, the first rank alone publishes the stage directory, and the weights equal those of one
process reading the whole batch (SimPO's loss is a mean over rows, so the two runs take the same steps)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import load_model
from core.stage import Manifest
from tests.align.conftest import POSITION_SETTINGS
from tests.pretrain.test_distributed import free_port, run_launched

SETTINGS = [*POSITION_SETTINGS, "train.warmup_steps=0", "train.grad_accum_steps=1", "train.log_every=1",
            "train.steps=3", "train.lr=1e-3", "train.save_every=2"]


def logo(workspace, out: Path, processes: int, batch_size: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                 str(processes), "--master_port", str(free_port())] if processes > 1 else [sys.executable])
    command = launcher + ["-m", "align.logo", "--model", str(workspace / "llama"), "--data", str(workspace / "data"),
                          "--out", str(out), "--loss", "simpo",
                          *[f"--set={s}" for s in SETTINGS + [f"batches.batch_size={batch_size}", *extra]]]
    return run_launched(command)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [[], ["train.deepspeed=3"]], ids=["torch", "zero3"])
def test_two_torchrun_processes_train_like_one_with_the_whole_batch(workspace, tmp_path, engine):
    logo(workspace, tmp_path / "one", 1, 4)
    done = logo(workspace, tmp_path / "two", 2, 2, *engine)  # ZeRO-3: the weights are gathered to be saved
    assert done.stdout.count("wrote ") == 2  # both ranks finish; only the first wrote
    assert not (tmp_path / "two.partial").exists()
    one, two = Manifest.read(tmp_path / "one"), Manifest.read(tmp_path / "two")
    assert two.metrics["step"] == one.metrics["step"] == 3
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4)
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "two")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=name)
    untrained = load_model(workspace / "llama").state_dict()
    assert any(not torch.allclose(untrained[n], p) for n, p in b.state_dict().items())
