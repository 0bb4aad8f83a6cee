"""Export a study: pareto.csv, pareto.png and the best config under each cap as `kvtuner_c<bits>.yaml`.

Everything comes from the study itself (values, user attributes, study attributes), so `kvtuner
export` works on any storage a search wrote, also while workers are still adding trials. `bits`
is the budget's axis (effective bits at the study's context, or equivalent bits). Under each cap
the config with the lowest re-scored loss wins where the search re-scored candidates on more
samples (`kvtuner.search.rescore`), else the one with the lowest search loss. `source` says where
a config came from: uniform, knapsack, greedy (seeds) or nsga (the search's own proposals).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from kvtuner import defaults
from kvtuner.config import PrecisionConfig
from kvtuner.io import atomic_path
from kvtuner.search.problem import parse_layers_key
from kvtuner.search.study import completed_trials

DEFAULT_CAPS: tuple[float, ...] = defaults.CAPS
RESCORED = "rescored"  # study user attribute: {layers key: {"loss", "samples", "per_sample"}}
ANCHORS = "anchors"  # study user attribute: {cap: layers key of the exact knapsack under it}
SCALAR_METRICS = ("kl", "ppl", "accuracy", "proxy")


@dataclass(frozen=True)
class CapChoice:
    """The best config found under one cap, and where it was written."""

    cap: float
    path: Path
    trial: int
    loss: float
    equivalent_bits: float
    effective_bits: float
    layers: str
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    pareto_csv: Path
    pareto_png: Path
    trials: int
    front: pd.DataFrame
    choices: tuple[CapChoice, ...]
    missing_caps: tuple[float, ...]


def cap_label(cap: float) -> str:
    """3 -> '3.0', 3.5 -> '3.5', 3.25 -> '3.25' (the paper's C3.25 naming)."""
    text = f"{cap:g}"
    return text if "." in text else f"{text}.0"


def config_filename(cap: float) -> str:
    return f"kvtuner_c{cap_label(cap)}.yaml"


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per distinct completed config: trial, loss, budget / equivalent / effective bits,
    source, re-scored loss (NaN when not re-scored), uniform pair, metrics, layers."""
    rows = []
    seen: set[str] = set()
    rescored = study.user_attrs.get(RESCORED) or {}
    for trial in completed_trials(study):
        key = trial.user_attrs.get("layers")
        if key is None or key in seen or trial.values is None:
            continue
        seen.add(key)
        pairs = parse_layers_key(key)
        metrics = trial.user_attrs.get("metrics") or {}
        again = rescored.get(key) or {}
        row = {
            "trial": trial.number,
            "loss": trial.values[0],
            "bits": trial.values[1],
            "equivalent_bits": trial.user_attrs.get("equivalent_bits", trial.values[1]),
            "effective_bits": trial.user_attrs.get("effective_bits"),
            "feasible": all(v <= 0 for v in trial.constraints.values()),
            "source": trial.user_attrs.get("seed") or "nsga",
            "rescored_loss": again.get("loss", float("nan")),
            "rescored_samples": again.get("samples", 0),
            "uniform": pairs[0].name if len(set(pairs)) == 1 else "",
            **{m: metrics[m] for m in SCALAR_METRICS if m in metrics},
            "layers": key,
        }
        rows.append(row)
    columns = ["trial", "loss", "bits", "equivalent_bits", "effective_bits", "feasible", "source",
               "rescored_loss", "rescored_samples", "uniform", "layers"]  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else columns)


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    """Feasible rows that no other feasible row beats on both loss and bits; sorted by bits."""
    from kvtuner.pareto import pareto_front as front_of

    feasible = frame[frame["feasible"]].reset_index(drop=True)
    keep = front_of(feasible[["loss", "bits"]].to_numpy(float))
    return feasible.loc[keep].sort_values(["bits", "loss", "trial"]).reset_index(drop=True)


def front_table(front: pd.DataFrame, objective: str) -> pd.DataFrame:
    """pareto.csv: bits, the objective (accuracy as accuracy, others as the loss), other metrics,
    where each config came from, layers."""
    table = front.copy()
    if objective != "accuracy":
        table[objective] = table["loss"]
    metrics = [objective] + [m for m in SCALAR_METRICS if m in table.columns and m != objective]
    columns = ["bits", "equivalent_bits", "effective_bits", *metrics, "rescored_loss", "trial",
               "source", "uniform", "layers"]  # fmt: skip
    return table[[c for c in columns if c in table.columns]]


def best_under(
    frame: pd.DataFrame,
    cap: float,
    anchor: str | None = None,
    rescored: dict[str, Any] | None = None,
) -> pd.Series | None:
    """The best row with budget bits <= cap.

    Among re-scored rows, the lowest re-scored loss; but when the cap's `anchor` (the exact
    knapsack's layers key) was re-scored too, another row replaces it only when it is better on
    the re-scoring samples by more than one standard error of the paired difference: in a tie
    the exact solution stays. Without re-scoring, the lowest search loss (ties: fewer bits, then
    earlier trial).
    """
    under = frame[frame["bits"] <= cap + 1e-9]
    if under.empty:
        return None
    scored = under[under["rescored_loss"].notna()]
    if scored.empty:
        return under.sort_values(["loss", "bits", "trial"]).iloc[0]
    best = scored.sort_values(["rescored_loss", "bits", "trial"]).iloc[0]
    base = scored[scored["layers"] == anchor]
    if base.empty or best["layers"] == anchor or not rescored:
        return best
    mean, error = paired(rescored[best["layers"]]["per_sample"], rescored[anchor]["per_sample"])
    return best if mean < -error else base.iloc[0]


def paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and standard error of `values - reference`, sample by sample."""
    diffs = [a - b for a, b in zip(values, reference)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, (variance / len(diffs)) ** 0.5


def export_study(
    study: optuna.Study,
    out_dir: str | Path,
    caps: tuple[float, ...] = DEFAULT_CAPS,
    *,
    found_by: str | None = None,
) -> ExportResult:
    """Write pareto.csv, pareto.png and one YAML per cap into `out_dir`; returns what was written."""
    from kvtuner.plots import plot_pareto

    out_dir = Path(out_dir)
    attrs = study.user_attrs
    objective = attrs.get("objective", "loss")
    frame = trials_frame(study)
    front = pareto_front(frame) if not frame.empty else frame
    csv_path = out_dir / "pareto.csv"
    with atomic_path(csv_path) as tmp:
        front_table(front, objective).to_csv(tmp, index=False, float_format="%.6g")
    png_path = out_dir / "pareto.png"
    title = f"{attrs.get('model', '')} {attrs.get('scheme', '')}: {len(frame)} configs".strip()
    evaluation = json.loads(attrs["evaluation"]) if attrs.get("evaluation") else {}
    if evaluation.get("budget", "equivalent") == "effective":
        label = f"effective bits at {evaluation.get('budget_context')} tokens (16-bit scales)"
    else:
        label = "equivalent bits (mean of (key + value) / 2 over layers)"
    with atomic_path(png_path) as tmp:
        plot_pareto(
            frame, front, tmp, objective=objective, caps=caps, title=title, bits_label=label
        )
    choices, missing = [], []
    anchors = attrs.get(ANCHORS) or {}
    rescored = attrs.get(RESCORED) or {}
    for cap in sorted(caps):
        anchor = anchors.get(cap_label(cap))
        row = None if frame.empty else best_under(frame, cap, anchor, rescored)
        if row is None:
            missing.append(cap)
            continue
        choices.append(_write_config(study, row, cap, out_dir, len(frame), found_by))
    return ExportResult(
        out_dir, csv_path, png_path, len(frame), front, tuple(choices), tuple(missing)
    )


def _write_config(
    study: optuna.Study,
    row: pd.Series,
    cap: float,
    out_dir: Path,
    trials: int,
    found_by: str | None,
) -> CapChoice:
    attrs = study.user_attrs
    objective = attrs.get("objective", "loss")
    metrics = {m: float(row[m]) for m in SCALAR_METRICS if m in row.index and pd.notna(row[m])}
    evaluation = json.loads(attrs["evaluation"]) if attrs.get("evaluation") else {}
    rescored = pd.notna(row.get("rescored_loss"))
    metadata = {
        "model": attrs.get("model"),
        "scheme": attrs.get("scheme"),
        "objective": objective,
        "value": float(row["rescored_loss"] if rescored else row["loss"]),
        "search_value": float(row["loss"]),
        "rescored_samples": int(row["rescored_samples"]) if rescored else 0,
        **{m: v for m, v in metrics.items() if m != objective},
        "cap": cap,
        "budget": evaluation.get("budget", "equivalent"),
        "equivalent_bits": float(row["equivalent_bits"]),
        "effective_bits": None if pd.isna(row["effective_bits"]) else float(row["effective_bits"]),
        "effective_bits_context": evaluation.get("budget_context", defaults.BUDGET_CONTEXT),
        "source": row.get("source"),
        "trial": int(row["trial"]),
        "trials": trials,
        "study": study.study_name,
        "evaluation": evaluation or None,
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "found_by": found_by or attrs.get("command") or "kvtuner search",
    }
    layout = attrs.get("layout") or {
        "scheme": attrs.get("scheme", "per-token"),
        "group_size": attrs.get("group_size"),
        "residual_length": attrs.get("residual_length"),
    }
    config = PrecisionConfig(
        layers=tuple(parse_layers_key(row["layers"])),
        model=attrs.get("model"),
        metadata=metadata,
        **layout,
    )
    path = config.save(out_dir / config_filename(cap))
    return CapChoice(
        cap=cap,
        path=path,
        trial=int(row["trial"]),
        loss=float(metadata["value"]),
        equivalent_bits=float(row["equivalent_bits"]),
        effective_bits=metadata["effective_bits"],
        layers=str(row["layers"]),
        metrics=metrics,
        source=str(row.get("source") or ""),
    )
