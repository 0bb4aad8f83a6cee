"""Calibration: how sensitive each layer's keys and values are, measured two ways.

1. e_o (cheap, the paper's): capture each layer's Q/K/V inside attention (`kvtuner.capture`) and
   measure the relative attention-output error of every candidate pair (`kvtuner.sensitivity`).
2. Single-layer KL (end to end, `kvtuner.layer_kl`): for every layer and every pair that survives
   Pareto pruning by e_o, the KL of the model's next-token distribution when only that layer is
   quantized, with the real cache, on calibration-side text (never the held-out text). Then the
   additivity check: the joint KL of random configs against the sum of their layers' KLs.

Outputs, in `<out>/<model>/<scheme>/`: sensitivity.csv (layer, key_bits, value_bits,
equivalent_bits, e_o, e_k, e_v), heatmap.png, metadata.yaml and, with the single-layer KL,
layer_kl.csv (layer, key_bits, value_bits, equivalent_bits, kl, kl_stderr, per_sample_kl),
layer_kl.png and additivity.csv.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from kvtuner import defaults
from kvtuner.capture import capture_layers
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
    group_size: Any = defaults.SCHEME_DEFAULT  # int, or None for one group per head
    residual_length: int | None = None
    block_size: int = defaults.KIVI_BLOCK_SIZE
    sink_tokens: int = defaults.SINK_TOKENS
    smooth: Any = defaults.SCHEME_DEFAULT
    seed: int = 0
    text: str | None = None
    layer_kl: bool = True
    layer_kl_samples: int = defaults.LAYER_KL_SAMPLES
    layer_kl_context: int | None = None  # None: defaults.eval_context(the model's windows)
    layer_kl_continuation: int = defaults.LAYER_KL_CONTINUATION
    additivity: int = defaults.ADDITIVITY_CONFIGS

    def resolved(self) -> CalibrationSettings:
        """Fill the scheme's defaults: group size, smoothing, residual (KIVI 32, per-token none)."""
        s = self
        if s.group_size is defaults.SCHEME_DEFAULT:
            s = replace(s, group_size=defaults.group_size(s.scheme))
        if s.smooth is defaults.SCHEME_DEFAULT:
            s = replace(s, smooth=defaults.smooth(s.scheme))
        if s.scheme != "kivi":
            return replace(s, residual_length=0)
        if s.residual_length is None:
            return replace(s, residual_length=defaults.KIVI_RESIDUAL_LENGTH)
        return s

    @property
    def pairs(self) -> tuple[PrecisionPair, ...]:
        return candidate_pairs(self.bits)

    @property
    def layout(self) -> Layout:
        s = self.resolved()
        return Layout(
            s.scheme, s.group_size, s.block_size, s.residual_length, s.sink_tokens, s.smooth
        )

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


def layer_kl_context(settings: CalibrationSettings, model_config: Any) -> int:
    """Context tokens of the single-layer KL samples (long enough to fill sliding windows)."""
    from kvtuner.compat import sliding_windows

    return settings.layer_kl_context or defaults.eval_context(sliding_windows(model_config))


def layer_kl_samples(
    tokenizer: Any, text: str, settings: CalibrationSettings, model_config: Any
) -> torch.Tensor:
    """The single-layer KL samples `[n, context + continuation]`: calibration windows 0..n-1."""
    from kvtuner.data import calibration_windows

    context = layer_kl_context(settings, model_config)
    windows = calibration_windows(
        tokenizer, text, context, skip=0, count=settings.layer_kl_samples, seed=settings.seed
    )
    return windows[:, : context + settings.layer_kl_continuation]


