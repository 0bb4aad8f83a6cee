"""Memory and decode speed of a KVTunerCache against the dense DynamicCache, side by side.

One process, one context: each round prefills the same `context` tokens into every cache kind in
turn and times `new_tokens` greedy decode steps, so both see the same machine state; the tokens/s
reported is the median over rounds. KV bytes are counted from the tensors each cache holds.
Peak memory is the process's high-water mark above its level before each run (RSS on CPU,
allocated bytes on CUDA).
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtuner import defaults
from kvtuner.cache import KVTunerCache
from kvtuner.compat import model_shape, output_cache, with_cache
from kvtuner.config import PrecisionConfig


@dataclass(frozen=True)
class BenchRow:
    """One cache kind's measurements."""

    name: str
    kv_bytes: int
    tokens_per_s: float
    prefill_s: float
    peak_memory_bytes: int
    tokens: list[int]


# -- memory -------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS so the next run's RSS starts from a clean level."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Yield a dict whose "peak" is the high-water mark above the starting level, once the block ends."""
    result = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    _release_freed_memory()
    try:
        start = _rss_bytes()
    except OSError:  # no /proc: not Linux
        yield result
        return
    high = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            high[0] = max(high[0], _rss_bytes())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        high[0] = max(high[0], _rss_bytes())
        result["peak"] = high[0] - start


# -- byte counting ------------------------------------------------------------------------------
def held_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from `obj` (tensors, tensor subclasses, containers, objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if (
            flatten is not None and type(obj) is not torch.Tensor
        ):  # quanto/torchao tensor subclasses
            names, _ = flatten()
            return sum(held_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


def cache_bytes(cache: Any) -> int:
    """Bytes a cache holds: `nbytes()` where it has one, else every tensor of its layers."""
    if isinstance(cache, KVTunerCache):
        return cache.nbytes()
    return held_bytes(cache.layers)


# -- peers --------------------------------------------------------------------------------------
def transformers_quantized_cache(model: Any, bits: int) -> tuple[str, Callable[[], Any]] | None:
    """transformers' own QuantizedCache at `bits`, where a backend is installed and the model is supported."""
    import importlib.util

    from transformers import QuantizedCache

    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq")):
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:
            continue

        def make(backend: str = backend) -> Any:
            return QuantizedCache(backend=backend, config=model.config, nbits=bits)

        try:
            make()
        except (ValueError, ImportError, TypeError):  # e.g. sliding-window models are refused
            return None
        return f"transformers QuantizedCache ({backend}, {bits}-bit)", make
    return None


# -- the measurement ------------------------------------------------------------------------------
@torch.no_grad()
def _decode(
    model: Any, ids: torch.Tensor, cache: Any, new_tokens: int
) -> tuple[float, float, list[int]]:
    """Prefill `ids` into `cache`, then `new_tokens` greedy steps; (prefill seconds, tokens/s, tokens)."""
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    start = time.perf_counter()
    # only the last position's logits, as generate does: the full [context, vocab] would dominate peak memory
    out = model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    sync()
    prefill = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, **with_cache(model, output_cache(out) or cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    sync()
    return prefill, new_tokens / (time.perf_counter() - start), tokens


def context_ids(tokenizer: Any, context: int, device: str | torch.device) -> torch.Tensor:
    """`[1, context]` token ids of real text (the calibration text, repeated if it is short)."""
    from kvtuner.data import calibration_text

    ids = tokenizer(calibration_text()[: context * 12], add_special_tokens=True)["input_ids"]
    while len(ids) < context:
        ids = ids + ids
    return torch.tensor([ids[:context]], dtype=torch.long, device=device)


def run_bench(
    model: Any,
    tokenizer: Any,
    config: PrecisionConfig,
    *,
    context: int = 2048,
    new_tokens: int = 64,
    rounds: int = 3,
    peer_bits: int | None = 4,
    quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the config's cache, the dense cache (and transformers' QuantizedCache) side by side.

    Returns the `kvtuner bench --json` object: kv_bytes, dense_kv_bytes, tokens_per_s,
    dense_tokens_per_s, speed_ratio, memory_ratio, effective_bits, peak memory of each, and rows.
    """
    device = next(model.parameters()).device
    ids = context_ids(tokenizer, context, device)
    kinds: list[tuple[str, Callable[[], Any]]] = [
        (
            f"kvtuner {config.name}",
            lambda: KVTunerCache(config, model.config, quantize_prefill=quantize_prefill),
        ),
        ("dense DynamicCache", lambda: DynamicCache(config=model.config)),
    ]
    if peer_bits:
        peer = transformers_quantized_cache(model, peer_bits)
        if peer is not None:
            kinds.append(peer)
    speeds: dict[str, list[float]] = {name: [] for name, _ in kinds}
    last: dict[str, tuple[int, float, int, list[int]]] = {}
    # one untimed warm-up per kind at full context (kernel compilation, allocator pools),
    # then interleaved rounds
    for _name, make in kinds:
        _decode(model, ids, make(), 2)
    for round_index in range(rounds):
        for name, make in kinds:
            if progress:
                progress(f"round {round_index + 1}/{rounds}: {name}")
            cache = make()
            with peak_memory(device) as peak:
                prefill, speed, tokens = _decode(model, ids, cache, new_tokens)
            speeds[name].append(speed)
            last[name] = (cache_bytes(cache), prefill, peak["peak"], tokens)
            del cache
    rows = [
        BenchRow(
            name,
            last[name][0],
            statistics.median(speeds[name]),
            last[name][1],
            last[name][2],
            last[name][3],
        )
        for name, _ in kinds
    ]
    ours, dense = rows[0], rows[1]
    shape = model_shape(model.config)
    dtype_bits = torch.finfo(next(model.parameters()).dtype).bits
    agree = sum(a == b for a, b in zip(ours.tokens, dense.tokens)) / len(dense.tokens)
    return {
        "model": getattr(model, "name_or_path", None) or type(model).__name__,
        "config": config.name,
        "scheme": config.scheme,
        "context": context,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "kv_bytes": ours.kv_bytes,
        "dense_kv_bytes": dense.kv_bytes,
        "memory_ratio": ours.kv_bytes / dense.kv_bytes,
        "tokens_per_s": ours.tokens_per_s,
        "dense_tokens_per_s": dense.tokens_per_s,
        "speed_ratio": ours.tokens_per_s / dense.tokens_per_s,
        "equivalent_bits": config.equivalent_bits,
        "effective_bits": config.effective_bits(shape, context + new_tokens, dtype_bits),
        "peak_memory_bytes": ours.peak_memory_bytes,
        "dense_peak_memory_bytes": dense.peak_memory_bytes,
        "greedy_agreement": agree,
        "rows": [{k: v for k, v in asdict(r).items() if k != "tokens"} for r in rows],
    }
