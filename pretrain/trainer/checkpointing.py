"""Training checkpoints that resume bit-exactly: `checkpoints/step-N/` holds the engine's model, optimizer and
scheduler state, every rank's python/numpy/torch RNG states and data position, and `trainer_state.json` (step,
tokens, engine, world size, the last metrics).

A checkpoint is written into `step-N.tmp` and renamed when every rank has written its part, so a directory named
`step-N` is always complete; the oldest are dropped beyond `keep_checkpoints`. Everything but the engine's own files
is read back with `torch.load(weights_only=True)`: a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import config_hash
from core.errors import UserError
from pretrain.trainer.batches import DataStream
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.engines import Engine, engine_name
from pretrain.trainer.process import Runtime, barrier

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` reads back."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- finding


def checkpoint_dirs(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` directory is a save that did not finish)."""
    root = Path(work_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(work_dir)
    return dirs[-1] if dirs else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def check_resumable(checkpoint: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Before the process group is joined: the same engine wrote it, and it is not past the run's end."""
    engine = engine_name(config)
    if state.get("engine") != engine:
        raise UserError(f"checkpoint {checkpoint} was written by the {state.get('engine')} engine, this run uses "
                        f"{engine}; resume with the same deepspeed setting or use another work dir")
    if state["step"] > config.steps:
        raise UserError(f"checkpoint {checkpoint} is at step {state['step']}, beyond steps={config.steps}")


def check_world_size(checkpoint: Path, state: dict[str, Any], runtime: Runtime) -> None:
    """Each rank's RNG and data position are saved per rank: another process count cannot continue them."""
    if state.get("world_size") != runtime.world_size:
        raise UserError(f"checkpoint {checkpoint} was written by {state.get('world_size')} processes, this run has "
                        f"{runtime.world_size}; resume with the same number of processes")


# ---------------------------------------------------------------------------------------------------- writing


def save_training_checkpoint(work_dir: Path, step: int, tokens: int, engine: Engine, runtime: Runtime,
                             stream: DataStream, config: TrainConfig, last: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N through step-N.tmp and a rename, then drop the oldest beyond keep_checkpoints.
    Every process calls it: each writes its own RNG and data state, the first one the rest."""
    root = Path(work_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if runtime.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(runtime)
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{runtime.rank}.pt")
    torch.save(stream.state_dict(), tmp / f"data-rank{runtime.rank}.pt")
    barrier(runtime)
    if runtime.is_main:
        state = {"step": step, "tokens": tokens, "engine": engine.name, "world_size": runtime.world_size,
                 "config_hash": config_hash(config), "last": last or {}}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(work_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(runtime)
    return final


# ---------------------------------------------------------------------------------------------------- reading


def _load_plain(path: Path) -> Any:
    """A state saved with torch.save, read back without unpickling arbitrary objects (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing: the checkpoint is incomplete or from another "
                        "run") from None
    except Exception as err:  # the unpickler's refusal has several types
        raise UserError(f"cannot read {path} safely ({str(err).splitlines()[0]}); a data state_dict must hold only "
                        "dicts, lists, numbers, strings and tensors") from None


def restore(checkpoint: Path, engine: Engine, runtime: Runtime, stream: DataStream) -> None:
    """Put the engine, this rank's RNGs and its data position back where `checkpoint` left them."""
    engine.load(checkpoint)
    set_rng_state(_load_plain(checkpoint / f"rng-rank{runtime.rank}.pt"))
    stream.load_state_dict(_load_plain(checkpoint / f"data-rank{runtime.rank}.pt"))
