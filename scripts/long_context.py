"""The long-context table: held-out KL of dense-relative configs at long contexts, paired.

Per model, context and scheme: uniform KV8 / KV4 / K4V2 and the shipped searched configs at caps
4.0 and 5.0, each scored on the same samples of the long held-out text (`kvtuner.data.heldout_text
(long=True)`: the licence texts, then the Vim user manual; never the calibration text), prefilled
in chunks (`kvtuner.evaluate.PREFILL_CHUNK`), then `--continuation` tokens scored through the
quantized cache. One Evaluator per (model, context): the dense reference is computed once.

    python scripts/long_context.py --model smollm2-135m --contexts 4096,8000 --samples 4
    python scripts/long_context.py --table     # only re-render docs/long-context.md from the JSON

Writes docs/long-context/<model>_<context>.json and docs/long-context.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvtuner.evaluate import stderr

OUT = Path("docs/long-context")
UNIFORM = ("KV8", "KV4", "K4V2")
SHIPPED = ("kvtuner_c4.0.yaml", "kvtuner_c5.0.yaml")
SCHEMES = ("per-token", "kivi")


def measure(model: str, context: int, samples: int, continuation: int) -> dict:
    import torch

    from kvtuner.compat import model_shape
    from kvtuner.config import load_config
    from kvtuner.data import heldout_text
    from kvtuner.defaults import BUDGET_CONTEXT
    from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples
    from kvtuner.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    shape = model_shape(loaded.model.config)
    protocol = EvalProtocol(context, continuation, 32)
    tokens = eval_samples(loaded.tokenizer, heldout_text(long=True), samples, protocol)
    evaluator = Evaluator(loaded.model, tokens, protocol, batch_size=1, progress=True)
    started = time.perf_counter()
    evaluator.reference()
    rows = []
    for scheme in SCHEMES:
        configs = [(spec, spec) for spec in UNIFORM] + [
            (name.removesuffix(".yaml"), str(Path("searched_configs") / model / scheme / name))
            for name in SHIPPED
        ]
        for label, source in configs:
            cfg = load_config(source, num_layers=shape.num_layers, scheme=scheme)
            result = evaluator.evaluate(cfg)
            rows.append(
                {
                    "scheme": scheme,
                    "config": label,
                    "effective_bits": cfg.effective_bits(shape, BUDGET_CONTEXT),
                    "kl": result.kl,
                    "kl_stderr": result.kl_stderr,
                    "per_sample_kl": list(result.per_sample_kl),
                }
            )
            print(
                model,
                context,
                scheme,
                label,
                f"{result.kl:.4f} ± {result.kl_stderr:.4f}",
                flush=True,
            )
    return {
        "model": model,
        "context": context,
        "samples": samples,
        "continuation": continuation,
        "text": "heldout-long",
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | context | scheme | config | effective bits | held-out KL | config - KV4 (paired) |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for result in results:
        by = {(r["scheme"], r["config"]): r for r in result["rows"]}
        for row in result["rows"]:
            kv4 = by.get((row["scheme"], "KV4"))
            diff = ""
            if kv4 is not None and row["config"] != "KV4":
                d = [a - b for a, b in zip(row["per_sample_kl"], kv4["per_sample_kl"])]
                diff = f"{sum(d) / len(d):+.4f} ± {stderr(d):.4f}"
            lines.append(
                f"| {result['model']} | {result['context']} | {row['scheme']} | {row['config']} | "
                f"{row['effective_bits']:.2f} | {row['kl']:.4f} ± {row['kl_stderr']:.4f} | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="4096,8000")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for context in (int(c) for c in args.contexts.split(",")):
            result = measure(args.model, context, args.samples, args.continuation)
            (OUT / f"{args.model}_{context}.json").write_text(json.dumps(result, indent=1) + "\n")
    results = [
        json.loads(p.read_text())
        for p in sorted(OUT.glob("*.json"))
        if not p.name.startswith("study_")
    ]
    samples = sorted({r["samples"] for r in results})
    text = "\n".join(
        [
            "# Long contexts: held-out KL of uniform and shipped configs",
            "",
            "KL(full precision || quantized) in nats per token on the long held-out text "
            "(licence texts then the Vim user manual, never the calibration text): each sample is "
            "`context` tokens prefilled (in chunks of 4096, exactly, as every cache's prompt) then "
            "`continuation` tokens scored through the quantized history, 32 at a time. Configs are "
            f"paired on the same {'/'.join(map(str, samples))} samples; ± one standard error. "
            "Effective bits at 4096 tokens.",
            "",
            "Regenerate: `python scripts/long_context.py --model M --contexts C1,C2 --samples N`.",
            "",
            table(results),
            "",
        ]
    )
    studies = [json.loads(p.read_text()) for p in sorted(OUT.glob("study_*.json"))]
    if studies:
        text += "\n" + study_section(studies)
    Path("docs/long-context.md").write_text(text)


def study_section(studies: list[dict]) -> str:
    """`scripts/context_study.py`'s results: does a calibration at 512 tokens hold at 8k?"""
    lines = [
        "## Does a calibration at a short context hold at a long one?",
        "",
        "From `python scripts/context_study.py` (after `kvtuner calibrate --context 8192 --samples 2 "
        "--additivity 0 --layer-kl-samples 4`): Spearman across layers between the single-layer KL "
        "measured at the shipped calibration's context and at the long one, per (key, value) pair; "
        "then the knapsack's configs from each table at the same caps, scored on the same long "
        "held-out samples (difference = short-calibrated minus long-calibrated, paired; positive: "
        "calibrating at the long context picks better).",
        "",
    ]
    for study in studies:
        pairs = ", ".join(f"{k} {v:.2f}" for k, v in study["spearman_per_pair"].items())
        lines += [
            f"**{study['model']}, {study['scheme']}**, {study['short_context']} vs "
            f"{study['long_context']} tokens: Spearman per pair {pairs}; all rows pooled "
            f"{study['spearman_all']:.2f}. Configs scored at {study['eval_context']} tokens, "
            f"{study['samples']} samples:",
            "",
            "| cap | short-calibrated KL | long-calibrated KL | difference (paired) |",
            "|---:|---:|---:|---:|",
        ]
        for row in study["rows"]:
            lines.append(
                f"| {row['cap']} | {row['short_kl']:.4f} ± {row['short_kl_stderr']:.4f} | "
                f"{row['long_kl']:.4f} ± {row['long_kl_stderr']:.4f} | "
                f"{row['difference']:+.4f} ± {row['difference_stderr']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
