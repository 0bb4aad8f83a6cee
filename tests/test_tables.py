"""Results tables in markdown and the README blocks they replace (no model needed)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kvtuner.tables import (
    RESULT_COLUMNS,
    block_key,
    display_frame,
    markdown_table,
    markers,
    replace_block,
    results_markdown,
    summary_markdown,
    update_readme,
)

MIB = 1024 * 1024


def results() -> pd.DataFrame:
    """A hand-made (model, scheme) table: the dense row, two uniform rows, a searched one, a peer."""
    rows = [
        dict(config="fp16", kind="dense", equivalent_bits=16, effective_bits=32, kl=0.0,
             kl_stderr=0.0, ppl=17.2, kv_bytes=40 * MIB, tokens_per_s=20.0, speed_ratio=1.0),
        dict(config="KV8", kind="uniform", equivalent_bits=8, effective_bits=8.25, kl=0.0027,
             kl_stderr=0.0004, ppl=17.21, kv_bytes=10.5 * MIB, tokens_per_s=18.0, speed_ratio=0.9),
        dict(config="KV2", kind="uniform", equivalent_bits=2, effective_bits=2.25, kl=7.6,
             kl_stderr=0.31, ppl=35988.0, kv_bytes=2.9 * MIB, tokens_per_s=17.0, speed_ratio=0.85),
        dict(config="kvtuner C3.5", kind="searched", equivalent_bits=3.5, effective_bits=3.75,
             kl=1.28, kl_stderr=0.12, ppl=62.6, kv_bytes=4.7 * MIB, tokens_per_s=16.5,
             speed_ratio=0.82),
        dict(config="QuantizedCache quanto 4-bit", kind="peer", equivalent_bits=4,
             effective_bits=5.0, kl=float("nan"), kl_stderr=float("nan"), ppl=float("nan"),
             kv_bytes=5.0 * MIB, tokens_per_s=float("nan"), speed_ratio=float("nan")),
    ]  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=list(RESULT_COLUMNS))
    frame["dense_kv_bytes"] = 40 * MIB
    frame["memory_ratio"] = frame["kv_bytes"] / frame["dense_kv_bytes"]
    return frame


def test_display_frame_formats_every_column():
    shown = display_frame(results())
    assert list(shown.columns)[:3] == ["config", "equiv. bits", "eff. bits"]
    kv8 = shown.iloc[1]
    assert kv8["KL ± s.e."] == "0.0027 ± 0.0004"
    assert kv8["KV MiB"] == "10.50"
    assert kv8["mem. ratio"] == "0.263x"  # 10.5 / 40
    assert kv8["speed ratio"] == "0.90x"
    assert shown.iloc[0]["KL ± s.e."] == "0"  # dense: no error bar
    assert shown.iloc[2]["KL ± s.e."] == "7.6 ± 0.31"
    assert shown.iloc[2]["ppl"] == "3.599e+04"  # large perplexities in 4 significant digits
    peer = shown.iloc[4]
    assert peer["KL ± s.e."] == "-" and peer["ppl"] == "-" and peer["tok/s"] == "-"
    assert peer["eff. bits"] == "5.00"


def test_markdown_table_shape_alignment_and_escaping():
    table = pd.DataFrame([["a|b", "1.0"], ["c", "22.50"]], columns=["name", "value"])
    lines = markdown_table(table).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| name") and lines[0].endswith("|")
    assert lines[1].replace(" ", "") == "|----|----:|"
    assert "a\\|b" in lines[2]  # a pipe in a cell does not split it
    assert all(len(line) == len(lines[0]) for line in lines)  # padded to equal width
    assert lines[3].endswith("22.50 |")


def test_results_markdown_has_a_row_per_result():
    text = results_markdown(results())
    lines = text.splitlines()
    assert len(lines) == 2 + len(results())
    assert "| kvtuner C3.5" in text and "QuantizedCache quanto 4-bit" in text
    assert not any(math.isnan(x) for x in results()["memory_ratio"])


def test_summary_markdown_has_a_row_per_model_and_scheme():
    first = results().assign(model="m1", scheme="per-token")
    first.loc[3, "config"] = "C4 search"  # the searched row, labelled as scripts/reproduce.py does
    second = results().assign(model="m2", scheme="kivi").drop(index=[1, 4])  # no KV8, no peer
    second.loc[3, "config"] = "C5 search"
    frames = pd.concat([first, second], ignore_index=True)
    lines = summary_markdown(frames, caps=(4.0, 5.0)).splitlines()
    assert len(lines) == 2 + 2  # header, rule, one row per (model, scheme) in their order
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model / scheme", "KV8", "KV4", "C4 searched", "C5 searched",
                      "QuantizedCache 4-bit"]  # fmt: skip
    m1 = [c.strip() for c in lines[2].strip("|").split("|")]
    assert m1[0] == "m1 / per-token"
    assert m1[1] == "0.0027 ± 0.0004 (8.25)"  # KL ± s.e. (effective bits)
    assert m1[3] == "1.28 ± 0.12 (3.75)" and m1[4] == "-"  # no C5 row in this table
    assert m1[5] == "-"  # the peer's KL was not measured
    m2 = [c.strip() for c in lines[3].strip("|").split("|")]
    assert m2[0] == "m2 / kivi" and m2[1] == "-" and m2[3] == "-" and m2[5] == "-"
    assert m2[4] == "1.28 ± 0.12 (3.75)"


# -- README blocks ----------------------------------------------------------------------------------
KEY = block_key("gemma-3-270m", "per-token")


def readme(middle: str = "old table\n") -> str:
    start, end = markers(KEY)
    return f"# Title\n\nIntro.\n\n{start}\n{middle}{end}\n\nAfter.\n"


def test_markers_name_model_and_scheme():
    assert markers(KEY) == (
        "<!-- results:gemma-3-270m:per-token:start -->",
        "<!-- results:gemma-3-270m:per-token:end -->",
    )


def test_replace_block_replaces_only_the_inside_and_is_idempotent():
    once = replace_block(readme(), KEY, "| new | table |\n")
    assert once is not None
    assert "old table" not in once and "| new | table |" in once
    assert once.startswith("# Title\n\nIntro.\n\n") and once.endswith("\n\nAfter.\n")
    start, end = markers(KEY)
    assert f"{start}\n| new | table |\n{end}" in once
    assert replace_block(once, KEY, "| new | table |\n") == once


def test_replace_block_refuses_missing_repeated_or_reversed_markers():
    start, end = markers(KEY)
    assert replace_block("# no markers\n", KEY, "x") is None
    assert replace_block(f"{start}\nonly a start\n", KEY, "x") is None
    assert replace_block(f"{start}\n{end}\n{start}\n{end}\n", KEY, "x") is None
    assert replace_block(f"{end}\nreversed\n{start}\n", KEY, "x") is None
    other = block_key("smollm2-135m", "kivi")
    assert replace_block(readme(), other, "x") is None


def test_update_readme_writes_blocks_and_reports_missing_ones(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(readme())
    other = block_key("smollm2-135m", "kivi")
    missing = update_readme(path, {KEY: "table A", other: "table B"})
    assert missing == [other]
    text = path.read_text()
    assert "table A" in text and "table B" not in text and "old table" not in text
    mtime = path.stat().st_mtime_ns
    assert update_readme(path, {KEY: "table A"}) == []
    assert path.read_text() == text
    assert path.stat().st_mtime_ns == mtime  # unchanged content: not rewritten
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp files left


def test_update_readme_leaves_a_file_without_markers_untouched(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# A README the lead has not marked yet\n")
    before = path.read_bytes()
    assert update_readme(path, {KEY: "table"}) == [KEY]
    assert path.read_bytes() == before


def test_update_readme_without_a_file_creates_nothing(tmp_path):
    path = tmp_path / "README.md"
    assert update_readme(path, {KEY: "table"}) == [KEY]
    assert not path.exists()


@pytest.mark.parametrize("content", ["t\n", "\n\nt\n\n"])
def test_surrounding_blank_lines_of_the_content_do_not_accumulate(content):
    text = readme()
    for _ in range(3):
        text = replace_block(text, KEY, content)
    start, end = markers(KEY)
    assert f"{start}\nt\n{end}" in text
