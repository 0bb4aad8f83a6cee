"""Calibration: run a model over text samples, capture each layer's Q/K/V, measure per-pair errors.

Queries, keys and values come from `kvtuner.capture` (inside attention itself, after RoPE); the
same module gives `--end-to-end`, the KL of the model's next-token distribution when only one
layer's KV is quantized.

Outputs, in `<out>/<model>/<scheme>/`: sensitivity.csv (layer, key_bits, value_bits,
equivalent_bits, e_o, e_k, e_v), heatmap.png, metadata.yaml and, with `--end-to-end`,
end_to_end.csv (layer, key_bits, value_bits, e_o, kl).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from kvtuner import defaults
from kvtuner.capture import capture_layers, single_layer_kl
from kvtuner.compat import text_config
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_path
from kvtuner.plots import plot_heatmap
from kvtuner.precision import (
    SCHEMES,
    SUPPORTED_BITS,
    Layout,
    PrecisionPair,
    candidate_pairs,
)
from kvtuner.sensitivity import (
    COLUMNS,
    QuantScheme,
    sensitivity_table,
)

# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSettings:
    """What to measure, under which layout. `group_size` None is one group per head;
    `residual_length` None takes the scheme's default (KIVI 32, per-token 0)."""

    scheme: str = defaults.SCHEME
    bits: tuple[int, ...] = defaults.CANDIDATE_BITS
    samples: int = defaults.CALIBRATION_SAMPLES
    seq_len: int = defaults.CALIBRATION_SEQ_LEN
    query_tokens: int = defaults.QUERY_TOKENS
    group_size: int | None = defaults.GROUP_SIZE
    residual_length: int | None = None
    block_size: int = defaults.KIVI_BLOCK_SIZE
    sink_tokens: int = defaults.SINK_TOKENS
    seed: int = 0
    text: str | None = None
    end_to_end: bool = False

    def resolved(self) -> CalibrationSettings:
        """Fill the scheme's residual: KIVI 32 unless given; per-token none."""
        if self.scheme != "kivi":
            return replace(self, residual_length=0)
        if self.residual_length is None:
            return replace(self, residual_length=defaults.KIVI_RESIDUAL_LENGTH)
        return self

    @property
    def pairs(self) -> tuple[PrecisionPair, ...]:
        return candidate_pairs(self.bits)

    @property
    def layout(self) -> Layout:
        s = self.resolved()
        return Layout(s.scheme, s.group_size, s.block_size, s.residual_length, s.sink_tokens)

    @property
    def quant_scheme(self) -> QuantScheme:
        return QuantScheme(self.layout)


def parse_bits(spec: str) -> tuple[int, ...]:
    """`"2,4,8"` -> (2, 4, 8); ConfigError naming `--bits` for anything outside 2, 4, 8, 16."""
    try:
        bits = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"--bits: '{spec}' is not a comma-separated list of integers") from None
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or bad:
        raise ConfigError(f"--bits must be drawn from 2, 4, 8, 16; got '{spec}'")
    return bits


