"""One PNG per stack showing its scores: layer scores as bars, heads and channels as layers x units heatmaps.

Pruning decisions are easier to trust when one can see them: a flat layer profile, or one head that dominates
every layer, is visible at a glance. Uses matplotlib's Agg backend, so it runs on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.scoring import ImportanceScores


def _stacks(scores: ImportanceScores) -> list[str]:
    stacks = []
    for name in scores.names():
        unit, _, rest = name.partition(".")
        if unit in ("layers", "heads", "channels") and rest:
            stack = rest.split(".")[0]
            if stack not in stacks:
                stacks.append(stack)
    return stacks


def _grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer vectors into a [layers, units] grid; pruned layers with fewer units are padded with NaN."""
    width = max(len(r) for r in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for i, row in enumerate(rows):
        grid[i, : len(row)] = row
    return grid


def _layer_rows(scores: ImportanceScores, prefix: str) -> list[tuple[int, torch.Tensor]]:
    found = []
    for name in scores.names():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            found.append((int(name[len(prefix):]), scores[name]))
    return sorted(found, key=lambda item: item[0])


def plot_scores(scores: ImportanceScores, out_dir: str | Path, marked: dict[str, list[int]] | None = None) -> list[Path]:
    """Write `scores_{stack}.png` per stack into `out_dir`; `marked` highlights blocks (e.g. the removed ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scorers = scores.meta.get("scorers", {})
    written = []
    for stack in _stacks(scores):
        panels = []
        if ImportanceScores.layer_name(stack) in scores:
            panels.append(("layers", None))
        for kind in ("self", "cross"):
            if _layer_rows(scores, f"heads.{stack}.{kind}."):
                panels.append(("heads", kind))
        if _layer_rows(scores, f"channels.{stack}."):
            panels.append(("channels", None))
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
        for ax, (unit, kind) in zip(axes[:, 0], panels):
            label = f"{unit} ({scorers.get(unit, '?')})"
            if unit == "layers":
                values = scores.layer_scores(stack).numpy()
                removed = set((marked or {}).get(stack, []))
                colors = ["tab:red" if i in removed else "tab:blue" for i in range(len(values))]
                ax.bar(range(len(values)), values, color=colors)
                ax.set_xlabel("block")
                ax.set_ylabel("score (higher = keep)")
                title = f"{stack} {label}" + (": red = removed" if removed else "")
            else:
                prefix = f"heads.{stack}.{kind}." if unit == "heads" else f"channels.{stack}."
                rows = _layer_rows(scores, prefix)
                image = ax.imshow(_grid([r for _, r in rows]).numpy(), aspect="auto", interpolation="nearest",
                                  cmap="viridis")
                ax.set_yticks(range(len(rows)), [str(i) for i, _ in rows])
                ax.set_ylabel("block")
                ax.set_xlabel("head" if unit == "heads" else "FFN channel")
                fig.colorbar(image, ax=ax)
                title = f"{stack} {kind + ' ' if kind else ''}{label}"
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"scores_{stack}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
