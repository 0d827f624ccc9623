"""Where this process stands in a job started by a standard launcher (torchrun, deepspeed, accelerate launch): they
all set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in the environment. One place reads them, so every stage
agrees on who is the first process and how the data is shared; without a launcher, one process of one. One place also
joins the process group, so the stage runner's barriers and the trainer's collectives share one group."""

from __future__ import annotations

import dataclasses
import os
import socket


@dataclasses.dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch() -> Launch:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Launch(rank=int(os.environ.get("RANK", "0")), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group() -> None:
    """Join this job's process group unless it is joined already: nccl on CUDA (after taking the GPU that
    LOCAL_RANK names), gloo on CPU. A process without a launcher gets a group of one on a free local port, which
    DeepSpeed needs even alone; the launcher variables that makes are left in the environment, as a launcher's are."""
    import torch

    if torch.distributed.is_initialized():
        return
    process = launch()
    if not process.distributed:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(process.local_rank)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", rank=process.rank,
                                         world_size=process.world_size)
