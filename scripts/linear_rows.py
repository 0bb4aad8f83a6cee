"""Milliseconds of one float32 linear layer for 1 and 2 input rows, as torch runs it (`F.linear`)
and as a plain `weight @ x.T`: on some CPUs (MKL on the AMD EPYC here) `F.linear` with 2 rows costs
about twice 1 row, so batched decoding gains little there (README, "Known limits").

    python scripts/linear_rows.py [--out-features 151936] [--in-features 896] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def milliseconds(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-features", type=int, default=151936)  # Qwen2.5-0.5B's output layer
    parser.add_argument("--in-features", type=int, default=896)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.out_features, args.in_features)
    print(f"{args.out_features} x {args.in_features}, {args.threads} threads")
    for rows in (1, 2):
        x = torch.randn(rows, args.in_features)
        linear = milliseconds(lambda x=x: F.linear(x, weight))
        matmul = milliseconds(lambda x=x: weight @ x.T)
        print(f"{rows} row(s): F.linear {linear:.1f} ms, weight @ x.T {matmul:.1f} ms")


if __name__ == "__main__":
    main()
