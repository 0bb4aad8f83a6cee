"""The engine table: per model and serving engine, at caps of effective bits of engine storage,
the held-out KL of the allocated plan (`kvtuner allocate --target`) beside the engine's all-layers
setting and kvtuner's own int pairs (the knapsack on `calibration/<model>/per-token`) at the same
cap, every config scored on the same held-out samples (paired differences with standard errors).

Needs `kvtuner calibrate --model M --target T` for each model and target (calibration/<M>/<T>/)
and the per-token calibration that ships with the repository.

    python scripts/engine_results.py                      # all three models, four targets
    python scripts/engine_results.py --only smollm2-135m  # one model
    python scripts/engine_results.py --table              # only re-render docs/engines.md from the JSON

Writes docs/engines/<model>.json, docs/engines.md, and the README block between
<!-- results:engines:start --> and <!-- results:engines:end -->.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b")
TARGETS = ("vllm", "llama.cpp", "modelopt", "lmdeploy")
CAPS = (4.5, 5.0, 6.0, 8.0)
CONTEXT = 4096  # effective bits counted at this many tokens (kvtuner's budget default)
OUT = Path("docs/engines")
COMMAND = "python scripts/engine_results.py"


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-sample differences a - b."""
    from kvtuner.evaluate import stderr

    d = [x - y for x, y in zip(a, b)]
    return sum(d) / len(d), stderr(d)


def measure(model: str, samples: int) -> dict:
    import torch

    from kvtuner.allocate import allocate_configs
    from kvtuner.calibrate import base_config, load_layer_kl, load_sensitivity
    from kvtuner.compat import head_dim, model_shape, sliding_windows
    from kvtuner.engine_cache import EngineKVCache
    from kvtuner.engine_calibrate import load_engine_calibration
    from kvtuner.evaluate import Evaluator, eval_samples, protocol_for
    from kvtuner.layer_kl import losses
    from kvtuner.memory import engine_effective_bits
    from kvtuner.models import load_model
    from kvtuner.plan import engine_allocation

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    config = loaded.model.config
    size, windows, shape = head_dim(config), sliding_windows(config), model_shape(config)
    protocol = protocol_for(config)
    tokens = eval_samples(loaded.tokenizer, None, samples, protocol)
    evaluator = Evaluator(loaded.model, tokens, protocol, progress=True)
    scored: dict[str, list[float]] = {}

    def score_plan(plan) -> list[float]:
        key = plan.target + ":" + " ".join(c.label for c in plan.layers)
        if key not in scored:
            result = evaluator.evaluate_cache(lambda: EngineKVCache(plan, config))
            scored[key] = list(result.per_sample_kl)
        return scored[key]

    own_folder = Path("calibration") / model / "per-token"
    _, meta = load_sensitivity(own_folder / "sensitivity.csv")
    own_losses = losses(load_layer_kl(own_folder, shape.num_layers), shape.num_layers)
    own_configs = allocate_configs(own_losses, base_config(meta), shape, CAPS, context=CONTEXT)
    own = {}
    for cap, cfg in own_configs.items():
        if cfg is None:
            continue
        result = evaluator.evaluate(cfg)
        own[cap] = {
            "layers": " ".join(p.name for p in cfg.layers),
            "effective_bits": cfg.metadata["effective_bits"],
            "per_sample_kl": list(result.per_sample_kl),
        }
    rows = []
    for target in TARGETS:
        folder = Path("calibration") / model / target
        if not (folder / "layer_kl.csv").is_file():
            print(f"skip {model} {target}: not calibrated")
            continue
        measured, kv_amax, _ = load_engine_calibration(folder, target, shape.num_layers)
        for cap in CAPS:
            found, uniform = engine_allocation(target, measured, size, windows, CONTEXT, cap)
            if found is None:
                rows.append({"target": target, "cap": cap, "plan": None})
                continue
            plan = found.plan.with_amax(kv_amax)
            uniform = uniform.with_amax(kv_amax)
            mine, theirs = score_plan(plan), score_plan(uniform)
            row = {
                "target": target,
                "cap": cap,
                "plan": {
                    "setting": plan.family,
                    "layers": [c.label for c in plan.layers],
                    "effective_bits": engine_effective_bits(plan.layers, size, windows, CONTEXT),
                    "kl": sum(mine) / len(mine),
                    "per_sample_kl": mine,
                },
                "uniform": {
                    "setting": uniform.layers[0].label,
                    "effective_bits": engine_effective_bits(uniform.layers, size, windows, CONTEXT),
                    "kl": sum(theirs) / len(theirs),
                    "per_sample_kl": theirs,
                },
                "vs_uniform": paired(mine, theirs),
            }
            if cap in own:
                row["kvtuner"] = {
                    "layers": own[cap]["layers"],
                    "effective_bits": own[cap]["effective_bits"],
                    "kl": sum(own[cap]["per_sample_kl"]) / samples,
                }
                row["vs_kvtuner"] = paired(mine, own[cap]["per_sample_kl"])
            rows.append(row)
            print(
                target, cap, plan.family, f"{row['plan']['kl']:.4f}", f"{row['uniform']['kl']:.4f}"
            )
    return {
        "model": model,
        "head_dim": size,
        "samples": samples,
        "context": protocol.context,
        "continuation": protocol.continuation,
        "budget_context": CONTEXT,
        "rows": rows,
    }


