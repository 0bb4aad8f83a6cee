"""The README plots, drawn from hand-made tables and configs (no model needed)."""

from __future__ import annotations

import pandas as pd
import pytest

from kvtuner.plots import plot_precision_map, plot_quality_vs_bits
from kvtuner.precision import PrecisionPair

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "config": ["fp16", "KV8", "KV4", "KV2", "kvtuner C3.5", "kvtuner C6", "quanto 4-bit"],
            "kind": ["dense", "uniform", "uniform", "uniform", "searched", "searched", "peer"],
            "equivalent_bits": [16, 8, 4, 2, 3.5, 6, 4],
            "effective_bits": [32, 9, 5, 3, 4.5, 7, 5],
            "kl": [0.0, 0.0027, 1.68, 7.6, 1.28, 0.02, float("nan")],
            "kl_stderr": [0.0, 0.0004, 0.15, 0.3, 0.12, 0.003, float("nan")],
        }
    )


def image_size(path) -> tuple[int, int]:
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_quality_vs_bits_writes_a_png_and_skips_what_a_log_axis_cannot_show(tmp_path):
    path = plot_quality_vs_bits(results(), tmp_path / "q.png", title="gemma per-token")
    assert path.read_bytes()[:8] == PNG_MAGIC
    width, height = image_size(path)
    assert width > height  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["q.png"]  # the temp file was renamed


def test_quality_vs_bits_without_searched_rows(tmp_path):
    frame = results()
    frame = frame[frame["kind"] != "searched"]
    path = plot_quality_vs_bits(frame, tmp_path / "q.png")
    assert path.stat().st_size > 10_000


def configs(num_layers: int) -> list[tuple[str, list[PrecisionPair]]]:
    low = [PrecisionPair(8, 4) if i % 3 else PrecisionPair(4, 2) for i in range(num_layers)]
    high = [PrecisionPair(8, 8) if i == 0 else PrecisionPair(16, 8) for i in range(num_layers)]
    return [("C3.5", low), ("C6", high)]


def test_precision_map_grows_with_layers(tmp_path):
    small = plot_precision_map(configs(6), tmp_path / "small.png")
    large = plot_precision_map(configs(30), tmp_path / "large.png", highlight_layers={5, 11})
    assert small.read_bytes()[:8] == PNG_MAGIC and large.read_bytes()[:8] == PNG_MAGIC
    assert image_size(large)[0] > image_size(small)[0]
    assert image_size(large)[1] == image_size(small)[1]  # rows: two per config either way


def test_precision_map_height_follows_the_number_of_configs(tmp_path):
    two = plot_precision_map(configs(6), tmp_path / "two.png")
    four = plot_precision_map(configs(6) + configs(6), tmp_path / "four.png")
    assert image_size(four)[1] > image_size(two)[1]


def test_precision_map_refuses_empty_or_mismatched_configs(tmp_path):
    with pytest.raises(ValueError, match="no configs"):
        plot_precision_map([], tmp_path / "m.png")
    with pytest.raises(ValueError, match="different layer counts"):
        plot_precision_map(configs(4)[:1] + configs(5)[1:], tmp_path / "m.png")
    assert not any(tmp_path.iterdir())
