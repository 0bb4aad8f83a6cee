"""Memory and decode speed of a KVTunerCache against the dense DynamicCache, side by side.

One process: for each context, each round prefills the same `context` tokens (`batch` rows) into
every cache kind in turn and times `new_tokens` greedy decode steps, so all see the same machine
state; the tokens/s reported is the median over rounds. KV bytes are counted from the tensors each
cache holds. Memory is the process's high-water mark (RSS sampled every 2 ms on CPU, allocated
bytes on CUDA), per phase.

On the CPU with glibc, memory comes from one more (untimed) run of each kind before the timed
rounds (of every context, when there are several), with glibc's mmap threshold fixed at 128 KiB
(as in the warm-ups before it), so that every large tensor gets its own mapping and goes back to
the OS when freed: RSS then follows live memory. With glibc's default (a threshold that rises to
the largest block freed), freed blocks stay on the heap and the same 8000-token prefill's peak
moved between 386 and 816 MiB from round to round. The timed rounds run with the threshold fixed
at 32 MiB, glibc's ceiling for it: at 128 KiB every new tensor is mapped afresh, which slowed the
dense cache's decoding (a new history tensor per layer and step) by about half in one
measurement. Both settings last for the rest of the process.
Elsewhere (CUDA, other C libraries) memory comes from the last timed round. The phases:

- prefill peak: above the level before the prompt's forward;
- decode peak: above the level right after prefill, while decoding (what decoding itself adds);
- decode level: the decode phase's high-water mark above the level before the prompt (the cache
  held plus what decoding adds): the figure a memory budget must hold.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtuner import defaults, machine
from kvtuner.cache import KVTunerCache
from kvtuner.compat import model_shape, output_cache, with_cache
from kvtuner.config import PrecisionConfig


# -- memory -------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LIVE_MMAP_THRESHOLD = 128 * 1024  # glibc's default start: RSS follows live memory
TIMED_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for the dynamic threshold (64-bit)


def _glibc(function: str, *args: int) -> bool:
    """Call glibc's malloc `function`; False where the C library has none (not glibc)."""
    try:
        return bool(getattr(ctypes.CDLL("libc.so.6"), function)(*args))
    except (OSError, AttributeError):
        return False


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold (allocations of at least `nbytes` get their own mapping, returned
    to the OS when freed); False where the C library has no `mallopt` (not glibc)."""
    return _glibc("mallopt", M_MMAP_THRESHOLD, nbytes)


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS so the next run's RSS starts from a clean level."""
    _glibc("malloc_trim", 0)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Yield a dict whose "peak" is the high-water mark above the starting level, once the block
    ends, and "start" that level (RSS on CPU, allocated bytes on CUDA; 0 where unknown)."""
    result = {"peak": 0, "start": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        result["start"] = start
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
    result["start"] = start
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


WARMUP_CONTEXT = 2048  # tokens of the untimed warm-up run: past COMPILE_FROM, so it compiles


# -- the measurement ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One cache kind, one round: speed, tokens and memory by phase."""

    prefill_s: float
    tokens_per_s: float
    tokens: list[list[int]]
    kv_bytes: int
    prefill_peak: int
    decode_peak: int
    decode_level: int


@torch.no_grad()
def _decode(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int) -> Run:
    """Prefill `ids` into `cache`, then `new_tokens` greedy steps, measuring each phase."""
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    with peak_memory(device) as prefill_peak:
        start = time.perf_counter()
        # only the last position's logits, as generate does: the full [context, vocab] would
        # dominate peak memory
        out = model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - start
    cache = output_cache(out) or cache
    del out
    tokens = [token[:, 0].tolist()]
    with peak_memory(device) as decode_peak:
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, **with_cache(model, cache), use_cache=True)
            cache = output_cache(out) or cache
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token[:, 0].tolist())
        sync()
        elapsed = time.perf_counter() - start
    level = decode_peak["start"] - prefill_peak["start"] + decode_peak["peak"]
    return Run(
        prefill_s=prefill,
        tokens_per_s=new_tokens * ids.shape[0] / elapsed,
        tokens=tokens,
        kv_bytes=cache_bytes(cache),
        prefill_peak=prefill_peak["peak"],
        decode_peak=decode_peak["peak"],
        decode_level=level,
    )


