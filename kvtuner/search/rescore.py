"""Re-score the best candidates of each cap on more samples before export.

A trial is scored on a few samples, and the differences the search has to resolve are about the
size of that noise, so the lowest search loss under a cap is partly luck (the winner's curse).
Before export, the `top` configs of each cap by search loss, plus the exact knapsack under it
(its anchor) and the best uniform config under it, are evaluated again on `rescore` more samples
(other windows of the same text); their loss on those samples alone, which chose none of them,
decides the export, and a config replaces the anchor only when it is better there by more than one
standard error (`export.best_under`). The results are kept in the study (user attributes `rescored`
and `anchors`), so a rerun re-scores only what is new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
import pandas as pd
from tqdm.auto import tqdm

from kvtuner.search.export import ANCHORS, RESCORED, cap_label, trials_frame

ALWAYS = ("knapsack", "uniform")  # sources whose best config under a cap is always re-scored


def candidates(
    frame: pd.DataFrame, caps: Sequence[float], top: int, anchors: dict[str, str] | None = None
) -> list[str]:
    """Layers keys to re-score: per cap, its anchor, the `top` lowest losses under it and the
    best of each source in `ALWAYS` under it (distinct keys, in order)."""
    keys: list[str] = []
    known = set(frame["layers"])
    for cap in sorted(caps):
        under = frame[frame["bits"] <= cap + 1e-9].sort_values(["loss", "bits", "trial"])
        anchor = (anchors or {}).get(cap_label(cap))
        picked = [anchor] if anchor in known else []
        picked += list(under["layers"].head(top))
        for source in ALWAYS:
            best = under[under["source"] == source]
            if not best.empty:
                picked.append(best["layers"].iloc[0])
        keys += [key for key in picked if key not in keys]
    return keys


def rescore(
    study: optuna.Study,
    evaluate: Callable[[str], Sequence[float]],
    caps: Sequence[float],
    top: int,
    *,
    anchors: dict[float, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Re-score the candidates of `study` (see `candidates`) with `evaluate(layers key) -> per-sample
    losses`, store them and the caps' `anchors` (cap -> layers key of the exact knapsack) in the
    study, and return the stored mapping."""
    frame = trials_frame(study)
    stored: dict[str, Any] = dict(study.user_attrs.get(RESCORED) or {})
    labels = {cap_label(cap): key for cap, key in (anchors or {}).items()}
    if labels:
        study.set_user_attr(ANCHORS, {**(study.user_attrs.get(ANCHORS) or {}), **labels})
    if frame.empty or top <= 0:
        return stored
    todo = [key for key in candidates(frame, caps, top, labels) if key not in stored]
    for key in tqdm(todo, desc="re-score", unit="config", disable=not progress):
        values = [float(x) for x in evaluate(key)]
        stored[key] = {
            "loss": sum(values) / len(values),
            "samples": len(values),
            "per_sample": [round(x, 8) for x in values],
        }
        study.set_user_attr(RESCORED, stored)  # after each: a killed run keeps what it measured
    return stored
