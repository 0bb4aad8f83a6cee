"""`kvtuner eval --task humaneval`: pass@1 of greedy completions with the config's cache and with
the dense one on the same problems, and their paired difference."""

from __future__ import annotations

from typing import Any

import typer

from kvtuner.cli.common import emit_json, info, quiet_progress


def run(
    *,
    model: str,
    config: str,
    scheme: str | None,
    limit: int | None,
    max_new_tokens: int | None,
    timeout: float,
    batch_size: int | None,
    device: str,
    dtype: str | None,
    quantize_prefill: bool,
    json: bool,
) -> None:
    """Load the problems and the model, complete and check each problem twice, print or emit JSON."""
    from kvtuner.cache import quantized_cache
    from kvtuner.config import load_config, load_config_without_model
    from kvtuner.errors import ConfigError
    from kvtuner.models import load_model
    from kvtuner.tasks import humaneval

    if timeout <= 0:
        raise ConfigError(f"--timeout must be positive; got {timeout:g}")
    problems = humaneval.load_problems(limit)
    early = load_config_without_model(config, scheme=scheme)
    info(f"loading {model} ...", json)
    with quiet_progress(json):
        loaded = load_model(model, device=device, dtype=dtype)
    cfg = load_config(early or config, num_layers=loaded.num_layers, scheme=scheme)
    settings = dict(
        max_new_tokens=max_new_tokens or humaneval.MAX_NEW_TOKENS,
        timeout=timeout,
        batch_size=batch_size or humaneval.BATCH_SIZE,
        progress=not json,
    )
    dense = humaneval.run_humaneval(
        loaded.model, loaded.tokenizer, problems, None, label="humaneval (dense)", **settings
    )
    quantized = humaneval.run_humaneval(
        loaded.model,
        loaded.tokenizer,
        problems,
        lambda: quantized_cache(loaded.model, cfg, quantize_prefill=quantize_prefill),
        label=f"humaneval ({config})",
        **settings,
    )
    paired = humaneval.paired_summary(quantized, dense)
    summary: dict[str, Any] = {
        "task": "humaneval",
        "model": loaded.name,
        "config": str(config),
        "scheme": cfg.scheme,
        "equivalent_bits": cfg.equivalent_bits,
        **{k: v for k, v in paired.items() if k != "per_problem"},
        "max_new_tokens": settings["max_new_tokens"],
        "timeout": timeout,
        "batch_size": settings["batch_size"],
        "quantize_prefill": quantize_prefill,
        "per_problem": paired["per_problem"],
    }
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))


def render(summary: dict[str, Any]) -> str:
    """pass@1 of both caches and the paired difference."""
    return "\n".join(
        [
            f"{summary['model']}  {summary['config']}  ({summary['scheme']})  HumanEval, "
            f"{summary['problems']} problems, greedy",
            f"pass@1  {summary['config']} {summary['pass_at_1']:.3f}   dense "
            f"{summary['dense_pass_at_1']:.3f}",
            f"paired difference  {summary['difference']:+.3f} ± {summary['difference_stderr']:.3f}"
            " (standard error)",
        ]
    )
