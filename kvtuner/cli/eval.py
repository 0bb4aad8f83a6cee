"""`kvtuner eval`: KL to full precision and perplexity of a config on held-out text (optionally accuracy).

`--task passkey` (pass-key retrieval) and `--task humaneval` (HumanEval pass@1) measure what users
judge a cache by, each beside the dense cache in the same command (kvtuner/cli/eval_passkey.py,
kvtuner/cli/eval_humaneval.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    ChunkOption,
    ConfigOption,
    ContinuationOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    QuantizePrefillOption,
    SeedOption,
    emit_json,
    info,
)

TASKS = ("kl", "passkey", "humaneval")
TASK_OPTIONS = {  # options only some tasks read: given to another, they are an error
    "--contexts": ("passkey",),
    "--depths": ("passkey",),
    "--plot": ("passkey",),
    "--limit": ("humaneval",),
    "--timeout": ("humaneval",),
    "--batch-size": ("humaneval",),
    "--samples": ("kl", "passkey"),
    "--context": ("kl",),
    "--tasks": ("kl",),
}


@app.command(name="eval")
def eval_command(
    model: ModelOption = DEFAULT_MODEL,
    config: ConfigOption = "KV8",
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", help="per-token or kivi (for specs and presets without one)."),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="Evaluation text (kl) or pass-key filler (passkey): plain text or JSONL with "
            "'text' (default: shipped held-out text).",
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="kl (KL and perplexity on held-out text), passkey (pass-key retrieval) or "
            "humaneval (HumanEval pass@1); passkey and humaneval run the dense cache too.",
        ),
    ] = "kl",
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            min=1,
            help="Text samples (kl, default 8) or prompts per context and depth (passkey, default 2).",
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            min=2,
            help="Tokens of quantized history before the scored ones (default 512, or twice the "
            "widest sliding window so that windows are full: 1024 on Gemma 3).",
        ),
    ] = None,
    continuation: ContinuationOption = defaults.EVAL_CONTINUATION,
    chunk: ChunkOption = defaults.EVAL_CHUNK,
    tasks: Annotated[
        Path | None,
        typer.Option(
            "--tasks",
            help="Also exact-match accuracy on a JSONL of {question, answer} (GSM8K style).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Answer length: --tasks accuracy (default 256), passkey (10), humaneval (384).",
        ),
    ] = None,
    contexts: Annotated[
        str | None,
        typer.Option(
            "--contexts",
            help="passkey: prompt lengths in tokens, comma-separated (default 1024,4096).",
        ),
    ] = None,
    depths: Annotated[
        str | None,
        typer.Option(
            "--depths",
            help="passkey: depths of the key in percent, comma-separated (default 0,25,50,75,100).",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="passkey: write the context x depth accuracy heatmap here."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="humaneval: the first N problems (default all 164)."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="humaneval: seconds each program may run (default 10)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="humaneval: prompts decoded together (default 8; compare configs at one size).",
        ),
    ] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    quantize_prefill: QuantizePrefillOption = defaults.QUANTIZE_PREFILL,
    json: JsonOption = False,
) -> None:
    """Quality of a precision config with the real quantized cache, against full precision."""
    check_task(
        task,
        {
            "--contexts": contexts,
            "--depths": depths,
            "--plot": plot,
            "--limit": limit,
            "--timeout": timeout,
            "--batch-size": batch_size,
            "--samples": samples,
            "--context": context,
            "--tasks": tasks,
        },
    )
    if task == "passkey":
        from kvtuner.cli import eval_passkey

        eval_passkey.run(
            model=model,
            config=config,
            scheme=scheme,
            text=text,
            contexts=contexts,
            depths=depths,
            samples=samples,
            max_new_tokens=max_new_tokens,
            seed=seed,
            device=device,
            dtype=dtype,
            quantize_prefill=quantize_prefill,
            plot=plot,
            json=json,
        )
        return
    if task == "humaneval":
        from kvtuner.cli import eval_humaneval
        from kvtuner.tasks.sandbox import TIMEOUT

        eval_humaneval.run(
            model=model,
            config=config,
            scheme=scheme,
            limit=limit,
            max_new_tokens=max_new_tokens,
            timeout=TIMEOUT if timeout is None else timeout,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            quantize_prefill=quantize_prefill,
            json=json,
        )
        return
    samples = samples or defaults.EVAL_SAMPLES
    max_new_tokens = max_new_tokens or 256
    from kvtuner.engines.export import is_engine_config

    if is_engine_config(config):
        from kvtuner.cli.targets import eval_engine

        eval_engine(
            model=model,
            config=config,
            text=text,
            samples=samples,
            context=context,
            continuation=continuation,
            chunk=chunk,
            seed=seed,
            device=device,
            dtype=dtype,
            json=json,
        )
        return
    from kvtuner.config import load_config, load_config_without_model
    from kvtuner.data import heldout_text
    from kvtuner.defaults import BUDGET_CONTEXT as EFFECTIVE_BITS_CONTEXT
    from kvtuner.evaluate import (
        EvalProtocol,
        Evaluator,
        accuracy,
        eval_samples,
        load_tasks,
        protocol_for,
    )
    from kvtuner.models import load_model

    EvalProtocol(context or defaults.EVAL_CONTEXT, continuation, chunk)  # bad values fail now
    early = load_config_without_model(
        config, scheme=scheme
    )  # a bad config fails before the model load
    long = (context or 0) > defaults.LONG_CONTEXT  # long contexts need the long held-out text
    corpus = heldout_text(text, long=long)
    task_list = load_tasks(tasks) if tasks is not None else None
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    cfg = load_config(early or config, num_layers=loaded.num_layers, scheme=scheme)
    protocol = EvalProtocol(
        context or protocol_for(loaded.model.config).context, continuation, chunk
    )
    tokens = eval_samples(loaded.tokenizer, corpus, samples, protocol, seed=seed)
    result = Evaluator(loaded.model, tokens, protocol, progress=not json).evaluate(
        cfg, quantize_prefill=quantize_prefill
    )
    from kvtuner.compat import model_shape

    shape = model_shape(loaded.model.config)
    summary: dict[str, Any] = {
        "model": loaded.name,
        "config": str(config),
        "scheme": cfg.scheme,
        "kl": result.kl,
        "kl_stderr": result.kl_stderr,
        "ppl": result.ppl,
        "reference_ppl": result.reference_ppl,
        "equivalent_bits": cfg.equivalent_bits,
        "effective_bits": cfg.effective_bits(shape, EFFECTIVE_BITS_CONTEXT),
        "effective_bits_context": EFFECTIVE_BITS_CONTEXT,
        "tokens": result.tokens,
        "samples": samples,
        "context": protocol.context,
        "continuation": continuation,
        "per_sample_kl": list(result.per_sample_kl),
        "quantize_prefill": quantize_prefill,
        "text": str(text) if text is not None else ("heldout-long" if long else "heldout"),
    }
    if task_list is not None:
        scored = accuracy(
            loaded.model,
            loaded.tokenizer,
            cfg,
            task_list,
            max_new_tokens=max_new_tokens,
            progress=not json,
        )
        summary.update(accuracy=scored.accuracy, correct=scored.correct, tasks=scored.total)
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))


def check_task(task: str, given: dict[str, Any]) -> None:
    """ConfigError for an unknown task, or an option another task reads (`given`: option -> value)."""
    from kvtuner.errors import ConfigError

    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got '{task}'")
    for option, value in given.items():
        if value is not None and task not in TASK_OPTIONS[option]:
            tasks = " and ".join(TASK_OPTIONS[option])
            raise ConfigError(f"{option} applies to --task {tasks} only; got --task {task}")


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['model']}  {summary['config']}  ({summary['scheme']})",
        f"equivalent bits  {summary['equivalent_bits']:.3f}   effective bits {summary['effective_bits']:.3f}"
        f" (at {summary['effective_bits_context']} tokens)",
        f"KL(fp || quant)  {summary['kl']:.4f} ± {summary['kl_stderr']:.4f} nats/token",
        f"perplexity       {summary['ppl']:.3f}   (full precision {summary['reference_ppl']:.3f})",
        f"scored tokens    {summary['tokens']}  ({summary['samples']} samples, {summary['context']} context"
        f" + {summary['continuation']} scored)",
    ]
    if "accuracy" in summary:
        lines.append(
            f"accuracy         {summary['accuracy']:.3f}  ({summary['correct']}/{summary['tasks']})"
        )
    return "\n".join(lines)
