"""A GPU check of the fused decode path, in under 5 minutes, for when a CUDA device is at hand.

1. Token equality: on SmolLM2-135M and Qwen2.5-Coder-0.5B (bfloat16 on CUDA), the first 32 greedy
   tokens of the fused path (attention on the packed codes; Triton kernels past 1024 tokens) equal
   those of the dequantize-then-attend path, both schemes, KV4 and K4V2, at a short prompt and at
   2048 tokens of context (compiled kernels).
2. The bench: `kvtuner bench --device cuda` of KV4 at 4096 and 16384 tokens on Qwen2.5-Coder-0.5B.

    python scripts/gpu_check.py [--out gpu_check.json]

Prints one line per check and writes everything as JSON; exits 1 if a token check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import kvtuner
from kvtuner.bench import context_ids, run_bench
from kvtuner.compat import with_cache
from kvtuner.config import load_config
from kvtuner.models import load_model


def greedy(model, ids, cache, tokens: int = 32) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def token_checks(name: str, device: str) -> list[dict]:
    loaded = load_model(name, device=device)
    model, rows = loaded.model, []
    prompts = {
        "short": loaded.tokenizer("The history of", return_tensors="pt")["input_ids"].to(device),
        "2048": context_ids(loaded.tokenizer, 2048, device),
    }
    for scheme in ("per-token", "kivi"):
        for spec in ("KV4", "K4V2"):
            for label, ids in prompts.items():
                start = time.perf_counter()
                fused = greedy(model, ids, kvtuner.quantized_cache(model, spec, scheme=scheme))
                plain = greedy(model, ids, kvtuner.quantized_cache(model, spec, scheme=scheme,
                                                                   fused_attention=False))  # fmt: skip
                row = dict(model=name, scheme=scheme, config=spec, prompt=label,
                           same=fused == plain, agree=sum(a == b for a, b in zip(fused, plain)) / 32,
                           seconds=round(time.perf_counter() - start, 1))  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    result["tokens"] = token_checks("smollm2-135m", args.device) + token_checks(
        "qwen2.5-coder-0.5b", args.device
    )
    loaded = load_model("qwen2.5-coder-0.5b", device=args.device)
    config = load_config("KV4", num_layers=loaded.model.config.num_hidden_layers)
    result["bench"] = []
    for context in (4096, 16384):
        bench = run_bench(loaded.model, loaded.tokenizer, config, context=context, new_tokens=64,
                          rounds=3, peer_bits=None)  # fmt: skip
        bench.pop("rows")
        print(json.dumps({k: bench[k] for k in ("context", "speed_ratio", "tokens_per_s",
              "dense_tokens_per_s", "kv_bytes", "dense_kv_bytes", "decode_level_memory_bytes",
              "dense_decode_level_memory_bytes")}), flush=True)  # fmt: skip
        result["bench"].append(bench)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(row["same"] for row in result["tokens"]) else 1


if __name__ == "__main__":
    sys.exit(main())
