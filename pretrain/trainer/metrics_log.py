"""The run's metrics: `metrics.jsonl` in the work directory, one JSON object per logged step (training keys such as
loss, lr, grad_norm, tokens_per_s, loss/<objective>; evaluation keys start with "eval/"), and TensorBoard beside it
when installed. A resumed run first drops the records after its checkpoint, so every step appears once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step; eval keys start with "eval/") and TensorBoard if installed."""

    def __init__(self, work_dir: Path, resume_step: int, enabled: bool):
        self.path = work_dir / METRICS
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run drops what came after its checkpoint, so no step appears twice
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, in order."""
    path = Path(work_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
