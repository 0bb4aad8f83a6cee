"""`kvtuner eval --task passkey`: pass-key retrieval accuracy per context, beside the dense cache's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from kvtuner.cli.common import emit_json, info, quiet_progress
from kvtuner.errors import ConfigError


def parse_numbers(option: str, text: str, kind: type = int) -> list:
    """`"4096,8000"` -> [4096, 8000]; ConfigError naming `option` for anything else."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(kind(part))
        except ValueError:
            raise ConfigError(
                f"{option}: '{part}' is not a{'n integer' if kind is int else ' number'}"
            ) from None
    if not values:
        raise ConfigError(f"{option}: give at least one value")
    return values


def check_positions(model: str, contexts: list[int], answer_tokens: int) -> None:
    """ConfigError if the longest prompt and its answer exceed the model's positions."""
    from kvtuner.models import load_model_config, text_config

    config = load_model_config(model)
    positions = getattr(text_config(config), "max_position_embeddings", None)
    longest = max(contexts)
    if positions and longest + answer_tokens > positions:
        raise ConfigError(
            f"--contexts: {longest} tokens + {answer_tokens} answer tokens exceed the model's "
            f"{positions} positions"
        )


def run(
    *,
    model: str,
    config: str,
    scheme: str | None,
    text: Path | None,
    contexts: str | None,
    depths: str | None,
    samples: int | None,
    max_new_tokens: int | None,
    seed: int,
    device: str,
    dtype: str | None,
    quantize_prefill: bool,
    plot: Path | None,
    json: bool,
) -> None:
    """Parse and check everything, load the model, run dense then `config`, print or emit JSON."""
    from kvtuner.cache import quantized_cache
    from kvtuner.config import load_config, load_config_without_model
    from kvtuner.data import heldout_text
    from kvtuner.models import load_model
    from kvtuner.tasks import passkey

    context_list = parse_numbers(
        "--contexts", contexts or ",".join(map(str, passkey.CONTEXTS)), int
    )
    depth_list = parse_numbers("--depths", depths or ",".join(map(str, passkey.DEPTHS)), float)
    samples = samples or passkey.SAMPLES
    answer_tokens = max_new_tokens or passkey.ANSWER_TOKENS
    passkey.check_grid(context_list, depth_list, samples)
    early = load_config_without_model(config, scheme=scheme)
    filler = heldout_text(text)
    check_positions(model, context_list, answer_tokens)
    info(f"loading {model} ...", json)
    with quiet_progress(json):
        loaded = load_model(model, device=device, dtype=dtype)
    cfg = load_config(early or config, num_layers=loaded.num_layers, scheme=scheme)
    result = passkey.run_passkey(
        loaded.model,
        loaded.tokenizer,
        lambda: quantized_cache(loaded.model, cfg, quantize_prefill=quantize_prefill),
        context_list,
        depth_list,
        samples,
        seed=seed,
        text=filler,
        max_new_tokens=answer_tokens,
        progress=not json,
    )
    summary = summarize(result, loaded.name, str(config), cfg, samples, seed, text)
    summary["quantize_prefill"] = quantize_prefill
    if plot is not None:
        from kvtuner.tasks.passkey_plot import plot_passkey

        summary["plot"] = str(
            plot_passkey(
                result.grid(), plot, label=str(config), title=f"{loaded.name}: pass-key retrieval"
            )
        )
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))


def summarize(
    result: Any, model: str, config: str, cfg: Any, samples: int, seed: int, text: Path | None
) -> dict[str, Any]:
    """The JSON object of a pass-key run."""
    from kvtuner.tasks import passkey

    grid = result.grid()
    lost, lost_se = result.logprob_lost()
    return {
        "task": "passkey",
        "model": model,
        "config": config,
        "scheme": cfg.scheme,
        "equivalent_bits": cfg.equivalent_bits,
        "contexts": sorted(int(c) for c in grid["context"].unique()),
        "depths": sorted(float(d) for d in grid["depth"].unique()),
        "samples": samples,
        "seed": seed,
        "prompt_version": passkey.PROMPT_VERSION,
        "text": str(text) if text is not None else "heldout",
        "accuracy": result.accuracy("quantized"),
        "dense_accuracy": result.accuracy("dense"),
        "key_logprob_lost": lost,
        "key_logprob_lost_se": _number(lost_se),
        "per_context": [
            {**row, "key_logprob_lost_se": _number(row["key_logprob_lost_se"])}
            for row in result.by_context().to_dict(orient="records")
        ],
        "cells": grid.to_dict(orient="records"),
    }


def _number(value: float) -> float | None:
    """`value`, or None for NaN (a standard error of one trial): JSON has no NaN."""
    return None if math.isnan(value) else value


def render(summary: dict[str, Any]) -> str:
    """Accuracy per context, the config's beside dense's, and the key's log-probability lost."""
    from kvtuner.tasks.passkey import loss_text

    config = summary["config"]
    column = Path(config).name  # a config file's name, not its whole path, heads the column
    depths = ",".join(f"{d:g}" for d in summary["depths"])
    width = max(len(column), 8)
    lines = [
        f"{summary['model']}  {config}  ({summary['scheme']})  pass-key retrieval",
        f"{summary['samples']} prompt(s) per context and depth; depths {depths}%",
        f"{'context':>8}  {'dense':>8}  {column:>{width}}  {'key nats lost':>15}",
    ]
    rows = [*summary["per_context"], {"context": "all", **summary}]
    for row in rows:
        lost = loss_text(row["key_logprob_lost"], row["key_logprob_lost_se"])
        lines.append(
            f"{row['context']:>8}  {row['dense_accuracy']:>8.3f}  {row['accuracy']:>{width}.3f}"
            f"  {lost:>15}"
        )
    lines.append(
        f"key nats lost: log p(key | prompt) with dense minus with {column}, mean ± s.e. over "
        "the same prompts (how much surer dense is of the key)"
    )
    if "plot" in summary:
        lines.append(f"heatmap  {summary['plot']}")
    return "\n".join(lines)
