"""`kvtuner calibrate --target ENGINE`: per layer, the amax of keys and values on the calibration
text (the per-tensor FP8 / NVFP4 scales), and the single-layer KL of every choice the engine can
store there (`kvtuner.targets.probes`), measured with `kvtuner.engine_cache.EngineKVCache`.

Files under `calibration/<model>/<target>/`: layer_kl.csv (one row per layer and probe: choice,
kl, kl_stderr, per-sample KL), kv_amax.json (per layer [key amax, value amax]), metadata.yaml.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from kvtuner.errors import ConfigError
from kvtuner.io import atomic_path
from kvtuner.targets import DENSE, Choice, Losses, probes

COLUMNS = ("layer", "choice", "bits", "kl", "kl_stderr", "per_sample_kl")


@torch.inference_mode()
def measure_amax(
    model: Any, samples: torch.Tensor, batch_size: int = 8
) -> list[tuple[float, float]]:
    """Per layer, (max |key|, max |value|) over the prompts `samples` `[n, seq]` (the prefill's
    keys and values, as an engine's max calibration sees them)."""
    from kvtuner.evaluate import RecordingCache, prefill

    amax: dict[int, list[float]] = {}
    for batch in samples.split(batch_size):
        cache = RecordingCache(config=model.config)
        prefill(model, batch.to(next(model.parameters()).device), cache)
        for layer, (keys, values) in cache.recorded.items():
            k, v = float(keys.abs().max()), float(values.abs().max())
            old = amax.setdefault(layer, [0.0, 0.0])
            old[0], old[1] = max(old[0], k), max(old[1], v)
    return [(amax[i][0], amax[i][1]) for i in sorted(amax)]


def probe_plan(target: str, num_layers: int, layer: int, choice: Choice, kv_amax: Any) -> Any:
    """Every layer at the model dtype but `layer`, at `choice`."""
    from kvtuner.plan import EnginePlan

    layers = [DENSE] * num_layers
    layers[layer] = choice
    return EnginePlan(target, "probe", tuple(layers)).with_amax(kv_amax)


def engine_layer_kl(
    evaluator: Any,
    target: str,
    kv_amax: Sequence[tuple[float, float]],
    head_dim: int,
    *,
    choices: Sequence[Choice] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, choice): the KL of storing that layer alone in that engine format."""
    from kvtuner.engine_cache import EngineKVCache

    model = evaluator.model
    num_layers = len(kv_amax)
    choices = [c for c in (choices or probes(target)) if c.check_head_dim(head_dim) is None]
    jobs = [(layer, c) for layer in range(num_layers) for c in choices]
    rows = []
    for layer, choice in tqdm(
        jobs, desc=f"{target} single-layer KL", unit="probe", disable=not progress
    ):
        plan = probe_plan(target, num_layers, layer, choice, kv_amax)
        result = evaluator.evaluate_cache(lambda plan=plan: EngineKVCache(plan, model.config))
        rows.append(
            {
                "layer": layer,
                "choice": choice.label,
                "bits": choice.bits(head_dim),
                "kl": result.kl,
                "kl_stderr": result.kl_stderr,
                "per_sample_kl": " ".join(f"{x:.6g}" for x in result.per_sample_kl),
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_engine_calibration(
    folder: str | Path,
    table: pd.DataFrame,
    kv_amax: Sequence[tuple[float, float]],
    metadata: dict[str, Any],
) -> dict[str, Path]:
    """layer_kl.csv, kv_amax.json and metadata.yaml under `folder`; all or none renamed in."""
    folder = Path(folder)
    paths = {
        "layer_kl": folder / "layer_kl.csv",
        "kv_amax": folder / "kv_amax.json",
        "metadata": folder / "metadata.yaml",
    }
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in paths.items()}
        table.to_csv(tmp["layer_kl"], index=False, float_format="%.6g")
        tmp["kv_amax"].write_text(json.dumps([list(a) for a in kv_amax]) + "\n")
        tmp["metadata"].write_text(yaml.safe_dump(metadata, sort_keys=False))
    return paths


def load_engine_calibration(
    folder: str | Path, target: str, num_layers: int
) -> tuple[Losses, list[tuple[float, float]], dict[str, Any]]:
    """Per layer {choice: single-layer KL}, per layer (key amax, value amax), and the metadata."""
    from kvtuner.plan import parse_choice

    folder = Path(folder)
    path = folder / "layer_kl.csv"
    if not path.is_file():
        raise ConfigError(
            f"{path}: no engine calibration (run `kvtuner calibrate --target {target}` first)"
        )
    try:
        table = pd.read_csv(path)
        amax = json.loads((folder / "kv_amax.json").read_text())
        metadata = yaml.safe_load((folder / "metadata.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError, pd.errors.ParserError) as exc:
        raise ConfigError(f"{folder}: unreadable engine calibration ({exc})") from None
    if metadata.get("target") != target:
        raise ConfigError(
            f"{folder}: calibrated for target {metadata.get('target')!r}, not {target!r}"
        )
    missing = [c for c in ("layer", "choice", "kl") if c not in table.columns]
    if missing or table.empty:
        raise ConfigError(f"{path}: needs non-empty columns layer, choice, kl")
    layers = sorted(int(x) for x in table.layer.unique())
    if layers != list(range(num_layers)) or len(amax) != num_layers:
        raise ConfigError(f"{folder}: calibrated {len(layers)} layers, the model has {num_layers}")
    measured: list[dict[Choice, float]] = [{} for _ in range(num_layers)]
    for row in table.itertuples(index=False):
        measured[int(row.layer)][parse_choice(target, row.choice)] = float(row.kl)
    return measured, [(float(k), float(v)) for k, v in amax], metadata