# -- the run ----------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """The e_o table, the single-layer KL and additivity tables (when measured), metadata."""

    table: pd.DataFrame
    metadata: dict[str, Any]
    layer_kl: pd.DataFrame | None = None
    additivity: pd.DataFrame | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def calibrate(
    model: Any,
    samples: torch.Tensor,
    settings: CalibrationSettings,
    *,
    model_name: str,
    layer_samples: torch.Tensor | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """e_o of every layer and pair on `samples` `[n, seq_len]`; with `layer_samples`
    `[m, context + continuation]` (see `layer_kl_samples`), also the single-layer KL of every pair
    that survives Pareto pruning by e_o, and the additivity check."""
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
    num_layers = int(text_config(model.config).num_hidden_layers)
    metadata: dict[str, Any] = {
        "model": model_name,
        "num_layers": num_layers,
        "scheme": s.scheme,
        "group_size": s.group_size,
        "block_size": s.block_size,
        "residual_length": s.residual_length,
        "sink_tokens": s.sink_tokens,
        "smooth": s.smooth,
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
    kl_table = additive = None
    if layer_samples is not None:
        mark = time.perf_counter()
        kl_table, additive, summary = measure_layer_kl(
            model, layer_samples, s, table, num_layers, progress
        )
        seconds["layer_kl"] = time.perf_counter() - mark
        metadata["layer_kl"] = {
            "samples": int(layer_samples.shape[0]),
            "context": int(layer_samples.shape[1]) - s.layer_kl_continuation,
            "continuation": s.layer_kl_continuation,
            "windows": f"calibration windows 0..{layer_samples.shape[0] - 1} (seed {s.seed})",
            **summary,
        }
    seconds["total"] = time.perf_counter() - started
    metadata["seconds"] = round(seconds["total"], 1)
    metadata["timings"] = {k: round(v, 1) for k, v in seconds.items()}
    metadata["versions"] = {
        "kvtuner": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }
    return CalibrationResult(table, metadata, kl_table, additive, seconds)


def measure_layer_kl(
    model: Any,
    layer_samples: torch.Tensor,
    s: CalibrationSettings,
    table: pd.DataFrame,
    num_layers: int,
    progress: bool,
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """Single-layer KL of the e_o-Pareto pairs, the additivity check, and their rank correlations."""
    from kvtuner.config import PrecisionConfig
    from kvtuner.evaluate import EvalProtocol, Evaluator
    from kvtuner.layer_kl import additivity, layer_kl_table, losses, spearman
    from kvtuner.prune import prune_table

    continuation = s.layer_kl_continuation
    context = int(layer_samples.shape[1]) - continuation
    protocol = EvalProtocol(context, continuation, continuation)
    evaluator = Evaluator(model, layer_samples, protocol, progress=progress)
    base = PrecisionConfig.uniform("fp16", num_layers, **asdict(s.layout))
    candidates = prune_table(table)
    kl_table = layer_kl_table(evaluator, base, candidates, progress=progress)
    merged = kl_table.merge(table, on=["layer", "key_bits", "value_bits"])
    within = [
        spearman(rows.e_o, rows.kl)
        for _, rows in merged.groupby(["key_bits", "value_bits"])
        if len(rows) > 2
    ]
    summary: dict[str, Any] = {
        "spearman_e_o_kl": round(spearman(merged.e_o, merged.kl), 4),
        # across layers at one pair: does e_o rank the layers as the KL does?
        "spearman_e_o_kl_across_layers": round(sum(within) / len(within), 4) if within else None,
    }
    additive = None
    if s.additivity > 1:
        additive = additivity(
            evaluator,
            base,
            losses(kl_table, num_layers),
            s.additivity,
            seed=s.seed,
            progress=progress,
        )
        summary["additivity_configs"] = len(additive)
        summary["spearman_summed_joint"] = round(spearman(additive.summed_kl, additive.joint_kl), 4)
        ratio = (additive.joint_kl / additive.summed_kl).mean()
        summary["joint_over_summed"] = round(float(ratio), 3)
    return kl_table, additive, summary


# -- files ------------------------------------------------------------------------------------


def output_folder(out: str | Path, model_name: str, scheme: str) -> Path:
    """`<out>/<model>/<scheme>`."""
    return Path(out) / model_name / scheme


def write_outputs(result: CalibrationResult, folder: str | Path) -> dict[str, Path]:
    """Write sensitivity.csv, heatmap.png, metadata.yaml (+ layer_kl.csv, layer_kl.png,
    additivity.csv); all or none renamed in."""
    folder = Path(folder)
    paths = {
        "sensitivity": folder / "sensitivity.csv",
        "heatmap": folder / "heatmap.png",
        "metadata": folder / "metadata.yaml",
    }
    if result.layer_kl is not None:
        paths["layer_kl"] = folder / "layer_kl.csv"
        paths["layer_kl_heatmap"] = folder / "layer_kl.png"
    if result.additivity is not None:
        paths["additivity"] = folder / "additivity.csv"
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
        title = f"{result.metadata['model']} {result.metadata['scheme']}"
        if result.layer_kl is not None:
            result.layer_kl.to_csv(tmp["layer_kl"], index=False, float_format="%.6g")
            plot_heatmap(result.layer_kl, tmp["layer_kl_heatmap"], title=title, value="kl")
        if result.additivity is not None:
            result.additivity.to_csv(tmp["additivity"], index=False, float_format="%.6g")
    return paths


def load_layer_kl(folder: str | Path, num_layers: int) -> pd.DataFrame | None:
    """layer_kl.csv of a calibration folder (None when it was not measured); ConfigError if malformed."""
    path = Path(folder) / "layer_kl.csv"
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a CSV table ({str(exc).splitlines()[0]})") from None
    needed = ("layer", "key_bits", "value_bits", "kl")
    missing = [c for c in needed if c not in table.columns]
    if missing or table.empty or table[list(needed)].isna().any().any():
        raise ConfigError(f"{path}: needs non-empty columns {', '.join(needed)}")
    layers = sorted(int(x) for x in table.layer.unique())
    if layers != list(range(num_layers)):
        raise ConfigError(f"{path}: has layers {layers[0]}..{layers[-1]}, the model {num_layers}")
    return table.astype({"layer": int, "key_bits": int, "value_bits": int, "kl": float})


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


def base_config(metadata: dict[str, Any]) -> Any:
    """A PrecisionConfig at 16 bits in the layout a calibration measured (from its metadata)."""
    from kvtuner.config import PrecisionConfig

    return PrecisionConfig.uniform(
        "fp16",
        int(metadata["num_layers"]),
        scheme=metadata.get("scheme", defaults.SCHEME),
        group_size=metadata.get("group_size", defaults.SCHEME_DEFAULT),
        block_size=metadata.get("block_size") or defaults.KIVI_BLOCK_SIZE,
        residual_length=metadata.get("residual_length"),
        sink_tokens=metadata.get("sink_tokens", defaults.SINK_TOKENS),
        smooth=metadata.get("smooth", defaults.SCHEME_DEFAULT),
        model=metadata.get("model"),
    )
