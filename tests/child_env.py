"""The environment of a subprocess a test starts, as a user's shell would give it: the repository importable ahead of
whatever PYTHONPATH already held (packages installed with `pip --target`, as on the GPU machines), one CPU thread."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def child_env(**extra: str | None) -> dict[str, str]:
    """os.environ without launcher variables, with ROOT first on PYTHONPATH; `extra` sets (or, with None, drops) more."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    return {k: v for k, v in env.items() if v is not None and k not in LAUNCHER_VARIABLES}
