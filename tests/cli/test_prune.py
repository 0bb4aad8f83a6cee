"""`kvtuner prune` on a synthetic sensitivity table; mismatched or broken inputs exit 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from kvtuner.cli import main
from kvtuner.precision import candidate_pairs
from kvtuner.space import SearchSpace

BASE = {"KV8": 0.01, "K8V4": 0.10, "K4V8": 0.50, "K8V2": 0.60, "K2V8": 1.50,
        "KV4": 0.30, "K4V2": 0.70, "K2V4": 1.60, "KV2": 2.00}  # fmt: skip
SCALES = [1.0, 1.01, 2.0, 5.0, 0.99, 2.01]


@pytest.fixture
def calibration(tmp_path):
    """<tmp>/calibration/toy-model/per-token/{sensitivity.csv, metadata.yaml}: 6 layers, 3 families."""
    folder = tmp_path / "calibration" / "toy-model" / "per-token"
    folder.mkdir(parents=True)
    rows = [
        {
            "layer": layer,
            "key_bits": p.key_bits,
            "value_bits": p.value_bits,
            "equivalent_bits": p.equivalent_bits,
            "e_o": BASE[p.name] * scale,
            "e_k": 0.1,
            "e_v": 0.1,
        }  # fmt: skip
        for layer, scale in enumerate(SCALES)
        for p in candidate_pairs()
    ]
    pd.DataFrame(rows).to_csv(folder / "sensitivity.csv", index=False)
    meta = {
        "model": "toy-model",
        "num_layers": 6,
        "scheme": "per-token",
        "group_size": None,
        "residual_length": 0,
    }
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return tmp_path / "calibration"


def run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_prune_writes_space_and_summary(calibration, capsys):
    rc, stdout, _ = run(
        ["prune", "--model", "toy-model", "--out", str(calibration), "--max-size", "200"], capsys
    )
    assert rc == 0
    assert (
        "toy-model per-token: 6 layers -> 3 groups: the most groups whose space holds at most 200"
        in stdout
    )
    assert "KV8 K8V4 KV4 K4V2 KV2" in stdout and "layers 0-1,4\n" in stdout
    space = SearchSpace.load(calibration / "toy-model" / "per-token" / "space.yaml")
    assert [g.layers for g in space.groups] == [(0, 1, 4), (2, 5), (3,)]
    assert space.size == 125


def test_prune_with_no_options_stays_under_100000_configs(calibration, capsys):
    rc, stdout, _ = run(
        ["prune", "--model", "toy-model", "--out", str(calibration), "--json"], capsys
    )
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["clustering"] == "max_size" and summary["size_after"] <= 100_000
    assert len(summary["groups"]) == 6  # 5**6 = 15,625 fits: every layer its own group


def test_prune_with_the_papers_dbscan(calibration, capsys):
    rc, stdout, _ = run(
        ["prune", "--model", "toy-model", "--out", str(calibration), "--eps", "0.05"], capsys
    )
    assert rc == 0
    assert "-> 3 groups: DBSCAN with --eps 0.05 on log10 e_o" in stdout


def test_prune_json_with_max_groups(calibration, capsys):
    sensitivity = calibration / "toy-model" / "per-token" / "sensitivity.csv"
    rc, stdout, _ = run(["prune", "--sensitivity", str(sensitivity), "--max-groups", "2", "--out", str(calibration),
                         "--json"], capsys)  # fmt: skip
    assert rc == 0
    summary = json.loads(stdout)
    assert len(summary["groups"]) <= 2
    assert summary["clustering"] == "max_groups" and summary["max_groups"] == 2
    assert summary["size_before"] == 9**6 and summary["size_pruned"] == 5**6
    assert summary["size_after"] == 5 ** len(summary["groups"])
    assert summary["space"] == str(calibration / "toy-model" / "per-token" / "space.yaml")


def test_prune_rejects_another_models_file(calibration, capsys):
    sensitivity = calibration / "toy-model" / "per-token" / "sensitivity.csv"
    rc, _, stderr = run(["prune", "--model", "smollm2-135m", "--sensitivity", str(sensitivity),
                         "--out", str(calibration)], capsys)  # fmt: skip
    assert rc == 2
    assert stderr.strip() == (
        f"kvtuner: error: {sensitivity}: calibrated for model 'toy-model', not 'smollm2-135m'"
    )
    assert not (sensitivity.parent / "space.yaml").exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("layers", "do not match num_layers 7"),
        ("metadata", "metadata file not found"),
        ("column", "missing column(s) e_o"),
    ],
)
def test_prune_broken_calibration_exits_2(calibration, capsys, breakage, message):
    folder = calibration / "toy-model" / "per-token"
    if breakage == "layers":
        meta = yaml.safe_load((folder / "metadata.yaml").read_text())
        (folder / "metadata.yaml").write_text(yaml.safe_dump({**meta, "num_layers": 7}))
    elif breakage == "metadata":
        (folder / "metadata.yaml").unlink()
    else:
        pd.read_csv(folder / "sensitivity.csv").drop(columns="e_o").to_csv(
            folder / "sensitivity.csv", index=False
        )
    rc, _, stderr = run(["prune", "--model", "toy-model", "--out", str(calibration)], capsys)
    assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (folder / "space.yaml").exists()


def test_prune_missing_calibration_and_impossible_max_groups(calibration, capsys, tmp_path):
    rc, _, stderr = run(
        ["prune", "--model", "gemma-3-270m", "--out", str(tmp_path / "nowhere")], capsys
    )
    assert rc == 2 and "sensitivity file not found (run `kvtuner calibrate` first)" in stderr
    rc, _, stderr = run(
        ["prune", "--model", "toy-model", "--scheme", "kivi", "--out", str(calibration)], capsys
    )
    assert rc == 2 and "not found" in stderr
    folder = calibration / "toy-model" / "per-token"
    table = pd.read_csv(folder / "sensitivity.csv")
    table.loc[(table.layer == 3) & (table.key_bits == 8) & (table.value_bits == 2), "e_o"] = 0.2
    table.to_csv(folder / "sensitivity.csv", index=False)
    rc, _, stderr = run(
        ["prune", "--model", "toy-model", "--max-groups", "1", "--out", str(calibration)], capsys
    )
    assert rc == 2 and "2 different pruned candidate sets" in stderr
    assert not (folder / "space.yaml").exists()


def test_layer_ranges():
    from kvtuner.cli.prune import layer_ranges

    assert layer_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert layer_ranges([4]) == "4"
    assert layer_ranges([]) == ""
