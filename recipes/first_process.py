"""Work that is one process's to do inside a job started by a launcher (torchrun, deepspeed, accelerate).

Under a launcher every process runs the recipe. Training shares the work; a prune, a gate on the checkpoint the
first process wrote, or building LOGO's preference rows is done once, by the first process, and every process
leaves with its result.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Callable

from core.errors import UserError
from core.launch import init_process_group, launch

WAIT_HOURS = 24
"""How long the other processes wait for the first: a prune or a gate of a 15B model outlasts the default group's
timeout (10 minutes under NCCL, 30 under gloo), after which a collective aborts the job."""


def on_first_process(work: Callable[[], Any]) -> Any:
    """`work()` on the first process alone, its result on every process; a failure there fails every process (so
    none publishes the stage). Every process must call this at the same point. Without a launcher: `work()`."""
    process = launch()
    if not process.distributed:
        return work()
    import torch.distributed

    group = _waiting_group()
    outcome: list[Any] = [None]
    raised: BaseException | None = None
    if process.rank == 0:
        try:
            outcome = [("done", work())]
        except BaseException as error:  # re-raised below, once the others have heard of it
            raised, outcome = error, [("failed", f"{type(error).__name__}: {error}")]
    torch.distributed.broadcast_object_list(outcome, src=0, group=group)
    if raised is not None:
        raise raised
    status, value = outcome[0]
    if status == "failed":
        raise UserError(f"the first process failed this stage ({value})")
    return value


@functools.lru_cache(maxsize=None)
def _waiting_group():
    """A gloo group with a long timeout, made once by every process at its first `on_first_process` call."""
    import torch.distributed

    init_process_group()
    return torch.distributed.new_group(backend="gloo", timeout=dt.timedelta(hours=WAIT_HOURS))
