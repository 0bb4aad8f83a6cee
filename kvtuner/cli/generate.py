"""`kvtuner generate`: greedy text from a model whose KV cache follows a precision config."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    QuantizePrefillOption,
    emit_json,
    info,
    quiet_progress,
)
from kvtuner.errors import KVTunerError

MIB = 1024**2


@app.command()
def generate(
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="Text to continue (or, with --chat, to answer).")
    ],
    model: ModelOption = DEFAULT_MODEL,
    config: ConfigOption = "KV8",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")
    ] = 64,
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", help="per-token or kivi (for specs and presets without one)."),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")
    ] = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    quantize_prefill: QuantizePrefillOption = defaults.QUANTIZE_PREFILL,
    json: JsonOption = False,
) -> None:
    """Stream greedy text to stdout, then print the KV memory held against a dense cache to stderr."""
    from kvtuner.compat import with_cache
    from kvtuner.config import load_config, load_config_without_model
    from kvtuner.models import (
        check_device,
        load_model,
        load_model_config,
        resolve_dtype,
        text_config,
    )

    if not prompt.strip():
        raise KVTunerError("--prompt: the prompt is empty; pass some text to continue")
    resolve_dtype(dtype, check_device(device))
    # a bad config (or a layer count that does not fit) fails now, not after the slow model load
    model_config = load_model_config(model, read_gguf=False)
    if model_config is None:  # only a first-time GGUF conversion would tell the layer count
        early = load_config_without_model(config, scheme=scheme)
    else:
        num_layers = int(text_config(model_config).num_hidden_layers)
        early = load_config(config, num_layers=num_layers, scheme=scheme)

    started = time.perf_counter()
    with quiet_progress(json):
        loaded = load_model(model, device=device, dtype=dtype)
    info(
        f"loaded {loaded.name} ({loaded.dtype}, {device}) in {time.perf_counter() - started:.1f} s",
        json,
    )
    precision = load_config(early or config, num_layers=loaded.num_layers, scheme=scheme)
    tokenizer = loaded.tokenizer
    inputs = _encode(tokenizer, prompt, chat).to(loaded.device)
    prompt_tokens = int(inputs["input_ids"].shape[-1])

    from kvtuner.cache import quantized_cache

    cache = quantized_cache(loaded.model, precision, quantize_prefill=quantize_prefill)
    cache.reserve(prompt_tokens + max_new_tokens - 1)  # the last new token is never cached
    streamer = None
    if not json:
        from transformers import TextStreamer

        if not chat:
            sys.stdout.write(prompt)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    started = time.perf_counter()
    output = loaded.model.generate(
        **with_cache(loaded.model, cache, **inputs),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    elapsed = time.perf_counter() - started
    new_ids = output[0, prompt_tokens:]
    result = {
        "text": tokenizer.decode(new_ids, skip_special_tokens=True),
        "model": loaded.name,
        "config": precision.source or precision.name,
        "scheme": precision.scheme,
        "equivalent_bits": precision.equivalent_bits,
        "prompt_tokens": prompt_tokens,
        "new_tokens": int(new_ids.numel()),
        "kv_bytes": cache.nbytes(),  # allocated (reserved for max_new_tokens; EOS may stop early)
        "kv_live_bytes": cache.live_nbytes(),  # the tokens alone
        "dense_kv_bytes": cache.dense_nbytes(),
        "tokens_per_s": new_ids.numel() / elapsed if elapsed > 0 else None,
    }
    result["kv_ratio"] = (
        result["kv_bytes"] / result["dense_kv_bytes"] if result["dense_kv_bytes"] else None
    )
    if json:
        emit_json(result)
        return
    info(memory_line(result))


def _encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """Prompt -> BatchEncoding with input_ids `[1, seq]` and attention_mask."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        raise KVTunerError("--chat: this model's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def memory_line(result: dict[str, Any]) -> str:
    """One line: KV bytes held vs dense, as MiB and a ratio, with the config and decode speed."""
    ratio = f"{result['kv_ratio']:.2f}x" if result["kv_ratio"] is not None else "n/a"
    speed = f", {result['tokens_per_s']:.1f} tokens/s" if result["tokens_per_s"] else ""
    return (
        f"KV cache ({result['config']}, {result['equivalent_bits']:g} equivalent bits, "
        f"{result['prompt_tokens'] + result['new_tokens']} tokens): "
        f"{result['kv_bytes'] / MIB:.3f} MiB held vs {result['dense_kv_bytes'] / MIB:.3f} MiB dense "
        f"({ratio}){speed}"
    )
