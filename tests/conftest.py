"""Isolation between tests: a single-process DeepSpeed run joins a one-member process group and sets the launcher
variables (MASTER_PORT, RANK, ...); left behind, they would send later subprocesses (the lm_eval CLI, recipe runs)
to a port this process still holds."""

import os

import pytest
import torch

LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


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
