"""The pass-key table: retrieval accuracy per context of dense, uniform and shipped configs.

Same prompts for every cache (`kvtuner.tasks.passkey.make_prompts`: a five-digit key at depths
0/25/50/75/100 % of held-out filler, asked for at the end); dense runs once. Besides the raw
accuracy, each config's accuracy on the trials dense gets right: the issue asks to judge a
quantized cache only where the model itself retrieves.

    python scripts/passkey_table.py --model smollm2-135m --contexts 4096,8000 --samples 2

Writes docs/passkey/<model>.json after every cache (a rerun with the same prompts continues where
it stopped) and docs/passkey.md (every model's JSON found).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("docs/passkey")
CONFIGS = (
    ("KV8", "KV8", "per-token"),
    ("KV4", "KV4", "per-token"),
    ("K4V2", "K4V2", "per-token"),
    ("C4.0 per-token", "searched_configs/{model}/per-token/kvtuner_c4.0.yaml", None),
    ("C4.0 KIVI", "searched_configs/{model}/kivi/kvtuner_c4.0.yaml", None),
    ("KV4 KIVI", "KV4", "kivi"),
)


def measure(
    model: str, contexts: list[int], samples: int, depths: list[float], labels: list[str]
) -> dict:
    """Dense and each of `labels` on the same prompts. docs/passkey/<model>.json is rewritten
    after every cache, and a rerun with the same prompts skips the caches it already holds, so a
    long run can be stopped and continued."""
    import torch

    from kvtuner.cache import quantized_cache
    from kvtuner.io import atomic_write_text
    from kvtuner.models import load_model
    from kvtuner.tasks.passkey import answer_prompts, make_prompts

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    prompts = make_prompts(loaded.tokenizer, contexts, depths, samples, seed=0)
    result = {
        "model": model,
        "contexts": [p.context for p in prompts],
        "depths": [p.depth for p in prompts],
        "samples": samples,
        "correct": {},
    }
    path = OUT / f"{model}.json"
    if path.exists():
        before = json.loads(path.read_text())
        if all(before.get(k) == result[k] for k in ("contexts", "depths", "samples")):
            result["correct"] = before["correct"]
    done = result["correct"]
    for label, config, scheme in (("dense", None, None), *CONFIGS):
        if label in done or (label != "dense" and label not in labels):
            continue
        make = None
        if config is not None:
            source = config.format(model=model)

            def make(source=source, scheme=scheme):
                return quantized_cache(loaded.model, source, scheme=scheme)

        trials = answer_prompts(loaded.model, loaded.tokenizer, make, prompts, progress=True)
        done[label] = trials.correct.tolist()
        print(model, label, trials.groupby("context").correct.mean().to_dict(), flush=True)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def table(results: list[dict], configs: list[str] | None = None) -> str:
    """One row per model and context: dense's accuracy, and each config's with (of dense's hits,
    how many it keeps); `configs` picks the columns (default: every config measured)."""
    if configs is None:
        configs = [c[0] for c in CONFIGS if any(c[0] in r["correct"] for r in results)]
    labels = ["dense", *configs]
    lines = [
        "| model | context | trials | " + " | ".join(labels) + " |",
        "|---|---:|---:|" + "---:|" * len(labels),
    ]
    for result in results:
        contexts = result["contexts"]
        for context in sorted(set(contexts)):
            index = [i for i, c in enumerate(contexts) if c == context]
            dense = [result["correct"]["dense"][i] for i in index]
            cells = [f"{sum(dense) / len(dense):.2f}"]
            for label in labels[1:]:
                if label not in result["correct"]:
                    cells.append("-")
                    continue
                got = [result["correct"][label][i] for i in index]
                where = [g for g, d in zip(got, dense) if d]
                kept = f"{sum(where)}/{len(where)}" if where else "-"
                cells.append(f"{sum(got) / len(got):.2f} ({kept})")
            lines.append(
                f"| {result['model']} | {context} | {len(index)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="4096,8000")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        contexts = [int(c) for c in args.contexts.split(",")]
        depths = [float(d) for d in args.depths.split(",")]
        measure(args.model, contexts, args.samples, depths, args.configs.split(","))
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    text = "\n".join(
        [
            "# Pass-key retrieval: dense, uniform and shipped configs on the same prompts",
            "",
            "Accuracy over depths 0/25/50/75/100 % (five-digit key in held-out filler, greedy "
            "answer, exact match). In brackets: of the trials the dense cache gets right, how many "
            "the config keeps (a config is judged only where the model itself retrieves).",
            "",
            "Regenerate: `python scripts/passkey_table.py --model M --contexts C1,C2 --samples N`.",
            "",
            table(results),
            "",
        ]
    )
    Path("docs/passkey.md").write_text(text)


if __name__ == "__main__":
    main()
