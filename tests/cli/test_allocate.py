"""`kvtuner allocate`: the knapsack on a tiny model's calibration, re-solved without measuring."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from conftest import save_tiny_folder

from kvtuner.cli import main
from kvtuner.config import load_config


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny Llama folder and its calibration (e_o and single-layer KL)."""
    root = tmp_path_factory.mktemp("allocate")
    model = root / "tiny-llama"
    save_tiny_folder(model)
    text = root / "words.txt"
    rng = random.Random(0)
    text.write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(3000)))
    args = ["calibrate", "--model", str(model), "--text", str(text), "--samples", "2",
            "--seq-len", "64", "--query-tokens", "8", "--layer-kl-samples", "3",
            "--layer-kl-context", "40", "--additivity", "0", "--out", str(root / "calibration"),
            "--json"]  # fmt: skip
    assert main(args) == 0
    return model, root


def run(capsys, *args):
    rc = main(["allocate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_allocate_writes_a_config_per_cap_under_its_budget(calibrated, capsys, tmp_path):
    model, root = calibrated
    out = tmp_path / "knapsack"
    rc, stdout, _ = run(capsys, "--model", str(model), "--calibration", str(root / "calibration"),
                        "--max-bits", "3,4,6", "--budget", "equivalent", "--out", str(out), "--json")  # fmt: skip
    assert rc == 0
    summary = json.loads(stdout)
    assert [row["cap"] for row in summary["configs"]] == [3.0, 4.0, 6.0]
    table = pd.read_csv(root / "calibration" / "tiny-llama" / "per-token" / "layer_kl.csv")
    sums = []
    for row in summary["configs"]:
        config = load_config(row["path"], num_layers=4)
        assert config.equivalent_bits <= row["cap"] + 1e-9
        summed = sum(
            float(
                table[
                    (table.layer == i)
                    & (table.key_bits == p.key_bits)
                    & (table.value_bits == p.value_bits)
                ].kl.iloc[0]
            )  # fmt: skip
            for i, p in enumerate(config.layers)
        )
        assert summed == pytest.approx(row["summed_kl"], rel=1e-6)
        assert config.metadata["budget"] == "equivalent"
        sums.append(summed)
    assert sums[0] >= sums[1] >= sums[2]  # more bits never cost more KL


def test_effective_budget_is_the_default_and_counts_scales(calibrated, capsys, tmp_path):
    model, root = calibrated
    rc, stdout, _ = run(capsys, "--model", str(model), "--calibration", str(root / "calibration"),
                        "--max-bits", "5", "--out", str(tmp_path), "--json")  # fmt: skip
    assert rc == 0
    (row,) = json.loads(stdout)["configs"]
    assert row["effective_bits"] <= 5.0 + 1e-9
    assert row["equivalent_bits"] < row["effective_bits"]  # scales and sinks cost bits


def test_a_cap_below_every_config_is_reported(calibrated, capsys, tmp_path):
    model, root = calibrated
    rc, stdout, _ = run(capsys, "--model", str(model), "--calibration", str(root / "calibration"),
                        "--max-bits", "1", "--out", str(tmp_path))  # fmt: skip
    assert rc == 0
    assert "no config fits under this cap" in stdout
    assert list(tmp_path.iterdir()) == []


def test_without_layer_kl_it_says_how_to_get_it(calibrated, capsys, tmp_path):
    model, root = calibrated
    (root / "calibration" / "tiny-llama" / "per-token" / "layer_kl.csv").rename(tmp_path / "x.csv")
    try:
        rc, _, err = run(capsys, "--model", str(model), "--calibration", str(root / "calibration"))
    finally:
        (tmp_path / "x.csv").rename(
            root / "calibration" / "tiny-llama" / "per-token" / "layer_kl.csv"
        )
    assert rc == 2
    assert "no single-layer KL table" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "--model", str(model), "--calibration", str(root / "calibration"),
                     "--budget", "bytes")  # fmt: skip
    assert rc == 2 and "--budget must be one of effective, equivalent" in err
