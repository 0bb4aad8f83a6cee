"""Results tables as markdown, and the markdown blocks they live in.

A results frame has one row per cache (columns in `RESULT_COLUMNS`); `results_markdown` renders one
(model, scheme) frame for docs/results.md, `summary_markdown` a few rows of every frame for the
README. A block is the text between `<!-- results:<key>:start -->` and `<!-- results:<key>:end -->`
of a markdown file (key `<model>:<scheme>` for a per-model table); `update_readme` rewrites only
that text, atomically, and leaves the file untouched when the markers are missing or malformed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from kvtuner.io import atomic_write_text

MIB = 1024 * 1024

# Columns of a results frame (the CSV keeps all of them; the README shows a formatted subset).
RESULT_COLUMNS: tuple[str, ...] = (
    "model",
    "scheme",
    "config",  # row label: fp16, KV8, ..., "kvtuner C3.5", "QuantizedCache quanto 4-bit"
    "kind",  # dense | uniform | searched | peer
    "equivalent_bits",
    "effective_bits",
    "measured_bits",  # bits per element from the bytes held at `memory_tokens`
    "kl",
    "kl_stderr",
    "ppl",
    "kv_bytes",
    "dense_kv_bytes",
    "memory_ratio",
    "tokens_per_s",
    "dense_tokens_per_s",
    "speed_ratio",
    "source",
    "note",
)


def _number(digits: int, suffix: str = "") -> Callable[[object], str]:
    def render(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{float(value):.{digits}f}{suffix}"

    return render


def _kl(value: object, stderr: object) -> str:
    """`0.0123 ± 0.0011`, with significant digits for small values; `-` when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value)
    text = "0" if value == 0 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)) or float(stderr) == 0:
        return text
    return f"{text} ± {float(stderr):.2g}"


def _mib(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value) / MIB:.2f}"


def _ppl(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value)
    return f"{value:.2f}" if value < 1000 else f"{value:.4g}"


# (header, function of the row) in README order
DISPLAY_COLUMNS: tuple[tuple[str, Callable[[pd.Series], str]], ...] = (
    ("config", lambda r: str(r["config"])),
    ("equiv. bits", lambda r: _number(2)(r["equivalent_bits"])),
    ("eff. bits", lambda r: _number(2)(r["effective_bits"])),
    ("KL ± s.e.", lambda r: _kl(r["kl"], r["kl_stderr"])),
    ("ppl", lambda r: _ppl(r["ppl"])),
    ("KV MiB", lambda r: _mib(r["kv_bytes"])),
    ("mem. ratio", lambda r: _number(3, "x")(r["memory_ratio"])),
    ("tok/s", lambda r: _number(2)(r["tokens_per_s"])),
    ("speed ratio", lambda r: _number(2, "x")(r["speed_ratio"])),
)


def display_frame(results: pd.DataFrame) -> pd.DataFrame:
    """The README view of a results frame: one formatted string per cell, in `DISPLAY_COLUMNS` order."""
    rows = [[render(row) for _, render in DISPLAY_COLUMNS] for _, row in results.iterrows()]
    return pd.DataFrame(rows, columns=[name for name, _ in DISPLAY_COLUMNS])


def markdown_table(table: pd.DataFrame, align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of a frame of strings; `align` per column: "l" or "r" (default:
    first column left, the rest right). Pipes in cells are escaped."""
    columns = [str(c) for c in table.columns]
    align = list(align) if align is not None else ["l"] + ["r"] * (len(columns) - 1)
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    widths = [max([len(c), 3, *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if a == "l" else "-" * (w - 1) + ":" for w, a in zip(widths, align)]
    return "\n".join(
        [line(columns), "|" + "|".join(f" {r} " for r in rule) + "|", *map(line, cells)]
    )


def results_markdown(results: pd.DataFrame) -> str:
    """The README table of one (model, scheme) results frame."""
    return markdown_table(display_frame(results))


def summary_markdown(results: pd.DataFrame, caps: Sequence[float] = (4.0, 5.0)) -> str:
    """One row per (model, scheme) of concatenated results frames, in their order: held-out KL ±
    s.e. and (effective bits) of uniform KV8 and KV4, of the searched config at each of `caps`
    (the shipped `kvtuner_c<cap>.yaml`) and of transformers' QuantizedCache at 4 bits; `-` where a
    table has no such row or its KL was not measured."""

    def cell(rows: pd.DataFrame) -> str:
        if rows.empty or pd.isna(rows.iloc[0]["kl"]):
            return "-"
        row = rows.iloc[0]
        return f"{_kl(row['kl'], row['kl_stderr'])} ({_number(2)(row['effective_bits'])})"

    header = ["model / scheme", "KV8", "KV4", *(f"C{cap:g} searched" for cap in caps)]
    header.append("QuantizedCache 4-bit")
    lines = []
    for (model, scheme), part in results.groupby(["model", "scheme"], sort=False):
        uniform = [
            cell(part[(part["kind"] == "uniform") & (part["config"] == c)]) for c in ("KV8", "KV4")
        ]
        searched = [
            cell(part[(part["kind"] == "searched") & (part["config"] == f"C{cap:g} search")])
            for cap in caps
        ]
        peer = cell(part[(part["kind"] == "peer") & (part["equivalent_bits"] == 4)])
        lines.append([f"{model} / {scheme}", *uniform, *searched, peer])
    return markdown_table(pd.DataFrame(lines, columns=header))


# -- README blocks ---------------------------------------------------------------------------------
def markers(key: str) -> tuple[str, str]:
    """(start, end) marker lines of block `key`, e.g. key "gemma-3-270m:per-token"."""
    return f"<!-- results:{key}:start -->", f"<!-- results:{key}:end -->"


def block_key(model: str, scheme: str) -> str:
    return f"{model}:{scheme}"


def replace_block(text: str, key: str, content: str) -> str | None:
    """`text` with the lines between block `key`'s markers replaced by `content`.

    None when the markers are missing, repeated or out of order, so nothing is ever half-replaced.
    The markers themselves stay; `content` goes between them on lines of its own.
    """
    start, end = markers(key)
    if text.count(start) != 1 or text.count(end) != 1:
        return None
    head, rest = text.split(start, 1)
    if end not in rest:
        return None
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip(chr(10))}\n{end}{tail}"


def update_readme(path: str | Path, blocks: dict[str, str]) -> list[str]:
    """Replace each block `{key: content}` of the markdown file at `path` (the README,
    docs/results.md); return the keys not found there.

    The file is rewritten atomically, once, and only when some block changed; a missing file leaves
    every key unplaced.
    """
    path = Path(path)
    if not path.is_file():
        return list(blocks)
    original = text = path.read_text(encoding="utf-8")
    missing = []
    for key, content in blocks.items():
        replaced = replace_block(text, key, content)
        if replaced is None:
            missing.append(key)
        else:
            text = replaced
    if text != original:
        atomic_write_text(path, text)
    return missing
