"""Where a training process sits (rank, world size, device) and the few collectives the loop needs.

The launcher (torchrun, deepspeed, accelerate launch) describes the job in the environment; `core.launch` reads it
and joins the one process group of the job, shared with the stage runner's barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from core.launch import init_process_group, launch


@dataclass
class Runtime:
    """Where this process sits: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())


def cpu_threads_per_process(cores: int, local_processes: int, threads_set: bool) -> int | None:
    """Several training processes on one CPU each default to every core, and their OpenMP threads then spin against
    each other (measured on 2 cores, 2 processes: ~35x slower than one thread each). Their share of the cores, unless
    the user set OMP_NUM_THREADS; None leaves torch's default (one process, or threads set by the user)."""
    if threads_set or local_processes <= 1:
        return None
    return max(1, cores // local_processes)


def setup_runtime(need_process_group: bool) -> Runtime:
    """This process's place in the job, its device chosen and the process group joined when there are several
    processes, or when `need_process_group` (DeepSpeed wants a group even for one process)."""
    process = launch()
    if torch.cuda.is_available():
        device = torch.device("cuda", process.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        threads = cpu_threads_per_process(os.cpu_count() or 1, process.local_world_size,
                                          "OMP_NUM_THREADS" in os.environ)
        if threads is not None:
            torch.set_num_threads(threads)
    if process.distributed or need_process_group:
        init_process_group()
    rank, world_size = process.rank, process.world_size
    if torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Runtime(rank, world_size, process.local_rank, device)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def all_sum(runtime: Runtime, value: float) -> float:
    """`value` summed over all processes (in float64, so token counts stay exact)."""
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def all_gather(runtime: Runtime, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    if not runtime.distributed:
        return [obj]
    gathered = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
