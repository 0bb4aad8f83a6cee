"""The needle-in-a-haystack picture of a pass-key run: accuracy per context (x) and depth (y),
the dense cache beside the evaluated one (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_passkey(grid: pd.DataFrame, path: str | Path, *, label: str = "", title: str = "") -> Path:
    """Write two heatmaps (dense, then `label`) of a `PasskeyResult.grid()` frame to `path`.

    `grid` needs columns context, depth, accuracy, dense_accuracy. Depth 0% is the top row (the
    needle right after the instructions), as needle-in-a-haystack plots draw it. Returns `path`.
    """
    plt = _pyplot()
    contexts = sorted(grid["context"].unique())
    depths = sorted(grid["depth"].unique())
    fig, axes = plt.subplots(
        1, 2, figsize=(3 + 1.1 * len(contexts) * 2, 1.5 + 0.45 * len(depths)), sharey=True
    )
    image = None
    for ax, column, name in (
        (axes[0], "dense_accuracy", "dense cache"),
        (axes[1], "accuracy", label or "quantized cache"),
    ):
        table = grid.pivot(index="depth", columns="context", values=column).reindex(
            index=depths, columns=contexts
        )
        image = ax.imshow(table.to_numpy(dtype=float), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(contexts)):
                value = table.iloc[i, j]
                if pd.notna(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context (tokens)")
        ax.set_title(name)
    axes[0].set_ylabel("depth of the pass key")
    fig.colorbar(image, ax=list(axes), label="accuracy", fraction=0.04, pad=0.02)
    if title:
        fig.suptitle(title, y=1.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
