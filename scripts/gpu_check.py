"""A GPU check of the fused decode path: one call of a few minutes on a lent CUDA machine.

On the GPU machine, from the repository root, `bash scripts/gpu_check.sh OUT` runs all of it:

1. tests/attention/test_decode.py with KVTUNER_TEST_DEVICE=cuda: the fused attention against
   dequantize-then-attend on random stores (every bits pair, both schemes, sinks, GQA, a sliding
   window over a left-padded batch, bfloat16), the compiled (Triton) kernels against the eager
   ones, and a decode step under `torch.cuda.set_sync_debug_mode("error")`;
2. this script with `--device cuda`, in bfloat16, on each embedded architecture:
   - paired steps: after a 2048-token prompt (past COMPILE_FROM: the Triton kernels run), 32
     greedy steps of the dequantize-then-attend path; at each step the fused path runs the same
     token on a copy of the cache (as tests/attention/test_embedded_tokens.py does on the CPU),
     both schemes, KV4 and K4V2: the tokens they pick and the largest logit difference;
   - bench: `kvtuner bench`'s measurement (`run_bench`) of KV4, both schemes, against the dense
     cache at the contexts in BENCH.

Weights: the embedded models' own where their packages are installed (`--weights real`). The GPU
machines lent here reach no package registry, so there each architecture gets random weights from
the config that `--prepare` saved (`--weights random`; `auto`, the default, picks). Random weights
decode at the speed of real ones and hold as many KV bytes; the paired steps then compare the two
paths' arithmetic on the same history, not a trained model's choices.

Here, once (writes .gpu/, 17 MB, ignored by git: the configs, SmolLM2's tokenizer, the pinned
transformers wheel; the GPU machines have torch, triton and the rest):
    python scripts/gpu_check.py --prepare
Then one device call: command `bash scripts/gpu_check.sh $OUT`, carry [".gpu"], timeout_s 590
(the tests stop at 230 s, this script at 320 s).
Prints one JSON line per result and rewrites `--out` after each; exits 1 if a paired check fails
or a model could not be checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".gpu"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m")
TOKENIZER_FROM = "smollm2-135m"  # its ids are valid in all three vocabularies
BENCH = {
    "smollm2-135m": (4096, 8000),
    "qwen2.5-coder-0.5b": (4096, 16384),
    "gemma-3-270m": (16384,),
}
PROMPT_TOKENS = 2048
STEPS = 32
MARGIN = 0.5  # logits: where today's path leads by more, the fused path must pick its token
# the two paths' logit difference, root mean square over the vocabulary / the logits' spread
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.01}
# per-token stores quantize the new token at once, and the two paths' keys for it differ by float
# rounding: a 2- or 4-bit code can round the other way (tests/attention/test_embedded_tokens.py),
# which moved SmolLM2's logits by 0.035 of their spread at K4V2 (KIVI holds the new token exact)
PER_TOKEN_TOLERANCE = 0.1


# -- models ---------------------------------------------------------------------------------------
def prepare(folder: Path = PREPARED) -> None:
    """Save each embedded model's config, SmolLM2's tokenizer and the pinned transformers wheel."""
    import transformers

    from kvtuner.models import load_model, load_model_config

    for name in MODELS:
        load_model_config(name).save_pretrained(folder / "configs" / name)
    load_model(TOKENIZER_FROM).tokenizer.save_pretrained(folder / "tokenizer")
    wheel = f"transformers=={transformers.__version__}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "-d", str(folder / "wheels"), wheel],
        check=True,
    )  # fmt: skip
    print(f"wrote {folder}: configs of {', '.join(MODELS)}, a tokenizer, {wheel}")


def load(name: str, device: str, weights: str, dtype: str | None, folder: Path):
    """(model, tokenizer, "real" or "random") in `dtype` (default: bfloat16 on a GPU, float32 on
    the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvtuner.errors import KVTunerError
    from kvtuner.models import load_model

    if weights in ("auto", "real"):
        try:
            loaded = load_model(name, device=device, dtype=dtype)
            return loaded.model, loaded.tokenizer, "real"
        except KVTunerError:
            if weights == "real":
                raise
    from kvtuner.models import resolve_dtype

    config = AutoConfig.from_pretrained(folder / "configs" / name)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    model = model.eval().requires_grad_(False)
    model.name_or_path = f"{name} (random weights)"
    return model, AutoTokenizer.from_pretrained(folder / "tokenizer"), "random"


# -- paired steps -----------------------------------------------------------------------------------
@torch.no_grad()
def paired_steps(model, ids, cache, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per greedy step of the dequantize-then-attend path: (its logits, the fused path's logits
    for the same token on a copy of the cache)."""
    from kvtuner.compat import with_cache

    cache.fused_attention = False
    out = model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    pairs = []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        shadow = copy.deepcopy(cache)
        shadow.fused_attention = True
        fused = model(token, **with_cache(model, shadow), use_cache=True).logits[0, -1].float()
        out = model(token, **with_cache(model, cache), use_cache=True)
        pairs.append((out.logits[0, -1].float(), fused))
    return pairs


def judge(pairs: list[tuple[torch.Tensor, torch.Tensor]], tolerance: float) -> dict:
    """Agreement of the two paths' choices (where today's path leads by more than MARGIN, they
    must agree), and their logit difference relative to the logits' spread: root mean square
    (at most `tolerance`) and largest, each the worst over the steps."""
    agree = clear = clear_agree = 0
    rms = largest = 0.0
    for plain, fused in pairs:
        same = bool(fused.argmax() == plain.argmax())
        top = plain.topk(2).values
        agree += same
        if top[0] - top[1] > MARGIN:
            clear += 1
            clear_agree += same
        spread = plain.std()
        rms = max(rms, ((fused - plain).pow(2).mean().sqrt() / spread).item())
        largest = max(largest, ((fused - plain).abs().max() / spread).item())
    return dict(agree=agree, steps=len(pairs), clear=clear, clear_agree=clear_agree,
                rms_difference=round(rms, 6), largest_difference=round(largest, 5),
                ok=clear_agree == clear and rms <= tolerance)  # fmt: skip


def check_pairs(name, model, tokenizer, weights, device, prompt_tokens, steps) -> Iterator[dict]:
    import kvtuner
    from kvtuner.bench import context_ids

    ids = context_ids(tokenizer, prompt_tokens, device)
    for scheme in ("per-token", "kivi"):
        for spec in ("KV4", "K4V2"):
            start = time.perf_counter()
            cache = kvtuner.quantized_cache(model, spec, scheme=scheme)
            tolerance = LOGIT_TOLERANCE[model.dtype]
            if scheme == "per-token":
                tolerance = max(tolerance, PER_TOKEN_TOLERANCE)
            verdict = judge(paired_steps(model, ids, cache, steps), tolerance)
            row = dict(check="paired", model=name, weights=weights, scheme=scheme, config=spec,
                       prompt=prompt_tokens, **verdict,
                       seconds=round(time.perf_counter() - start, 1))  # fmt: skip
            print(json.dumps(row), flush=True)
            yield row


# -- bench ------------------------------------------------------------------------------------------
BENCH_KEYS = ("context", "speed_ratio", "tokens_per_s", "dense_tokens_per_s", "kv_bytes",
              "dense_kv_bytes", "effective_bits", "prefill_peak_memory_bytes",
              "dense_prefill_peak_memory_bytes", "decode_level_memory_bytes",
              "dense_decode_level_memory_bytes", "decode_memory_saved_fraction",
              "greedy_agreement")  # fmt: skip


def bench(name, model, tokenizer, weights, contexts, new_tokens, rounds) -> Iterator[dict]:
    from kvtuner.bench import run_bench
    from kvtuner.config import load_config
    from kvtuner.models import text_config

    layers = text_config(model).num_hidden_layers
    for scheme in ("per-token", "kivi"):
        config = load_config("KV4", num_layers=layers, scheme=scheme)
        for context in contexts:
            start = time.perf_counter()
            result = run_bench(model, tokenizer, config, context=context, new_tokens=new_tokens,
                               rounds=rounds, peer_bits=None)  # fmt: skip
            row = dict(check="bench", model=name, weights=weights, scheme=scheme, config="KV4",
                       **{k: result[k] for k in BENCH_KEYS},
                       seconds=round(time.perf_counter() - start, 1))  # fmt: skip
            print(json.dumps(row), flush=True)
            yield row


# -- main -------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import transformers

    from kvtuner.attention import native

    env = dict(torch=torch.__version__, transformers=transformers.__version__, device=device,
               native_kernel=native.enabled() and device == "cpu")  # fmt: skip
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="write .gpu/ here, then stop")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--weights", choices=("auto", "real", "random"), default="auto")
    parser.add_argument("--prepared", type=Path, default=PREPARED, help="what --prepare wrote")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--contexts", default=None, help="bench contexts for every model "
                        "(default: BENCH's per model)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepared)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    result = {"environment": environment(args.device), "paired": [], "bench": [], "errors": []}
    print(json.dumps(result["environment"]), flush=True)

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1))

    for name in args.models.split(","):
        try:
            model, tokenizer, weights = load(
                name, args.device, args.weights, args.dtype, args.prepared
            )
            for row in check_pairs(name, model, tokenizer, weights, args.device,
                                   args.prompt_tokens, args.steps):  # fmt: skip
                result["paired"].append(row)
                save()  # a call cut off at its time limit keeps what it measured
            contexts = (tuple(int(c) for c in args.contexts.split(",")) if args.contexts
                        else BENCH.get(name, (args.prompt_tokens,)))  # fmt: skip
            for row in bench(name, model, tokenizer, weights, contexts, args.new_tokens,
                             args.rounds):  # fmt: skip
                result["bench"].append(row)
                save()
        except Exception as error:  # one model's failure must not hide the others' results
            line = f"{name}: {type(error).__name__}: {error}".splitlines()[0]
            print(json.dumps({"error": line}), flush=True)
            result["errors"].append(line)
        finally:
            save()
            model = None
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    failed = [r for r in result["paired"] if not r["ok"]]
    return 1 if failed or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
