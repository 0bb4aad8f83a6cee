"""One layer's decode attention at several bits pairs, in one process: does a 2-bit store decode
faster than a 4-bit one on this CPU?

Builds kvtuner cache layers of one model's shape (default SmolLM2-135M: 9 query heads, 3 KV
heads, head_dim 64) filled with `--tokens` random tokens, then times `decode_attention` (the path
a decode step takes: the C++ kernel on the CPU, unless KVTUNER_NATIVE=0) on each, interleaved
over `--repeats` rounds; prints the median milliseconds per call and the machine.

    python scripts/decode_bits.py                       # SmolLM2's shape at 8000 tokens
    python scripts/decode_bits.py --tokens 16384 --heads 14 --kv-heads 2   # Qwen2.5-Coder-0.5B's
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvtuner import defaults, machine
from kvtuner.attention import decode
from kvtuner.cache import QuantizedKVLayer
from kvtuner.precision import Layout, PrecisionPair

PAIRS = [("KV8", 8, 8, "per-token"), ("KV4", 4, 4, "per-token"), ("K4V2", 4, 2, "per-token"),
         ("KV2", 2, 2, "per-token"), ("KV4 KIVI", 4, 4, "kivi")]  # fmt: skip


def filled_layer(key_bits: int, value_bits: int, scheme: str, kv_heads: int, head_dim: int,
                 tokens: int) -> QuantizedKVLayer:  # fmt: skip
    """A layer holding a `tokens - 1`-token prompt and one decode token, left for the attention."""
    gen = torch.Generator().manual_seed(0)
    residual = defaults.KIVI_RESIDUAL_LENGTH if scheme == "kivi" else 0
    layer = QuantizedKVLayer(
        PrecisionPair(key_bits, value_bits), Layout(scheme=scheme, residual_length=residual)
    )
    for n in (tokens - 1, 1):
        k = torch.randn(1, kv_heads, n, head_dim, generator=gen) * 2
        v = torch.randn(1, kv_heads, n, head_dim, generator=gen)
        layer.fused = n == 1
        layer.update(k, v)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="calls timed together per round")
    args = parser.parse_args()
    query = torch.randn(1, args.heads, 1, args.head_dim)
    scale = args.head_dim**-0.5
    layers = {
        name: filled_layer(kb, vb, scheme, args.kv_heads, args.head_dim, args.tokens)
        for name, kb, vb, scheme in PAIRS
    }
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():  # warm-up (kernel load)
        decode.decode_attention(query, layer, None, scale)
    for _ in range(args.repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                decode.decode_attention(query, layer, None, scale)
            times[name].append((time.perf_counter() - start) / args.calls * 1000)
    print(machine.summary(machine.describe("cpu")))
    print(
        f"{args.tokens} tokens, {args.heads} query / {args.kv_heads} KV heads, head_dim {args.head_dim}"
    )
    for name, values in times.items():
        print(f"  {name:10} {statistics.median(values):7.3f} ms a layer (median of {args.repeats})")


if __name__ == "__main__":
    main()
