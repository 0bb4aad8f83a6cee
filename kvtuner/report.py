"""Plots of search results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

LOSS_LABELS = {
    "kl": "KL(fp || quantized), nats/token",
    "ppl": "perplexity",
    "accuracy": "1 - accuracy",
    "proxy": "sum of e_o over layers",
}


def plot_pareto(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    path: str | Path,
    *,
    objective: str,
    caps: Sequence[float] = (),
    title: str = "",
) -> Path:
    """Every evaluated config as a grey dot, the Pareto front as a step line, uniform configs labeled.

    `trials` and `front` have columns `equivalent_bits`, `loss`, `uniform` (pair name or "").
    The loss axis is logarithmic when every loss is positive and they span more than a decade.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not trials.empty:
        ax.scatter(
            trials["equivalent_bits"],
            trials["loss"],
            s=12,
            color="0.7",
            label="evaluated configs",
            zorder=1,
        )
    if not front.empty:
        ax.step(
            front["equivalent_bits"],
            front["loss"],
            where="post",
            color="tab:blue",
            lw=1.5,
            zorder=2,
            label="Pareto front",
        )
        ax.scatter(front["equivalent_bits"], front["loss"], s=18, color="tab:blue", zorder=3)
    uniform = trials[trials["uniform"] != ""] if not trials.empty else trials
    if not uniform.empty:
        ax.scatter(
            uniform["equivalent_bits"],
            uniform["loss"],
            marker="s",
            s=40,
            facecolor="none",
            edgecolor="tab:red",
            lw=1.5,
            zorder=4,
            label="uniform configs",
        )
        for _, row in uniform.iterrows():
            ax.annotate(
                row["uniform"],
                (row["equivalent_bits"], row["loss"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
                color="tab:red",
            )
    for i, cap in enumerate(sorted(caps)):
        ax.axvline(cap, color="0.5", ls=":", lw=0.8, label="bit caps" if i == 0 else None)
    losses = trials["loss"] if not trials.empty else pd.Series(dtype=float)
    if len(losses) and (losses > 0).all() and losses.max() > 10 * losses.min():
        ax.set_yscale("log")
    ax.set_xlabel("equivalent bits (mean of (key + value) / 2 over layers)")
    ax.set_ylabel(LOSS_LABELS.get(objective, objective))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
