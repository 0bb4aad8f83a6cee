"""The runtime table: decode speed and memory of kvtuner's cache against the dense cache.

Runs `kvtuner bench --json` once per (model, config) in its own process (so one run's allocator
state does not leak into the next), writes each JSON under `--out`, and renders the table the
README and docs/runtime.md show. CPU float32, the machine's threads (2 here).

    python scripts/bench_runtime.py            # every row (about 45 minutes on 2 cores: a 16384-token prefill of Qwen2.5-Coder-0.5B alone takes minutes)
    python scripts/bench_runtime.py --only smollm2-135m
    python scripts/bench_runtime.py --out docs/runtime-zen3 --block runtime-zen3   # another machine's table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kvtuner.machine import summary

# (model, config, contexts, decode steps, rounds[, peer bits]): the targets first; the
# first row also runs transformers' QuantizedCache (quanto, 4-bit) where optimum-quanto is installed
RUNS = [
    ("smollm2-135m", "KV4", "4096,8000", 32, 3, 4),
    ("qwen2.5-coder-0.5b", "KV4", "16384", 16, 1),
    ("gemma-3-270m", "KV4", "16384", 16, 1),
    ("smollm2-135m", "K4V2", "8000", 32, 2),
    ("smollm2-135m", "KV2", "8000", 32, 2),
    ("smollm2-135m", "KV4 --scheme kivi", "8000", 32, 2),
    ("smollm2-135m", "KV4", "1024", 32, 3),
]
MIB = 2**20


def run(
    model: str, config: str, contexts: str, steps: int, rounds: int, out: Path, peer: int = 0
) -> Path:
    name = f"{model}_{config.replace(' --scheme ', '-')}_{contexts.replace(',', '-')}.json"
    path = out / name
    if path.exists():
        return path
    kvtuner = str(Path(sys.executable).with_name("kvtuner"))
    command = [kvtuner, "bench", "--model", model, "--config",
               *config.split(), "--contexts", contexts, "--new-tokens", str(steps), "--rounds",
               str(rounds), "--peer-bits", str(peer), "--json"]  # fmt: skip
    print(" ".join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    path.write_text(result.stdout)
    return path


def table(paths: list[Path]) -> str:
    lines = [
        "| model | config | context | KV MiB (dense) | effective bits | decode tok/s (dense) | speed | "
        "prefill peak MiB (dense) | decode-phase MiB (dense) | decode memory saved / KV saved | "
        "QuantizedCache quanto 4-bit tok/s (KV MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    machines: list[str] = []
    for path in paths:
        for r in json.loads(path.read_text())["contexts"]:
            where = summary(r["machine"]) if "machine" in r else None
            if where and where not in machines:
                machines.append(where)
            saved = r["decode_memory_saved_fraction"]
            lines.append(
                f"| {r['model']} | {r['config']} {r['scheme']} | {r['context']} | "
                f"{r['kv_bytes'] / MIB:.1f} ({r['dense_kv_bytes'] / MIB:.1f}) | {r['effective_bits']:.2f} | "
                f"{r['tokens_per_s']:.2f} ({r['dense_tokens_per_s']:.2f}) | **{r['speed_ratio']:.2f}x** | "
                f"{r['prefill_peak_memory_bytes'] / MIB:.0f} ({r['dense_prefill_peak_memory_bytes'] / MIB:.0f}) | "
                f"{r['decode_level_memory_bytes'] / MIB:.0f} ({r['dense_decode_level_memory_bytes'] / MIB:.0f}) | "
                f"{'' if saved is None else f'{saved:.0%}'} | {_peer(r)} |"
            )
    if machines:
        lines += ["", "Measured on " + "; ".join(machines) + "."]
    return "\n".join(lines)


def _peer(row: dict) -> str:
    """transformers' QuantizedCache (quanto) in the same run, where it ran."""
    for other in row.get("rows", []):
        if other["name"].startswith("transformers QuantizedCache"):
            return f"{other['tokens_per_s']:.2f} ({other['kv_bytes'] / MIB:.1f})"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/runtime"))
    parser.add_argument("--only", help="run the rows of this model only")
    parser.add_argument(
        "--block", default="runtime", help="the README block the table goes into (results:BLOCK)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model, config, contexts, steps, rounds, *peer in RUNS:
        if args.only and model != args.only:
            continue
        try:
            paths.append(run(model, config, contexts, steps, rounds, args.out, *peer))
        except subprocess.CalledProcessError as error:
            print(f"{model} {config}: failed: {error.stderr.strip().splitlines()[-1:]}", flush=True)
    markdown = table(paths)
    (args.out / "table.md").write_text(markdown + "\n")
    print(markdown)
    if not args.only:
        write_block(Path("README.md"), args.block, markdown)


def write_block(readme: Path, key: str, markdown: str) -> None:
    """Put `markdown` between the README's `<!-- results:<key>:start/end -->` markers."""
    text = readme.read_text()
    start, end = f"<!-- results:{key}:start -->", f"<!-- results:{key}:end -->"
    if start not in text or end not in text:
        print(f"{readme}: no markers for block {key}; README unchanged")
        return
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
