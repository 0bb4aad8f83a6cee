"""Does a calibration at a short context hold at a long one? (issue: long-context quality)

1. Spearman across layers, per (key, value) pair, between the single-layer KL measured at the
   shipped calibration's context (512 tokens) and at `--context` (run first:
   `kvtuner calibrate --model M --context 8192 --samples 2 --additivity 0 --out calibration-8192`).
2. The knapsack's configs from each table at the same caps, scored at `--context` tokens on the
   long held-out text (paired, same samples): does the short calibration still pick as well?

    python scripts/context_study.py --model smollm2-135m --context 8192 --long-calibration calibration-8192

Writes docs/long-context/study_<model>_<scheme>_<context>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtuner.evaluate import stderr

CAPS = (3.5, 4.0, 4.5, 5.0, 6.0)


def main() -> None:
    import torch

    from kvtuner.allocate import allocate_configs
    from kvtuner.calibrate import base_config, load_layer_kl, load_sensitivity
    from kvtuner.compat import model_shape
    from kvtuner.data import heldout_text
    from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples
    from kvtuner.layer_kl import losses, spearman
    from kvtuner.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", default="per-token")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--long-calibration", type=Path, default=Path("calibration-8192"))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--continuation", type=int, default=64)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    tables = {}
    for label, root in (("short", Path("calibration")), ("long", args.long_calibration)):
        folder = root / args.model / args.scheme
        _, meta = load_sensitivity(folder / "sensitivity.csv")
        tables[label] = (load_layer_kl(folder, int(meta["num_layers"])), meta)
    short, long = tables["short"][0], tables["long"][0]
    merged = short.merge(long, on=["layer", "key_bits", "value_bits"], suffixes=("_short", "_long"))
    per_pair = {
        f"K{k}V{v}": round(spearman(rows.kl_short, rows.kl_long), 3)
        for (k, v), rows in merged.groupby(["key_bits", "value_bits"])
        if len(rows) > 2
    }
    overall = spearman(merged.kl_short, merged.kl_long)

    loaded = load_model(args.model)
    shape = model_shape(loaded.model.config)
    protocol = EvalProtocol(args.context, args.continuation, 32)
    tokens = eval_samples(loaded.tokenizer, heldout_text(long=True), args.samples, protocol)
    evaluator = Evaluator(loaded.model, tokens, protocol, batch_size=1, progress=True)
    rows = []
    configs = {
        label: allocate_configs(
            losses(table, shape.num_layers), base_config(meta), shape, CAPS, context=4096
        )
        for label, (table, meta) in tables.items()
    }
    for cap in CAPS:
        a, b = configs["short"][cap], configs["long"][cap]
        if a is None or b is None:
            continue
        ra = evaluator.evaluate(a)
        rb = ra if a.layers == b.layers else evaluator.evaluate(b)
        diff = [x - y for x, y in zip(ra.per_sample_kl, rb.per_sample_kl)]
        rows.append(
            {
                "cap": cap,
                "short_kl": ra.kl,
                "short_kl_stderr": ra.kl_stderr,
                "long_kl": rb.kl,
                "long_kl_stderr": rb.kl_stderr,
                "same_config": a.layers == b.layers,
                "difference": sum(diff) / len(diff),
                "difference_stderr": stderr(diff),
            }
        )
        print(rows[-1], flush=True)
    result = {
        "model": args.model,
        "scheme": args.scheme,
        "short_context": tables["short"][1]["layer_kl"]["context"],
        "long_context": tables["long"][1]["layer_kl"]["context"],
        "spearman_per_pair": per_pair,
        "spearman_all": round(overall, 3),
        "eval_context": args.context,
        "samples": args.samples,
        "rows": rows,
    }
    out = Path("docs/long-context")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"study_{args.model}_{args.scheme}_{args.context}.json").write_text(
        json.dumps(result, indent=1) + "\n"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
