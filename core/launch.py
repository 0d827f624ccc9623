"""Where this process stands in a job started by a standard launcher (torchrun, deepspeed, accelerate launch): they
all set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in the environment. One place reads them, so every stage
agrees on who is the first process and how the data is shared; without a launcher, one process of one."""

from __future__ import annotations

import dataclasses
import os


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
