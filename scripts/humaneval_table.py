"""The HumanEval table: pass@1 of dense, uniform and shipped configs on the same problems, paired.

Qwen2.5-Coder-0.5B by default; dense runs once, every config's completions are checked in the
sandbox (`kvtuner.tasks.sandbox`) and compared with dense's on the same problems.

    python scripts/humaneval_table.py --limit 20                 # the first 20 problems
    python scripts/humaneval_table.py --limit 20 --configs KV8,K4V2
    python scripts/humaneval_table.py --table                     # only re-render docs/humaneval.md

Writes docs/humaneval/<model>_<config>_limit<N>.json (the same JSON as `kvtuner eval --task
humaneval --json`) and docs/humaneval.md. Dense's outcomes are kept in docs/humaneval/dense/ and
reused by later runs with the same problems and `--batch-size` (default 8), so the configs can be
run a few at a time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("docs/humaneval")
CONFIGS = {
    "KV8": ("KV8", "per-token"),
    "KV4": ("KV4", "per-token"),
    "K4V2": ("K4V2", "per-token"),
    "C4.0-per-token": ("searched_configs/{model}/per-token/kvtuner_c4.0.yaml", None),
    "C5.0-per-token": ("searched_configs/{model}/per-token/kvtuner_c5.0.yaml", None),
    "C4.0-kivi": ("searched_configs/{model}/kivi/kvtuner_c4.0.yaml", None),
    "C5.0-kivi": ("searched_configs/{model}/kivi/kvtuner_c5.0.yaml", None),
}


def dense_outcomes(loaded, model: str, problems, limit: int, batch_size: int):
    """Dense completions, checked; kept in docs/humaneval/dense/ and reused by later runs with the
    same problems and batch size (so configs can be run a few at a time)."""
    from kvtuner.io import atomic_write_text
    from kvtuner.tasks import humaneval

    path = OUT / "dense" / f"{model}_limit{limit}_b{batch_size}.json"
    if path.exists():
        return [humaneval.Outcome(**o) for o in json.loads(path.read_text())]
    outcomes = humaneval.run_humaneval(
        loaded.model, loaded.tokenizer, problems, None, label="dense", batch_size=batch_size,
        progress=True,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps([o.__dict__ for o in outcomes], indent=1) + "\n")
    return outcomes


def measure(model: str, labels: list[str], limit: int, batch_size: int) -> None:
    import torch

    from kvtuner.cache import quantized_cache
    from kvtuner.config import load_config
    from kvtuner.models import load_model
    from kvtuner.tasks import humaneval

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    problems = humaneval.load_problems(limit)
    dense = dense_outcomes(loaded, model, problems, len(problems), batch_size)
    for label in labels:
        source, scheme = CONFIGS[label]
        cfg = load_config(source.format(model=model), num_layers=loaded.num_layers, scheme=scheme)
        outcomes = humaneval.run_humaneval(
            loaded.model,
            loaded.tokenizer,
            problems,
            lambda cfg=cfg: quantized_cache(loaded.model, cfg),
            label=label,
            batch_size=batch_size,
            progress=True,
        )
        summary = {
            "task": "humaneval",
            "model": loaded.name,
            "config": label,
            "scheme": cfg.scheme,
            "equivalent_bits": cfg.equivalent_bits,
            "batch_size": batch_size,
            **humaneval.paired_summary(outcomes, dense),
        }
        path = OUT / f"{model}_{label}_limit{len(problems)}.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(label, summary["pass_at_1"], summary["dense_pass_at_1"], flush=True)


def table() -> str:
    lines = [
        "| model | config | scheme | problems | batch | pass@1 | dense pass@1 | paired difference |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        lines.append(
            f"| {r['model']} | {r['config']} | {r['scheme']} | {r['problems']} | "
            f"{r.get('batch_size', 1)} | "
            f"{r['pass_at_1']:.2f} | {r['dense_pass_at_1']:.2f} | "
            f"{r['difference']:+.2f} ± {r['difference_stderr']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        measure(args.model, args.configs.split(","), args.limit, args.batch_size)
    text = "\n".join(
        [
            "# HumanEval pass@1: dense, uniform and shipped configs on the same problems",
            "",
            "Greedy completions (384 new tokens at most), each program run in its own sandboxed "
            "process with a 10 s timeout (kvtuner/tasks/sandbox.py); the paired difference to "
            "dense on the same problems, ± one standard error. Prompts are decoded in left-padded batches "
            "(the batch column; dense at the same size), which can change a greedy choice where two "
            "logits tie within float rounding, never the pairing. A subset of the 164 problems (the "
            "first N) where CPU time forbids all of them: the column says how many.",
            "",
            "Regenerate: `python scripts/humaneval_table.py --limit N` (or `kvtuner eval --task "
            "humaneval --model qwen2.5-coder-0.5b --config C --limit N --json` for one row).",
            "",
            table(),
            "",
        ]
    )
    Path("docs/humaneval.md").write_text(text)


if __name__ == "__main__":
    main()
