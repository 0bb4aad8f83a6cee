"""Check that one shared prompt forward gives every cache the answers it gives alone, on a real model.

For pass-key prompts of `--context` tokens, each cache (dense, KV4, KV2, K2V4 KIVI and the shipped
C4.0 configs of both schemes) answers once by `greedy_text` (its own prefill, `model.generate`) and
once by `greedy_text_per_cache` (one prefill for all); prints the answers, both times, and how many
are identical.

    python scripts/shared_prefill_check.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    import torch

    from kvtuner.cache import quantized_cache
    from kvtuner.models import load_model
    from kvtuner.tasks.generation import greedy_text, greedy_text_per_cache
    from kvtuner.tasks.passkey import make_prompts

    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    specs = [
        ("KV4", "per-token"),
        ("KV2", "per-token"),
        ("K2V4", "kivi"),
        (f"searched_configs/{args.model}/per-token/kvtuner_c4.0.yaml", None),
        (f"searched_configs/{args.model}/kivi/kvtuner_c4.0.yaml", None),
    ]
    factories = [None] + [lambda s=s: quantized_cache(model, s[0], scheme=s[1]) for s in specs]
    same = total = 0
    for prompt in make_prompts(tokenizer, [args.context], [0, 50, 100], 1, seed=3):
        started = time.perf_counter()
        alone = [
            greedy_text(model, tokenizer, prompt.input_ids, f, max_new_tokens=args.new_tokens)
            for f in factories
        ]
        middle = time.perf_counter()
        shared = greedy_text_per_cache(
            model, tokenizer, prompt.input_ids, factories, max_new_tokens=args.new_tokens
        )
        ended = time.perf_counter()
        same += sum(a == b for a, b in zip(alone, shared))
        total += len(alone)
        print(
            f"depth {prompt.depth:g}, key {prompt.key}: {[a[:12] for a in alone]}; "
            f"alone {middle - started:.1f} s, shared {ended - middle:.1f} s",
            flush=True,
        )
    print(f"{args.model}: {same}/{total} answers identical")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