def _plan_text(plan: dict) -> str:
    layers = plan["layers"]
    quantized = [x for x in layers if x != "dense"]
    dense = [str(i) for i, x in enumerate(layers) if x == "dense"]
    if len(set(layers)) == 1:
        return f"all {layers[0]}"
    if len(set(quantized)) == 1:
        return f"{quantized[0]}, skip {' '.join(dense)}"
    return _mix(layers)


def _mix(layers: list[str]) -> str:
    """How many layers take each setting, most common first: "20x KV4, 8x K8V4, 2x KV2"."""
    counts = {label: layers.count(label) for label in dict.fromkeys(layers)}
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{n}x {label}" for label, n in ordered)


def full_table(results: list[dict]) -> str:
    lines = [
        "| model | engine | cap | allocated plan | bits | held-out KL | engine all-layers | bits | KL "
        "| plan - all-layers | kvtuner int pairs | bits | KL | plan - kvtuner |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for result in results:
        for row in result["rows"]:
            head = f"| {result['model']} | {row['target']} | {row['cap']:g} |"
            if row["plan"] is None:
                lines.append(head + " nothing fits |" + " |" * 10)
                continue
            p, u = row["plan"], row["uniform"]
            d, e = row["vs_uniform"]
            text = (
                f"{head} {_plan_text(p)} | {p['effective_bits']:.2f} | {p['kl']:.4f} | "
                f"{u['setting']} | {u['effective_bits']:.2f} | {u['kl']:.4f} | {d:+.4f} ± {e:.4f} |"
            )
            if "kvtuner" in row:
                k = row["kvtuner"]
                d2, e2 = row["vs_kvtuner"]
                text += f" {_mix(k['layers'].split())} | {k['effective_bits']:.2f} | {k['kl']:.4f} | {d2:+.4f} ± {e2:.4f} |"
            else:
                text += " - | | | |"
            lines.append(text)
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Per model and engine: the plan at caps 5 and 6, KL beside the all-layers setting."""
    lines = [
        "| model | engine | cap 5: plan | KL (all-layers) | cap 6: plan | KL (all-layers) |",
        "|---|---|---|---:|---|---:|",
    ]
    for result in results:
        by = {(r["target"], r["cap"]): r for r in result["rows"]}
        for target in TARGETS:
            cells = []
            for cap in (5.0, 6.0):
                row = by.get((target, cap))
                if row is None or row["plan"] is None:
                    cells += ["-", "-"]
                    continue
                p, u = row["plan"], row["uniform"]
                cells += [
                    _plan_text(p)[:48],
                    f"{p['kl']:.4f} ({u['kl']:.4f} {u['setting']})",
                ]
            if any(c != "-" for c in cells):
                lines.append(f"| {result['model']} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(results: list[dict]) -> None:
    samples = {r["samples"] for r in results}
    text = "\n".join(
        [
            "# Engine plans: what kvtuner allocates in the KV formats serving engines store",
            "",
            "Per model and engine, at caps on effective bits of engine storage (bits per cached "
            f"element at {CONTEXT} tokens, scales included, 16 for a layer the engine keeps at the "
            "model dtype): the plan `kvtuner allocate --target` writes (the exact knapsack on "
            "single-layer KL within each engine setting), its held-out KL beside the engine's "
            "all-layers setting (vLLM: the same dtype on every layer; others: the all-layers "
            "setting of least summed single-layer KL under the cap) and beside kvtuner's own "
            "int pairs (per-token, knapsack) at the same cap. KL in nats per token, "
            f"{'/'.join(map(str, sorted(samples)))} held-out samples; differences are paired on "
            "the same samples, ± one standard error (inside one standard error: a tie).",
            "",
            f"Regenerate: `{COMMAND}` (after `kvtuner calibrate --model M --target T` for each "
            "model and target).",
            "",
            full_table(results),
            "",
        ]
    )
    Path("docs/engines.md").write_text(text)
    readme = Path("README.md")
    body = readme.read_text()
    block = (
        "<!-- results:engines:start -->\n"
        f"Command: `{COMMAND}` (full table: [docs/engines.md](docs/engines.md)).\n\n"
        + summary_table(results)
        + "\n<!-- results:engines:end -->"
    )
    pattern = re.compile(r"<!-- results:engines:start -->.*?<!-- results:engines:end -->", re.S)
    if pattern.search(body):
        readme.write_text(pattern.sub(lambda _: block, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--table", action="store_true", help="only re-render from the JSON")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for model in [args.only] if args.only else MODELS:
            result = measure(model, args.samples)
            (OUT / f"{model}.json").write_text(json.dumps(result, indent=1) + "\n")
    results = [
        json.loads((OUT / f"{m}.json").read_text()) for m in MODELS if (OUT / f"{m}.json").is_file()
    ]
    write_docs(results)


if __name__ == "__main__":
    main()
