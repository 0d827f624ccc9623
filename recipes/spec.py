"""What a recipe config holds: the input model, the stages in order, and the gates that guard them.

A stage names a `kind` (a step that also runs alone from its own command line: `compress.layer`, `pretrain.train`,
`align.logo`, ...) and its arguments, which are checked against that kind's own config dataclass, so a typo in a
recipe is caught by the same loader and with the same message as a typo on that command's command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compress.layer import parse_count


@dataclasses.dataclass
class StageSpec:
    name: str
    """Unique stage name; also the stage's output directory under the run directory."""
    kind: str
    """Which step runs: see `recipes.kinds.RECIPE_KINDS` (teacher, layer_prune, neuron_prune, vocab_prune, train,
    align)."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Arguments for the kind's config dataclass (unknown keys are errors naming the key)."""
    input: str | None = None
    """Read this earlier stage's output instead of the previous stage's (baselines that branch off the chain)."""
    gate: str | None = None
    """Name of a gate in `gates` run on this stage's output; a failure stops the recipe and publishes nothing."""
    score: dict[str, Any] | None = None
    """Importance scores of this stage's output (core.kind.ScoreRequest: `scorers: {layers: block_influence,
    heads: activation}`, `calib`, `num_samples`, `seq_len`), saved in its `importance/` folder; the recipe's
    corpus is the calibration data unless `calib` names other data. Any kind takes it, training and LOGO too."""
    tokens: float | None = dataclasses.field(default=None, metadata={"parse": lambda text: parse_count(text)})
    """Training tokens the paper spent on this stage (documentation and dry-run planning only): 10.0e9 or 10B."""
    note: str = ""
    """Where the stage's settings come from (paper section, table)."""


@dataclasses.dataclass
class RecipeConfig:
    name: str = "openba_v2"
    run_dir: str = "runs/openba_v2"
    """Where stage outputs, manifests and report.md go. A rerun with the same run_dir resumes."""
    model: str | None = None
    """Input checkpoint directory, or None to start from the stage of kind `teacher` (the embedded default)."""
    preset: str | None = None
    """For `--dry-run` without weights: an OpenBA preset name (`openba-15b`) or a config.json path."""
    stages: list[StageSpec] = dataclasses.field(default_factory=list)
    gates: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Gates by name: a GateConfig mapping (eval.gate) or the path of a gate YAML such as eval/gates/offline.yaml."""
    cache_dir: str | None = None
    """Where the corpus, tokenizer and tiny teacher are cached across runs (default: $OPENBA_CACHE or
    ~/.cache/openba_v2), so a second run, in any run directory, skips the teacher's training (minutes on a CPU)."""
    world_size: int = 8
    """GPUs the real-scale plan assumes for its memory estimate (ZeRO-3 shards states across them)."""
    min_free_disk_gb: float = 1.0
    """Refuse to start a stage when the run directory's disk has less free space than this plus the estimate."""
    baseline_stage: str | None = None
    """A stage that trains the final shape from scratch (kind train, init: scratch) for the same steps as all
    recovery stages together; the report compares the final model against it and against the teacher."""
