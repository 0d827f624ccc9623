"""Isolation between tests.

- A single-process DeepSpeed run joins a one-member process group and sets the launcher variables (MASTER_PORT,
  RANK, ...); left behind, they would send later subprocesses (the lm_eval CLI, recipe runs) to a port this process
  still holds.
- The default suite states CPU behaviour (float32 references, hand-made batches on the CPU), so on a GPU machine its
  tests do not see CUDA in this process; tests marked `gpu` do, and check the CUDA paths themselves.
"""

import os

import pytest
import torch

from tests.child_env import LAUNCHER_VARIABLES


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    before = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def cuda_only_for_gpu_tests(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
