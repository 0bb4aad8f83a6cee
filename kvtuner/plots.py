"""Every plot kvtuner draws (matplotlib, Agg backend: no display needed).

- `plot_heatmap`: calibration, e_o per layer and precision pair (log colour scale).
- `plot_pareto`: a search, every evaluated config and the Pareto front, uniform configs labeled.
- `plot_quality_vs_bits`: KL against equivalent bits (left) and effective bits (right), uniform
  configs against searched ones (and peers), log KL axis.
- `plot_precision_map`: the per-layer key and value bits of each searched config.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvtuner.precision import PrecisionPair

# kind -> (label, marker, colour); kinds missing from a frame are skipped
SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("uniform", "uniform", "s", "tab:red"),
    ("greedy", "greedy by e_o", "v", "tab:orange"),
    ("knapsack", "knapsack on single-layer KL", "D", "tab:green"),
    ("searched", "searched (kvtuner)", "o", "tab:blue"),
    ("peer", "transformers QuantizedCache", "^", "tab:purple"),
)
BIT_COLOURS: dict[int, str] = {2: "#d7301f", 4: "#fc8d59", 8: "#91cf60", 16: "#4575b4"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_bits(results: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Write the quality-vs-bits figure of one (model, scheme) results frame to `path`.

    `results` needs columns `config`, `kind`, `equivalent_bits`, `effective_bits`, `kl`,
    `kl_stderr`. Rows without a positive KL (the dense reference, KL 0; unmeasured peers) cannot
    sit on a log axis and are left out. Returns `path`.
    """
    plt = _pyplot()
    shown = results[pd.to_numeric(results["kl"], errors="coerce") > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, column, xlabel in (
        (axes[0], "equivalent_bits", "equivalent bits (mean of K and V bits over layers)"),
        (axes[1], "effective_bits", "effective bits (with scales, zeros, residual)"),
    ):
        for kind, label, marker, colour in SERIES:
            part = shown[shown["kind"] == kind].sort_values(column)
            part = part[pd.to_numeric(part[column], errors="coerce").notna()]
            if part.empty:
                continue
            kl = part["kl"].astype(float)
            err = part["kl_stderr"].astype(float).fillna(0).clip(lower=0)
            # a log axis cannot draw a lower bar at or below zero
            ax.errorbar(
                part[column].astype(float),
                kl,
                yerr=[err.clip(upper=kl * 0.9), err],
                fmt=f"{marker}-" if kind in ("uniform", "searched") else marker,
                color=colour,
                mfc="none" if kind == "uniform" else colour,
                ms=7,
                lw=1.2,
                capsize=2,
                label=label,
            )
            # searched labels below their points, uniform ones above; the baselines unlabeled
            offset = (5, -11) if kind == "searched" else (5, 4)
            for _, row in part.iterrows() if kind in ("uniform", "searched", "peer") else ():
                ax.annotate(
                    str(row["config"]).removeprefix("kvtuner "),
                    (float(row[column]), float(row["kl"])),
                    textcoords="offset points",
                    xytext=offset,
                    fontsize=7,
                    color=colour,
                )
        ax.set_yscale("log")
        ax.margins(x=0.1)  # room for the labels of the end points
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("KL(fp || quantized), nats/token")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_precision_map(
    configs: Sequence[tuple[str, Sequence[PrecisionPair]]],
    path: str | Path,
    *,
    title: str = "",
    highlight_layers: Collection[int] = (),
) -> Path:
    """Write a map of per-layer bits: layers on x, two rows (K, V) per config on y, each cell annotated.

    `configs` is `[(label, per-layer pairs), ...]`, all with the same number of layers;
    `highlight_layers` get a `*` on the x axis (e.g. Gemma 3's full-attention layers).
    Raises ValueError when `configs` is empty or the layer counts differ. Returns `path`.
    """
    if not configs:
        raise ValueError("no configs to map")
    num_layers = {len(pairs) for _, pairs in configs}
    if len(num_layers) != 1:
        raise ValueError(f"configs have different layer counts: {sorted(num_layers)}")
    (layers,) = num_layers
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    bits = sorted(BIT_COLOURS)
    grid = [
        [getattr(pair, field) for pair in pairs]
        for _, pairs in configs
        for field in ("key_bits", "value_bits")
    ]
    index = [[bits.index(b) for b in row] for row in grid]
    cmap = ListedColormap([BIT_COLOURS[b] for b in bits])
    norm = BoundaryNorm([i - 0.5 for i in range(len(bits) + 1)], cmap.N)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.34 * layers + 2.5), 0.42 * len(grid) + 1.6))
    ax.imshow(index, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, str(value), ha="center", va="center", fontsize=7, color="black")
    for boundary in range(2, len(grid), 2):  # white rule between configs
        ax.axhline(boundary - 0.5, color="white", lw=3)
    ax.set_yticks(range(len(grid)))
    ax.set_yticklabels([f"{label}  {kv}" for label, _ in configs for kv in ("K", "V")], fontsize=8)
    ax.set_xticks(range(layers))
    ax.set_xticklabels(
        [f"{i}*" if i in highlight_layers else str(i) for i in range(layers)], fontsize=7
    )
    note = " (* full attention)" if highlight_layers else ""
    ax.set_xlabel(f"layer{note}")
    ax.legend(
        handles=[Patch(color=BIT_COLOURS[b], label=f"{b} bits") for b in bits],
        loc="upper left",
        bbox_to_anchor=(1.005, 1),
        fontsize=8,
        frameon=False,
    )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from kvtuner.io import atomic_path

    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


# -- calibration and search -------------------------------------------------------------------


HEATMAP_LABELS = {
    "e_o": "relative attention-output error e_o",
    "kl": "single-layer KL (nats/token)",
}


