"""Layer pruning: drop whole blocks, chosen by importance scores, by explicit index, or to a parameter budget.

ShortGPT and Gromov et al. show that many middle blocks barely change the hidden state and can go; OpenBA-V2
drops layers in three gradual steps (with recovery training between them) with a hand rule. This module does the
surgery through the adapter (`keep_blocks`), so it works for every supported family:

    python -m compress.layer --model ckpt --calib corpus --remove 2 --out ckpt-pruned

Block indices in results are those of the model as given. The config records `original_layer_indices` (per
stack, which block of the first, unpruned model each block is), so that the paper's drop lists, which count blocks
of the original 15B model, can be replayed on later stages with `drop_numbering: original`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from core.checkpoint import count_parameters, write_checkpoint
from core.cli import command
from core.errors import UserError
from core.kind import StageKind, register_kind
from compress.calibration import CalibrationConfig
from compress.scoring import ImportanceScores

ORIGINAL_INDICES = "original_layer_indices"


@dataclass
class LayerPruneConfig:
    """What `python -m compress.layer` removes and how it chooses. Give exactly one of remove, drop, target_params."""

    remove: int | dict[str, int] | None = field(default=None, metadata={"parse": lambda t: parse_remove(t),
                                                                        "metavar": "N|STACK=N,STACK=N"})
    """Blocks to remove per stack: one number for every stack, or {"encoder": 2, "decoder": 6}."""
    drop: dict[str, list[int]] | None = None
    """Explicit blocks to drop per stack, e.g. OpenBA-V2 stage 1: {"encoder": [4, 8], "decoder": [7, 11, 18, 20,
    22, 30]}. Scores are not needed (but are still computed and saved when calibration data is given)."""
    drop_numbering: Literal["current", "original"] = "current"
    """How `drop` counts blocks: "current" (the model as given) or "original" (the first model of a pruning chain,
    read from the config's original_layer_indices; the paper's stage lists count this way)."""
    target_params: int | None = field(default=None, metadata={"parse": lambda t: parse_count(t), "metavar": "3.4B"})
    """Parameter budget: remove the lowest-scoring blocks across all stacks until the model is at or below it."""
    scorer: str = "block_influence"
    """Layer scorer (compress.scorers) or a dotted path pkg.module:function. "v2_heuristic" is OpenBA-V2's rule,
    "random" the baseline; "skip_loss" is exact but runs one calibration pass per block."""
    protect_first_last: bool = True
    """Never remove a stack's first or last block (both ShortGPT and OpenBA-V2 keep them: removing them hurts most)."""
    iterative: bool = False
    """Remove one block at a time and rescore the smaller model before the next (Gromov et al.; slower, and scores
    of the pruned model can differ from the one-shot ranking)."""
    seed: int = 0
    """Seed for the random scorer."""
    calib: str | None = None
    """Calibration data: a saved dataset (e.g. python -m pretrain.corpus), a directory of text files, or a file."""
    scores: str | None = None
    """Directory with scores.safetensors from an earlier run: reuse them instead of rescoring."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


# --- validation ------------------------------------------------------------------------------------------------
def _removable(n: int, protect_first_last: bool) -> list[int]:
    if protect_first_last:
        return list(range(1, n - 1))
    return list(range(n))


def normalise_remove(adapter, remove: int | dict[str, int]) -> dict[str, int]:
    counts = {stack: remove for stack in adapter.stacks} if isinstance(remove, int) else dict(remove)
    for stack, count in counts.items():
        if stack not in adapter.stacks:
            raise UserError(f"no stack '{stack}' in this {adapter.family} model (stacks: {', '.join(adapter.stacks)})")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UserError(f"blocks to remove from the {stack} stack must be a whole number >= 0, got {count!r}")
    return counts


def original_indices(model, adapter) -> dict[str, list[int]]:
    """Per stack, the index each current block had in the first model of the pruning chain."""
    recorded = getattr(model.config, ORIGINAL_INDICES, None) or {}
    return {stack: list(recorded.get(stack) or range(len(adapter.blocks(stack)))) for stack in adapter.stacks}


def resolve_drop(adapter, model, drop: dict[str, list[int]], numbering: str, protect_first_last: bool) -> dict[str, list[int]]:
    """Explicit drop lists in current numbering, checked: in range, not every block, protection respected."""
    origin = original_indices(model, adapter)
    resolved = {}
    for stack, indices in drop.items():
        if stack not in adapter.stacks:
            raise UserError(f"no stack '{stack}' in this {adapter.family} model (stacks: {', '.join(adapter.stacks)})")
        n = len(adapter.blocks(stack))
        current = []
        for index in indices:
            if numbering == "original":
                if index not in origin[stack]:
                    raise UserError(f"original {stack} block {index} is not in this model (it holds original blocks "
                                    f"{origin[stack]})")
                index = origin[stack].index(index)
            elif not 0 <= index < n:
                raise UserError(f"{stack} block index {index} is out of range: the stack has {n} blocks (0-{n - 1})")
            current.append(index)
        current = sorted(set(current))
        if len(current) >= n:
            raise UserError(f"dropping {len(current)} of {n} {stack} blocks would remove every layer of the stack")
        if protect_first_last and ({0, n - 1} & set(current)):
            raise UserError(f"drop names the first or last {stack} block, which protect_first_last keeps "
                            "(pass --no-protect-first-last to allow it)")
        resolved[stack] = current
    return resolved


def check_scores_fit(adapter, scores: ImportanceScores | None, stacks) -> None:
    if scores is None:
        return
    for stack in stacks:
        name = ImportanceScores.layer_name(stack)
        if name not in scores:
            raise UserError(f"the scores have no '{name}': score layers first (python -m compress.score --layers ...)")
        n = len(adapter.blocks(stack))
        if scores[name].numel() != n:
            raise UserError(f"the {stack} layer scores have {scores[name].numel()} entries but the model's {stack} "
                            f"stack has {n} blocks: they were made for another model")


def block_parameters(block) -> int:
    return sum(p.numel() for p in block.parameters())


def check_layer_request(model, adapter, scores=None, remove=None, drop=None, target_params=None,
                        protect_first_last=True, iterative=False, rescore_fn=None, drop_numbering="current"):
    """Every error a layer-pruning request can have, raised before anything changes. Returns the request in
    normal form: ("drop", {stack: indices}) | ("remove", {stack: count}) | ("budget", target)."""
    given = [name for name, value in (("remove", remove), ("drop", drop), ("target_params", target_params))
             if value is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of remove, drop or target_params (got {', '.join(given) or 'none'})")
    if drop is not None:
        if iterative:
            raise UserError("iterative pruning chooses blocks by score; it cannot be combined with an explicit drop")
        return "drop", resolve_drop(adapter, model, drop, drop_numbering, protect_first_last)
    if iterative and rescore_fn is None:
        raise UserError("iterative pruning rescoring after each removal needs calibration data (rescore_fn / --calib)")
    if remove is not None:
        counts = normalise_remove(adapter, remove)
        for stack, count in counts.items():
            n = len(adapter.blocks(stack))
            if count >= n:
                raise UserError(f"removing {count} of {n} {stack} blocks would remove every layer of the stack")
            allowed = len(_removable(n, protect_first_last))
            if count > allowed:
                raise UserError(f"can remove at most {allowed} of {n} {stack} blocks while keeping the first and last "
                                "(pass --no-protect-first-last to allow more)")
        check_scores_fit(adapter, scores, [s for s, c in counts.items() if c > 0])
        return "remove", counts
    if target_params <= 0:
        raise UserError(f"target_params must be positive, got {target_params}")
    total = count_parameters(model)
    smallest = total
    for stack in adapter.stacks:
        blocks = adapter.blocks(stack)
        candidates = _removable(len(blocks), protect_first_last)
        if not protect_first_last:
            candidates = candidates[:-1]  # one block must stay
        smallest -= sum(block_parameters(blocks[i]) for i in candidates)
    if smallest > target_params:
        raise UserError(f"cannot reach {target_params:,} parameters by removing layers: the fewest reachable is "
                        f"{smallest:,} (prune widths or vocabulary too: compress.neuron, compress.vocab)")
    check_scores_fit(adapter, scores, adapter.stacks)
    return "budget", target_params


# --- choosing and removing -------------------------------------------------------------------------------------
def _candidates(adapter, scores: ImportanceScores, stacks, protect_first_last: bool) -> list[tuple[float, str, int]]:
    """(score, stack, index) of every block that may go, lowest score first (ties: later stack, later block)."""
    found = []
    for stack in stacks:
        n = len(adapter.blocks(stack))
        if n <= 1:
            continue
        values = scores.layer_scores(stack)
        for index in _removable(n, protect_first_last):
            found.append((float(values[index]), stack, index))
    return sorted(found, key=lambda item: (item[0], -adapter.stacks.index(item[1]), -item[2]))


def _remove(adapter, alive: dict[str, list[int]], removed: dict[str, list[int]], stack: str, positions: list[int]):
    """Drop current blocks `positions` of `stack`, keeping `alive` (given-model indices) in step."""
    positions = set(positions)
    keep = [i for i in range(len(alive[stack])) if i not in positions]
    adapter.keep_blocks(stack, keep)
    removed[stack].extend(alive[stack][i] for i in sorted(positions))
    alive[stack] = [alive[stack][i] for i in keep]


def prune_layers(model, scores: ImportanceScores | None, remove: int | dict[str, int] | None = None, *,
                 drop: dict[str, list[int]] | None = None, target_params: int | None = None,
                 protect_first_last: bool = True, iterative: bool = False,
                 rescore_fn: Callable[[object], ImportanceScores] | None = None,
                 drop_numbering: str = "current") -> dict[str, list[int]]:
    """Remove blocks in place; returns, per stack, the removed indices (numbered as in the model given).

    `remove`: blocks per stack (an int for every stack, or a dict); `drop`: explicit indices; `target_params`:
    lowest scores first across stacks until at or below the budget. `iterative` removes one block at a time and
    calls `rescore_fn(model)` for fresh scores before the next. All errors are raised before the model changes.
    """
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    mode, request = check_layer_request(model, adapter, scores, remove, drop, target_params, protect_first_last,
                                        iterative, rescore_fn, drop_numbering)
    origin = original_indices(model, adapter)
    alive = {stack: list(range(len(adapter.blocks(stack)))) for stack in adapter.stacks}
    removed: dict[str, list[int]] = {stack: [] for stack in adapter.stacks}

    if mode == "drop":
        for stack, positions in request.items():
            _remove(adapter, alive, removed, stack, positions)
    elif mode == "remove" and not iterative:
        for stack, count in request.items():
            if count:
                chosen = [index for _, _, index in _candidates(adapter, scores, [stack], protect_first_last)[:count]]
                _remove(adapter, alive, removed, stack, chosen)
    else:
        left = dict(request) if mode == "remove" else {}

        def finished() -> bool:
            if mode == "remove":
                return not any(left.values())
            return count_parameters(model) <= request

        while not finished():
            stacks = [s for s, c in left.items() if c > 0] if mode == "remove" else list(adapter.stacks)
            candidates = _candidates(adapter, scores, stacks, protect_first_last)
            if not candidates:
                break
            _, stack, index = candidates[0]
            _remove(adapter, alive, removed, stack, [index])
            if mode == "remove":
                left[stack] -= 1
            if finished():
                break
            if iterative:
                scores = rescore_fn(model)
                check_scores_fit(adapter, scores, adapter.stacks)
            else:
                scores = _without(scores, stack, index)

    record = {stack: [origin[stack][i] for i in alive[stack]] for stack in adapter.stacks}
    setattr(model.config, ORIGINAL_INDICES, record)
    return {stack: sorted(indices) for stack, indices in removed.items()}


def _without(scores: ImportanceScores, stack: str, index: int) -> ImportanceScores:
    """The same scores with block `index` of `stack` gone, so one-shot budget pruning keeps using them."""
    values = scores.layer_scores(stack)
    kept = ImportanceScores({n: t for n, t in scores.tensors.items() if n.startswith("layers.")}, scores.meta)
    kept[ImportanceScores.layer_name(stack)] = values[[i for i in range(len(values)) if i != index]]
    return kept


# --- per-stack counts for summaries ----------------------------------------------------------------------------
def stack_parameters(model) -> dict[str, int]:
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    return {stack: sum(block_parameters(b) for b in adapter.blocks(stack)) for stack in adapter.stacks}


def layer_summary_rows(before: dict, after: dict, removed: dict[str, list[int]]) -> list[list]:
    from core.table import human_count

    rows = []
    for stack in before["blocks"]:
        rows.append([stack, before["blocks"][stack], after["blocks"][stack], human_count(before["params"][stack]),
                     human_count(after["params"][stack]), str(removed.get(stack) or "-")])
    rows.append(["model (all)", sum(before["blocks"].values()), sum(after["blocks"].values()),
                 human_count(before["total"]), human_count(after["total"]),
                 f"{after['total'] / before['total']:.1%} of parameters kept"])
    return rows


def model_shape(model) -> dict:
    from core.adapters import get_adapter

    adapter = get_adapter(model)
    return {"blocks": {s: len(adapter.blocks(s)) for s in adapter.stacks}, "params": stack_parameters(model),
            "total": count_parameters(model)}


# --- planning (the dry run: shapes only, no weights) ------------------------------------------------------------
def shape_after(config: LayerPruneConfig, shape, model):
    """The depths this prune leaves (`StageKind.shape_after`). Explicit drops and counts are exact. A parameter
    budget is an estimate (a `core.planning.Estimate`): the pruner removes the lowest-scoring blocks across stacks
    until the model fits, and the plan, which has no scores, removes blocks as evenly as the stacks allow (the stack
    that keeps the largest share of its blocks gives up the next), counting after each, until the model fits. The
    count is then exact for the depths shown; which stack gives up the blocks is the scores' choice.

    `drop_numbering: original` indices are checked against earlier stages by the recipe's planner, which alone
    knows what they dropped."""
    from core.planning import Estimate

    depths = dict(shape.depths)

    def known(stack: str) -> None:
        if stack not in depths:
            raise UserError(f"no stack '{stack}' in this model (stacks: {', '.join(depths)})")

    given = [name for name in ("remove", "drop", "target_params") if getattr(config, name) is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of remove, drop or target_params (got {', '.join(given) or 'none'})")
    if config.target_params is not None:
        return _budget_shape(config, shape, model, Estimate)
    if config.drop is not None:
        for stack, indices in config.drop.items():
            known(stack)
            outside = [i for i in indices if not 0 <= i < depths[stack]]
            if config.drop_numbering == "current" and outside:
                raise UserError(f"{stack} block index {outside[0]} is out of range: the stack has {depths[stack]} "
                                f"blocks (0-{depths[stack] - 1})")
            depths[stack] -= len(set(indices))
    else:
        counts = {stack: config.remove for stack in depths} if isinstance(config.remove, int) else config.remove
        for stack, count in counts.items():
            known(stack)
            allowed = len(_removable(depths[stack], config.protect_first_last))
            if count > allowed:
                raise UserError(f"can remove at most {allowed} of {depths[stack]} {stack} blocks"
                                + (" while keeping the first and last" if config.protect_first_last else ""))
            depths[stack] -= count
    empty = [stack for stack, depth in depths.items() if depth < 1]
    if empty:
        raise UserError(f"layer pruning would leave the {empty[0]} stack empty: {depths}")
    return replace(shape, depths=depths)


def _budget_shape(config: LayerPruneConfig, shape, model, estimate):
    target = config.target_params
    if target <= 0:
        raise UserError(f"target_params must be positive, got {target}")
    depths = dict(shape.depths)
    # blocks a stack may lose: the pruner protects the first and last, and never empties a stack
    spare = {stack: max(len(_removable(n, config.protect_first_last)) - (0 if config.protect_first_last else 1), 0)
             for stack, n in depths.items()}
    removed = {stack: 0 for stack in depths}
    current = shape
    while model.count(current) > target:
        open_stacks = [stack for stack in depths if removed[stack] < spare[stack]]
        if not open_stacks:
            raise UserError(f"cannot reach {target:,} parameters by removing layers: the fewest reachable is "
                            f"{model.count(current):,} (prune widths or vocabulary too: compress.neuron, "
                            "compress.vocab)")
        # the largest kept share loses a block; ties go to the later stack, as the pruner's ties do
        stack = max(reversed(open_stacks), key=lambda s: (depths[s] - removed[s]) / depths[s])
        removed[stack] += 1
        current = replace(shape, depths={s: depths[s] - removed[s] for s in depths})
    if not any(removed.values()):
        return current
    cut = ", ".join(f"{stack} -{count}" for stack, count in removed.items() if count)
    return estimate(current, f"target_params {target:,}: {sum(removed.values())} blocks ({cut}) reach it if taken "
                             "evenly across stacks; the scores choose which stacks give them up")


# --- command line ----------------------------------------------------------------------------------------------
def parse_count(text: str) -> int:
    """'3.4B', '900M', '12e6' or '1200000' -> an integer parameter count."""
    text = str(text).strip().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:].upper(), None)
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise UserError(f"not a parameter count: '{text}' (use e.g. 3.4B, 900M or 1200000)") from None
    return int(round(value))


def parse_per_stack(text: str, what: str) -> dict[str, list[int]]:
    """'encoder=4,8' (repeatable) -> {"encoder": [4, 8]}."""
    stack, sep, values = text.partition("=")
    if not sep or not stack:
        raise UserError(f"{what} must look like STACK=1,2 (e.g. decoder=7,11), got '{text}'")
    try:
        return {stack.strip(): [int(v) for v in values.split(",") if v.strip()]}
    except ValueError:
        raise UserError(f"{what} values must be whole numbers, got '{text}'") from None


def parse_remove(text: str) -> int | dict[str, int]:
    """'8' (every stack) or 'encoder=2,decoder=6'."""
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--remove takes a number or STACK=N pairs, got '{text}'") from None
    counts = {}
    for part in text.split(","):
        stack, _, value = part.partition("=")
        try:
            counts[stack.strip()] = int(value)
        except ValueError:
            raise UserError(f"--remove takes a number or STACK=N pairs, got '{text}'") from None
    return counts


def load_inputs(model_dir: str, tokenizer_dir: str | None):
    """Model and tokenizer (None if the checkpoint has none and none was named) with the usual one-line errors."""
    from core.checkpoint import load_model, load_tokenizer, read_model_config
    from compress.tokenizer_surgery import SENTENCEPIECE_FILES

    read_model_config(model_dir)
    model = load_model(model_dir).eval()
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    elif any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", *SENTENCEPIECE_FILES)):  # T5: spiece.model
        tokenizer = load_tokenizer(model_dir)
    return model, tokenizer


def prepare_layer_prune(model_dir: str | Path, config: LayerPruneConfig, progress: bool = True):
    """Load, check and score everything a layer-pruning stage needs; returns `write(work_dir) -> metrics`.

    Every error of the request (bad paths, unknown scorer, empty or foreign calibration data, removing all layers,
    indices out of range, an unreachable budget, a failing user scorer) is raised here, before anything is written.
    """
    from core.adapters import get_adapter
    from compress.calibration import calibration_batches
    from compress.plots import plot_scores
    from compress.scorers import get_scorer
    from compress.scoring import score_model

    if config.drop is None and config.scores is None:
        get_scorer("layers", config.scorer)  # an unknown scorer fails before the model is loaded
    model, tokenizer = load_inputs(str(model_dir), config.tokenizer)
    adapter = get_adapter(model)
    scores = ImportanceScores.load(config.scores) if config.scores else None
    calib = None
    if config.calib is not None:
        calib = calibration_batches(config.calib, tokenizer, model=model, config=config.calibration)
    if scores is None and calib is None and config.drop is None:
        raise UserError("choosing blocks needs scores: give --calib DATA (to score) or --scores DIR (to reuse)")

    def rescore(m):
        return score_model(m, calib, {"layers": config.scorer}, seed=config.seed, progress=False)

    rescore_fn = rescore if calib is not None else None
    check_layer_request(model, adapter, scores, config.remove, config.drop, config.target_params,
                        config.protect_first_last, config.iterative, rescore_fn, config.drop_numbering)
    before = model_shape(model)
    started = time.perf_counter()
    if scores is None and calib is not None:
        scores = score_model(model, calib, {"layers": config.scorer}, seed=config.seed, progress=progress)
    scoring_seconds = round(time.perf_counter() - started, 3)

    def write(work_dir: Path) -> dict:
        removed = prune_layers(model, scores, config.remove, drop=config.drop, target_params=config.target_params,
                               protect_first_last=config.protect_first_last, iterative=config.iterative,
                               rescore_fn=rescore_fn, drop_numbering=config.drop_numbering)
        write_checkpoint(model, tokenizer, work_dir)
        if scores is not None:
            scores.save(Path(work_dir) / "scores")
            plot_scores(scores, Path(work_dir) / "scores", marked=removed)
        after = model_shape(model)
        return {"removed": removed, "before": before, "after": after, "scorer": None if config.drop else config.scorer,
                "kept_fraction": after["total"] / before["total"],
                "original_layer_indices": getattr(model.config, ORIGINAL_INDICES),
                "calibration_tokens": calib.num_tokens if calib is not None else 0, "scoring_seconds": scoring_seconds}

    return write


def layer_prune_stage(input_dir: Path, work_dir: Path, config: LayerPruneConfig) -> dict:
    """The stage function (recipes and the CLI): prune the checkpoint in `input_dir` into `work_dir`."""
    return prepare_layer_prune(input_dir, config)(work_dir)


def summary(manifest) -> str:
    from core.table import format_table

    metrics = manifest.metrics
    rows = layer_summary_rows(metrics["before"], metrics["after"], metrics["removed"])
    return format_table(rows, ["stack", "blocks before", "blocks after", "params before", "params after", "removed"])


def _drop_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drop", action="append", type=lambda t: parse_per_stack(t, "--drop"), metavar="STACK=I,J",
                        help="explicit blocks to drop (repeat per stack)")


def _drop_value(args: argparse.Namespace) -> dict:
    return {"drop": {k: v for d in args.drop for k, v in d.items()} if args.drop else None}


KIND = register_kind(StageKind(
    name="layer_prune",
    stage="layer-prune",
    module="compress.layer",
    config_cls=LayerPruneConfig,
    prepare=lambda config, inputs, progress: prepare_layer_prune(inputs["model"], config, progress),
    run=lambda write, work_dir: write(work_dir),
    description="Remove whole blocks (layers) from a checkpoint, chosen by importance scores, by index, or to a "
                "parameter budget. Writes a checkpoint (model + tokenizer), the scores, plots and a manifest.",
    examples=(
        "python -m compress.layer --model ckpt --calib runs/corpus --remove 8 --out ckpt-l8",
        "python -m compress.layer --model ckpt --calib runs/corpus --remove decoder=6,encoder=2 --iterative --out ckpt-it",
        "python -m compress.layer --model openba --drop encoder=4,8 --drop decoder=7,11,18,20,22,30 --out s1",
        "python -m compress.layer --model ckpt --scores runs/scores --target-params 3.4B --out ckpt-small",
    ),
    summary=summary,
    shape_after=shape_after,
    flags=_drop_flag,
    flag_values=_drop_value,
    exclusive=(("remove", "drop", "target_params"),),
))
main = command(KIND)


if __name__ == "__main__":
    main()
