"""The README's long-context summary: held-out KL of uniform and shipped configs at each measured
context, per model and scheme, and pass-key retrieval beside dense's.

Reads what `scripts/long_context.py` and `scripts/passkey_table.py` wrote (docs/long-context/
<model>_<context>.json, docs/passkey/<model>.json) and puts the two tables between the README's
`<!-- results:long-context:start/end -->` markers; measures nothing.

    python scripts/long_context_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

from passkey_table import load_results, logprob_table  # scripts/, on the path when run
from passkey_table import table as passkey_table

from kvtuner.tables import update_readme

KL_DIR = Path("docs/long-context")
PASSKEY_DIR = Path("docs/passkey")
CONFIGS = ("KV8", "KV4", "K4V2", "kvtuner_c4.0", "kvtuner_c5.0")
HEADERS = ("KV8", "KV4", "K4V2", "shipped C4.0", "shipped C5.0")
PASSKEY = [  # beside dense
    "KV8", "KV4", "K4V2", "C4.0 per-token", "C5.0 per-token", "KV4 KIVI", "C4.0 KIVI", "C5.0 KIVI"
]  # fmt: skip


def kl(value: float, stderr: float) -> str:
    """Three decimals, four below 0.01 (so KV8's 0.0003 is not shown as 0)."""
    digits = 4 if value < 0.01 else 3
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"


def kl_table(results: list[dict]) -> str:
    """One row per model, scheme and context: KL ± s.e. (effective bits) of each config."""
    lines = [
        "| model / scheme | context | " + " | ".join(HEADERS) + " |",
        "|---|---:|" + "---:|" * len(HEADERS),
    ]
    order = sorted(results, key=lambda r: (r["model"], r["context"]))
    for scheme in ("per-token", "kivi"):
        for result in order:
            rows = {r["config"]: r for r in result["rows"] if r["scheme"] == scheme}
            if not rows:
                continue
            cells = []
            for config in CONFIGS:
                row = rows.get(config)
                cells.append(
                    "-"
                    if row is None
                    else f"{kl(row['kl'], row['kl_stderr'])} ({row['effective_bits']:.1f})"
                )
            name = "KIVI" if scheme == "kivi" else scheme
            lines.append(
                f"| {result['model']} / {name} | {result['context']} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    # not the calibration-context studies (study_*.json)
    kl = [json.loads(p.read_text()) for p in sorted(KL_DIR.glob("*.json")) if "study" not in p.name]
    passkey = load_results(PASSKEY_DIR)
    block = "\n".join(
        [
            "Held-out KL, nats per token ± s.e. (effective bits at 4096 tokens), 4 samples per "
            "context ([docs/long-context.md](docs/long-context.md), `python scripts/long_context.py "
            "--model M --contexts C --samples 4`):",
            "",
            kl_table(kl),
            "",
            "Pass-key retrieval, accuracy over depths 0-100 % (trials: prompts per cell, 5 depths "
            "times 1 to 5 per depth; in brackets: of the trials dense gets right, how many the "
            "config keeps; [docs/passkey.md](docs/passkey.md), `python scripts/passkey_table.py "
            "--model M --contexts C1,C2 --samples N`):",
            "",
            passkey_table(passkey, PASSKEY),
            "",
            "The key's log-probability under dense (nats, the five digits teacher-forced after the "
            "question) and how much of it each config loses on the same prompts, mean ± s.e. "
            "(positive: less sure of the key than dense; inside one s.e.: a tie):",
            "",
            logprob_table(passkey, PASSKEY),
            "",
            "Regenerate the three tables: `python scripts/long_context_summary.py`.",
        ]
    )
    missing = update_readme("README.md", {"long-context": block})
    if missing:
        raise SystemExit("README.md has no <!-- results:long-context:start/end --> markers")
    print(block)


if __name__ == "__main__":
    main()