def check_settings(settings: CalibrationSettings, model_config: Any) -> None:
    """Raise ConfigError for settings this model cannot run (before any heavy work)."""
    s = settings.resolved()
    cfg = text_config(model_config)
    if s.scheme not in SCHEMES:
        raise ConfigError(f"--scheme must be one of {', '.join(SCHEMES)}; got '{s.scheme}'")
    parse_bits(",".join(str(b) for b in s.bits))
    max_positions = getattr(cfg, "max_position_embeddings", None)
    if s.seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2; got {s.seq_len}")
    if max_positions is not None and s.seq_len > max_positions:
        raise ConfigError(
            f"--seq-len {s.seq_len} is longer than the model allows ({max_positions} positions)"
        )
    if not 1 <= s.query_tokens <= s.seq_len:
        raise ConfigError(
            f"--query-tokens must be between 1 and --seq-len {s.seq_len}; got {s.query_tokens}"
        )
    if s.group_size is not None and s.group_size < 1:
        raise ConfigError(f"--group-size must be positive; got {s.group_size}")
    if s.block_size < 1 or s.sink_tokens < 0 or s.residual_length < 0:
        raise ConfigError("--block-size must be positive, --sink-tokens and --residual-length >= 0")
    if s.quant_scheme.held(s.seq_len).quantized == 0:
        raise ConfigError(
            f"--seq-len {s.seq_len} leaves nothing to quantize (sinks {s.sink_tokens}, residual "
            f"{s.residual_length}, block {s.block_size}): use a longer --seq-len"
        )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks; no scipy needed)."""
    x, y = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    return float(x.rank().corr(y.rank()))


# -- the run ----------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """The sensitivity table, its metadata and, with end-to-end, the single-layer KL table."""

    table: pd.DataFrame
    metadata: dict[str, Any]
    end_to_end: pd.DataFrame | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def calibrate(
    model: Any,
    samples: torch.Tensor,
    settings: CalibrationSettings,
    *,
    model_name: str,
    progress: bool = True,
) -> CalibrationResult:
    """Capture, then the per-layer per-pair error table; plus single-layer KL when `end_to_end`."""
    import transformers

    from kvtuner import __version__

    check_settings(settings, model.config)
    s = settings.resolved()
    if tuple(samples.shape) != (s.samples, s.seq_len):
        raise ValueError(
            f"samples are {tuple(samples.shape)}, settings say ({s.samples}, {s.seq_len})"
        )
    scheme = s.quant_scheme
    pairs = s.pairs
    started = time.perf_counter()
    captures = capture_layers(model, samples, query_tokens=s.query_tokens, progress=progress)
    seconds = {"capture": time.perf_counter() - started}
    mark = time.perf_counter()
    table = sensitivity_table(captures, pairs, scheme, progress=progress)
    seconds["sensitivity"] = time.perf_counter() - mark
    del captures
    parameter = next(model.parameters())
    metadata: dict[str, Any] = {
        "model": model_name,
        "num_layers": int(text_config(model.config).num_hidden_layers),
        "scheme": s.scheme,
        "group_size": s.group_size,
        "block_size": s.block_size,
        "residual_length": s.residual_length,
        "sink_tokens": s.sink_tokens,
        "bits": list(s.bits),
        "pairs": [p.name for p in pairs],
        "text": s.text or "pydoc_data.topics",
        "samples": s.samples,
        "seq_len": s.seq_len,
        "query_tokens": s.query_tokens,
        "seed": s.seed,
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
    }
    end_to_end = None
    if s.end_to_end:
        mark = time.perf_counter()
        low = PrecisionPair(min(s.bits), min(s.bits))
        kl = single_layer_kl(
            model, samples, low, scheme, query_tokens=s.query_tokens, progress=progress
        )
        seconds["end_to_end"] = time.perf_counter() - mark
        rows = table[(table.key_bits == low.key_bits) & (table.value_bits == low.value_bits)]
        end_to_end = pd.DataFrame(
            {
                "layer": rows.layer.to_numpy(),
                "key_bits": low.key_bits,
                "value_bits": low.value_bits,
                "e_o": rows.e_o.to_numpy(),
                "kl": kl,
            }
        )
        metadata["end_to_end"] = {
            "pair": low.name,
            "spearman_e_o_kl": round(spearman(end_to_end.e_o, kl), 4),
        }
    seconds["total"] = time.perf_counter() - started
    metadata["seconds"] = round(seconds["total"], 1)
    metadata["timings"] = {k: round(v, 1) for k, v in seconds.items()}
    metadata["versions"] = {
        "kvtuner": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }
    return CalibrationResult(table, metadata, end_to_end, seconds)


# -- files ------------------------------------------------------------------------------------


def output_folder(out: str | Path, model_name: str, scheme: str) -> Path:
    """`<out>/<model>/<scheme>`."""
    return Path(out) / model_name / scheme


def write_outputs(result: CalibrationResult, folder: str | Path) -> dict[str, Path]:
    """Write sensitivity.csv, heatmap.png, metadata.yaml (+ end_to_end.csv); all or none renamed in."""
    folder = Path(folder)
    paths = {
        "sensitivity": folder / "sensitivity.csv",
        "heatmap": folder / "heatmap.png",
        "metadata": folder / "metadata.yaml",
    }
    if result.end_to_end is not None:
        paths["end_to_end"] = folder / "end_to_end.csv"
    # every file goes to a temporary name first; the renames happen only once all were written
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in paths.items()}
        result.table.to_csv(tmp["sensitivity"], index=False, float_format="%.6g")
        plot_heatmap(
            result.table,
            tmp["heatmap"],
            title=f"{result.metadata['model']} {result.metadata['scheme']}",
        )
        tmp["metadata"].write_text(yaml.safe_dump(result.metadata, sort_keys=False))
        if result.end_to_end is not None:
            result.end_to_end.to_csv(tmp["end_to_end"], index=False, float_format="%.6g")
    return paths


def load_sensitivity(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read sensitivity.csv and the metadata.yaml beside it; ConfigError on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sensitivity file not found (run `kvtuner calibrate` first)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.empty or table[list(COLUMNS)].isna().any().any():
        raise ConfigError(f"{path}: empty table or empty cells")
    meta_path = path.with_name("metadata.yaml")
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path}: metadata file not found next to {path.name}")
    try:
        metadata = yaml.safe_load(meta_path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{meta_path}: not valid YAML") from None
    if not isinstance(metadata, dict) or "model" not in metadata or "num_layers" not in metadata:
        raise ConfigError(f"{meta_path}: needs the fields 'model' and 'num_layers'")
    layers = sorted(int(x) for x in table.layer.unique())
    if layers != list(range(int(metadata["num_layers"]))):
        raise ConfigError(
            f"{path}: layers {layers[0]}..{layers[-1]} ({len(layers)}) do not match num_layers "
            f"{metadata['num_layers']} in {meta_path.name}"
        )
    table = table.astype(
        {"layer": int, "key_bits": int, "value_bits": int, "equivalent_bits": float}
    )
    return table, metadata