def context_ids(
    tokenizer: Any, context: int, device: str | torch.device, batch: int = 1
) -> torch.Tensor:
    """`[batch, context]` token ids of real text (the calibration text, repeated if it is short);
    row i starts i * 997 tokens further on, so rows differ."""
    from kvtuner.data import calibration_text

    need = context + 997 * (batch - 1)
    ids = tokenizer(calibration_text()[: need * 12], add_special_tokens=True)["input_ids"]
    while len(ids) < need:
        ids = ids + ids
    rows = [ids[997 * i : 997 * i + context] for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def cache_kinds(
    model: Any,
    config: PrecisionConfig,
    *,
    tokens: int,
    peer_bits: int | None,
    quantize_prefill: bool,
) -> list[tuple[str, Callable[[], Any]]]:
    """(name, factory) of each cache kind compared: kvtuner's (its stores reserved for `tokens`),
    the dense DynamicCache, and transformers' QuantizedCache where installed and supported."""
    from kvtuner.cache import quantized_cache

    def ours() -> Any:
        cache = quantized_cache(model, config, quantize_prefill=quantize_prefill)
        cache.reserve(tokens)
        return cache

    kinds: list[tuple[str, Callable[[], Any]]] = [
        (f"kvtuner {config.name}", ours),
        ("dense DynamicCache", lambda: DynamicCache(config=model.config)),
    ]
    if peer_bits:
        peer = transformers_quantized_cache(model, peer_bits)
        if peer is not None:
            kinds.append(peer)
    return kinds


def run_bench(
    model: Any,
    tokenizer: Any,
    config: PrecisionConfig,
    *,
    context: int = 2048,
    new_tokens: int = 64,
    rounds: int = 3,
    batch: int = 1,
    peer_bits: int | None = 4,
    quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the config's cache, the dense cache (and transformers' QuantizedCache) at one context.

    Returns the `kvtuner bench --json` object: kv_bytes, dense_kv_bytes, tokens_per_s,
    dense_tokens_per_s, speed_ratio, memory_ratio, effective_bits, memory by phase of each and
    where it came from (memory_source), the machine (`machine.describe`), rows.
    """
    return run_benches(
        model, tokenizer, config, contexts=[context], new_tokens=new_tokens, rounds=rounds,
        batch=batch, peer_bits=peer_bits, quantize_prefill=quantize_prefill, progress=progress,
    )[0]  # fmt: skip


@dataclass
class _Plan:
    """One context's prompt and the cache kinds measured on it."""

    context: int
    ids: torch.Tensor  # [batch, context]
    kinds: list[tuple[str, Callable[[], Any]]]

    def say(self, progress: Callable[[str], None] | None, what: str) -> None:
        if progress:
            progress(f"context {self.context}{what}")


def run_benches(
    model: Any,
    tokenizer: Any,
    config: PrecisionConfig,
    *,
    contexts: list[int],
    new_tokens: int = 64,
    rounds: int = 3,
    batch: int = 1,
    peer_bits: int | None = 4,
    quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """`run_bench` at each of `contexts`, one result each, in their order.

    On the CPU the warm-ups and memory runs of every context come before any timed round: a memory
    run after another context's timed rounds (in the heap they leave at the 32 MiB threshold) read
    tens of MiB high for both caches.
    """
    device = next(model.parameters()).device
    plans = [
        _Plan(context, context_ids(tokenizer, context, device, batch), cache_kinds(
            model, config, tokens=context + new_tokens, peer_bits=peer_bits,
            quantize_prefill=quantize_prefill,
        ))
        for context in contexts
    ]  # fmt: skip
    live_rss = device.type == "cpu" and set_mmap_threshold(LIVE_MMAP_THRESHOLD)
    memory: list[dict[str, Run]] = []
    for plan in plans:
        _warm_up(model, plan, progress)
        memory.append(_memory_runs(model, plan, new_tokens, progress) if live_rss else {})
    if live_rss:
        set_mmap_threshold(TIMED_MMAP_THRESHOLD)
    results = []
    for plan, runs in zip(plans, memory):
        speeds, last = _timed_rounds(model, plan, new_tokens, rounds, progress)
        source = _memory_source(device, live_rss)
        results.append(
            _result(model, config, plan, new_tokens, rounds, speeds, last, runs or last, source)
        )
    return results


def _warm_up(model: Any, plan: _Plan, progress: Callable[[str], None] | None) -> None:
    """One untimed run per kind (kernel compilation, allocator pools, first-call buffers). The
    compiled graphs do not depend on the context, so at most WARMUP_CONTEXT tokens, except the
    first kind's: the whole context, so that what the process keeps after its first prompt of this
    length (about 60 MiB at Qwen2.5's 16384 tokens) is not charged to the first memory run."""
    for index, (name, make) in enumerate(plan.kinds):
        plan.say(progress, f": warm-up {name}")
        _decode(model, plan.ids if index == 0 else plan.ids[:, :WARMUP_CONTEXT], make(), 2)


def _memory_runs(
    model: Any, plan: _Plan, new_tokens: int, progress: Callable[[str], None] | None
) -> dict[str, Run]:
    """The untimed run of each kind that memory is read from (at the live mmap threshold)."""
    runs = {}
    for name, make in plan.kinds:
        plan.say(progress, f", memory: {name}")
        runs[name] = _decode(model, plan.ids, make(), new_tokens)
    return runs


def _timed_rounds(
    model: Any, plan: _Plan, new_tokens: int, rounds: int, progress: Callable[[str], None] | None
) -> tuple[dict[str, list[float]], dict[str, Run]]:
    """`rounds` rounds of every kind in turn -> (tokens/s of each round, the last round's run)."""
    speeds: dict[str, list[float]] = {name: [] for name, _ in plan.kinds}
    last: dict[str, Run] = {}
    for round_index in range(rounds):
        for name, make in plan.kinds:
            plan.say(progress, f", round {round_index + 1}/{rounds}: {name}")
            cache = make()
            run = _decode(model, plan.ids, cache, new_tokens)
            del cache
            speeds[name].append(run.tokens_per_s)
            last[name] = run
    return speeds, last


def _result(
    model: Any,
    config: PrecisionConfig,
    plan: _Plan,
    new_tokens: int,
    rounds: int,
    speeds: dict[str, list[float]],
    last: dict[str, Run],
    memory: dict[str, Run],
    memory_source: str,
) -> dict[str, Any]:
    """The JSON object of one context: speeds from the timed rounds, bytes and memory from `memory`."""
    kinds, context, batch = plan.kinds, plan.context, plan.ids.shape[0]
    device = next(model.parameters()).device
    rows = [
        _row(name, last[name], memory[name], statistics.median(speeds[name])) for name, _ in kinds
    ]
    ours, dense = memory[kinds[0][0]], memory[kinds[1][0]]
    shape = model_shape(model.config)
    dtype_bits = torch.finfo(next(model.parameters()).dtype).bits
    steps = list(zip(last[kinds[0][0]].tokens, last[kinds[1][0]].tokens))
    agree = sum(a == b for pair in steps for a, b in zip(*pair)) / (len(steps) * batch)
    saved = dense.kv_bytes - ours.kv_bytes
    return {
        "model": getattr(model, "name_or_path", None) or type(model).__name__,
        "config": config.name,
        "scheme": config.scheme,
        "context": context,
        "batch": batch,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "kv_bytes": ours.kv_bytes,
        "dense_kv_bytes": dense.kv_bytes,
        "memory_ratio": ours.kv_bytes / dense.kv_bytes,
        "tokens_per_s": rows[0]["tokens_per_s"],
        "dense_tokens_per_s": rows[1]["tokens_per_s"],
        "speed_ratio": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
        "equivalent_bits": config.equivalent_bits,
        "effective_bits": config.effective_bits(shape, context + new_tokens, dtype_bits),
        "peak_memory_bytes": max(ours.prefill_peak, ours.decode_level),
        "dense_peak_memory_bytes": max(dense.prefill_peak, dense.decode_level),
        "prefill_peak_memory_bytes": ours.prefill_peak,
        "dense_prefill_peak_memory_bytes": dense.prefill_peak,
        "decode_peak_memory_bytes": ours.decode_peak,
        "dense_decode_peak_memory_bytes": dense.decode_peak,
        "decode_level_memory_bytes": ours.decode_level,
        "dense_decode_level_memory_bytes": dense.decode_level,
        # how much of the KV bytes saved the decode phase's memory really saves
        "decode_memory_saved_fraction": (dense.decode_level - ours.decode_level) / saved
        if saved > 0
        else None,
        "greedy_agreement": agree,
        "memory_source": memory_source,
        "machine": machine.describe(device),
        "rows": rows,
    }


def _memory_source(device: torch.device, live_rss: bool) -> str:
    if device.type == "cuda":
        return "CUDA allocated bytes, last timed round"
    if live_rss:
        return "RSS, an untimed run with glibc's mmap threshold at 128 KiB (live memory)"
    return "RSS, last timed round"


def _row(name: str, timed: Run, run: Run, tokens_per_s: float) -> dict[str, Any]:
    """One cache kind's row: speed from the timed rounds, bytes and memory from `run`."""
    return {
        "name": name,
        "kv_bytes": run.kv_bytes,
        "tokens_per_s": tokens_per_s,
        "prefill_s": timed.prefill_s,
        "peak_memory_bytes": max(run.prefill_peak, run.decode_level),
        "prefill_peak_memory_bytes": run.prefill_peak,
        "decode_peak_memory_bytes": run.decode_peak,
        "decode_level_memory_bytes": run.decode_level,
    }


def longest_fit(
    results: list[dict[str, Any]], limit: int, max_positions: int | None
) -> dict[str, Any]:
    """Per cache kind, the longest context (at the measured batch) and the largest batch (at the
    longest measured context) whose memory stays under `limit` bytes.

    Memory at a context is modelled as what the largest measured run held besides its cache plus
    the cache's bytes per token and row: peak(c, b) = other + kv_per_token * c * b, where
    other = max(prefill peak, decode level) - kv_bytes of that run.
    """
    last = max(results, key=lambda r: r["context"])
    batch, context = last["batch"], last["context"]
    fits = {}
    for row in last["rows"]:
        per_token = row["kv_bytes"] / (context + last["new_tokens"]) / batch
        other = row["peak_memory_bytes"] - row["kv_bytes"]
        room = limit - other
        longest = int(room // (per_token * batch)) if room > 0 and per_token else 0
        if max_positions:
            longest = min(longest, max_positions)
        largest = int(room // (per_token * context)) if room > 0 and per_token else 0
        fits[row["name"]] = {"longest_context": longest, "largest_batch": largest}
    return {"memory_limit_bytes": limit, "batch": batch, "context": context, "fits": fits}