def plot_heatmap(
    table: pd.DataFrame, path: str | Path, title: str = "", value: str = "e_o"
) -> None:
    """Layers x pairs heatmap of `value` (e_o, or single-layer kl) on a log colour scale, each
    cell annotated; pairs a layer was not measured at stay blank."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    pairs = sorted(
        {PrecisionPair(int(k), int(v)) for k, v in zip(table.key_bits, table.value_bits)},
        key=lambda p: (-p.equivalent_bits, -p.key_bits),
    )
    grid = e_o_grid(table, pairs, value)
    positive = grid[grid > 0]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * len(pairs), 1.2 + 0.3 * grid.shape[0]))
    image = ax.imshow(
        grid.clip(min=low),
        aspect="auto",
        cmap="viridis",
        norm=LogNorm(vmin=low, vmax=max(high, low * 1.01)),
    )
    for (row, col), cell in pd.DataFrame(grid).stack().items():
        if not cell == cell:  # NaN: not measured
            continue
        colour = "white" if cell < (low * high) ** 0.5 else "black"
        ax.text(col, row, f"{cell:.2g}", ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(len(pairs)), [p.name for p in pairs])
    ax.set_yticks(range(grid.shape[0]), [str(layer) for layer in sorted(table.layer.unique())])
    ax.set_xlabel("precision pair")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}: {HEATMAP_LABELS.get(value, value)}".strip(": "), fontsize=9)
    fig.colorbar(image, ax=ax, label=value)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def e_o_grid(table: pd.DataFrame, pairs: Sequence[PrecisionPair], value: str = "e_o") -> Any:
    """numpy `[layers, pairs]` of `value`, layers ascending, columns in the order of `pairs`
    (NaN where a layer has no row for a pair)."""
    wide = table.pivot(index="layer", columns=["key_bits", "value_bits"], values=value)
    return wide[[(p.key_bits, p.value_bits) for p in pairs]].to_numpy(dtype=float)


LOSS_LABELS = {
    "kl": "KL(fp || quantized), nats/token",
    "ppl": "perplexity",
    "accuracy": "1 - accuracy",
    "proxy": "sum of e_o over layers",
}


SOURCE_STYLES = {  # how each kind of config is drawn on the Pareto plot
    "nsga": dict(s=12, color="0.7", label="NSGA-II proposals"),
    "knapsack": dict(s=22, marker="^", color="tab:green", label="knapsack front (seeds)"),
    "greedy": dict(s=22, marker="v", color="tab:orange", label="greedy by e_o (seeds)"),
}


def plot_pareto(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    path: str | Path,
    *,
    objective: str,
    caps: Sequence[float] = (),
    title: str = "",
    bits_label: str = "budget bits",
) -> Path:
    """Every evaluated config as a dot coloured by where it came from, the Pareto front as a step
    line, uniform configs labeled, the caps as vertical lines.

    `trials` and `front` have columns `bits`, `loss`, `source` and `uniform` (pair name or "").
    The loss axis is logarithmic when every loss is positive and they span more than a decade.
    """
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for source, style in SOURCE_STYLES.items():
        part = trials[trials["source"] == source] if not trials.empty else trials
        if not part.empty:
            ax.scatter(part["bits"], part["loss"], zorder=1, **style)
    if not front.empty:
        ax.step(front["bits"], front["loss"], where="post", color="tab:blue", lw=1.5, zorder=2,
                label="Pareto front")  # fmt: skip
        ax.scatter(front["bits"], front["loss"], s=18, color="tab:blue", zorder=3)
    uniform = trials[trials["uniform"] != ""] if not trials.empty else trials
    if not uniform.empty:
        ax.scatter(uniform["bits"], uniform["loss"], marker="s", s=40, facecolor="none",
                   edgecolor="tab:red", lw=1.5, zorder=4, label="uniform configs")  # fmt: skip
        for _, row in uniform.iterrows():
            ax.annotate(row["uniform"], (row["bits"], row["loss"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color="tab:red")  # fmt: skip
    for i, cap in enumerate(sorted(caps)):
        ax.axvline(cap, color="0.5", ls=":", lw=0.8, label="bit caps" if i == 0 else None)
    losses = trials["loss"] if not trials.empty else pd.Series(dtype=float)
    if len(losses) and (losses > 0).all() and losses.max() > 10 * losses.min():
        ax.set_yscale("log")
    ax.set_xlabel(bits_label)
    ax.set_ylabel(LOSS_LABELS.get(objective, objective))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_bench(results: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """`kvtuner bench --contexts` results: decode tokens/s and decode-phase memory against context,
    one line per cache kind (kvtuner's, dense, transformers' QuantizedCache)."""
    plt = _pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    names = [row["name"] for row in results[0]["rows"]]
    contexts = [r["context"] for r in results]
    for index, name in enumerate(names):
        rows = [next(row for row in r["rows"] if row["name"] == name) for r in results]
        style = dict(marker="o", label=name, color=f"C{index}")
        speed.plot(contexts, [row["tokens_per_s"] for row in rows], **style)
        memory.plot(contexts, [row["decode_level_memory_bytes"] / 2**20 for row in rows], **style)
        memory.plot(
            contexts, [row["kv_bytes"] / 2**20 for row in rows], linestyle=":", color=f"C{index}"
        )
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    speed.set_ylabel("decode tokens/s")
    memory.set_ylabel("MiB above start while decoding (dotted: KV bytes)")
    speed.legend(fontsize=8)
    fig.suptitle(
        title or f"{results[0]['model']}, {results[0]['config']}, batch {results[0]['batch']}"
    )
    fig.tight_layout()
    return _save(fig, path)
