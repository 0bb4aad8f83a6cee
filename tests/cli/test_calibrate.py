"""`kvtuner calibrate` on a tiny local model folder; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from conftest import save_tiny_folder

from kvtuner.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (GQA, 4 layers, 512 positions) with a word-level tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_tiny_folder(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(3000)))
    return path


def run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_calibrate_tiny_model_json(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "calibration"
    args = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_file), "--samples", "3",
            "--seq-len", "64", "--query-tokens", "8", "--layer-kl-samples", "3",
            "--layer-kl-context", "40", "--additivity", "4", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, _ = run(args, capsys)
    assert rc == 0
    summary = json.loads(stdout)
    folder = out / "tiny-llama" / "per-token"
    assert summary["files"]["sensitivity"] == str(folder / "sensitivity.csv")
    assert sorted(p.name for p in folder.iterdir()) == [
        "additivity.csv",
        "heatmap.png",
        "layer_kl.csv",
        "layer_kl.png",
        "metadata.yaml",
        "sensitivity.csv",
    ]
    assert len(pd.read_csv(folder / "sensitivity.csv")) == 4 * 9
    assert summary["e_o"]["KV8"]["max"] < summary["e_o"]["KV2"]["min"]
    kl = pd.read_csv(folder / "layer_kl.csv")
    assert set(kl.layer) == {0, 1, 2, 3} and (kl.kl >= 0).all()
    assert len(pd.read_csv(folder / "additivity.csv")) == 4
    assert -1 <= summary["layer_kl"]["spearman_summed_joint"] <= 1


def test_calibrate_kivi_prints_both_rank_checks(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "calibration"
    args = ["calibrate", "--model", str(tiny_model_dir), "--scheme", "kivi", "--text", str(text_file),
            "--samples", "2", "--seq-len", "96", "--query-tokens", "16", "--group-size", "16",
            "--block-size", "16", "--residual-length", "16", "--bits", "2,8",
            "--layer-kl-samples", "2", "--layer-kl-context", "60", "--additivity", "3",
            "--out", str(out)]  # fmt: skip
    rc, stdout, _ = run(args, capsys)
    assert rc == 0
    assert "Spearman(e_o, single-layer KL) over layers and pairs = " in stdout
    assert "additivity: Spearman(summed single-layer KL, joint KL) over 3 random configs" in stdout
    folder = out / "tiny-llama" / "kivi"
    table = pd.read_csv(folder / "sensitivity.csv")
    assert len(table) == 4 * 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seq-len", "1000"], "--seq-len 1000 is longer than the model allows (512 positions)"),
        (["--bits", "2,3"], "--bits must be drawn from 2, 4, 8, 16"),
        (["--samples", "50", "--seq-len", "128"], "too short for 50 samples of 128 tokens"),
        (["--text", "EMPTY"], "the text is empty"),
        (["--text", "MISSING"], "text file not found"),
        (["--scheme", "int4"], "--scheme must be one of per-token, kivi"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tiny_model_dir, text_file, tmp_path, capsys, extra, message
):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    extra = [
        str(empty) if x == "EMPTY" else str(tmp_path / "nope.txt") if x == "MISSING" else x
        for x in extra
    ]
    out = tmp_path / "calibration"
    args = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_file), "--samples", "2",
            "--seq-len", "64", "--query-tokens", "8", "--no-layer-kl", "--out", str(out),
            *extra]  # fmt: skip
    rc, stdout, stderr = run(args, capsys)
    assert rc == 2
    assert message in stderr
    # one error line, the last (progress lines of the model load may come before it)
    assert [x for x in stderr.splitlines() if "error" in x] == [stderr.strip().splitlines()[-1]]
    assert stderr.strip().splitlines()[-1].startswith("kvtuner: error: ")
    assert not out.exists()


@pytest.mark.slow
def test_gemma_calibration_is_monotone_and_prunes_to_a_small_space(tmp_path, capsys):
    rc, stdout, _ = run(
        ["calibrate", "--model", "gemma-3-270m", "--no-layer-kl", "--out", str(tmp_path), "--json"],
        capsys,
    )
    assert rc == 0
    table = pd.read_csv(tmp_path / "gemma-3-270m" / "per-token" / "sensitivity.csv")
    wide = table.pivot(index="layer", columns=["key_bits", "value_bits"], values="e_o")
    assert len(wide) == 18
    assert (wide[(8, 8)] < wide[(4, 4)]).all() and (wide[(4, 4)] < wide[(2, 2)]).all()
    rc, stdout, _ = run(
        ["prune", "--model", "gemma-3-270m", "--out", str(tmp_path), "--json"], capsys
    )
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["size_before"] == 9**18
    assert summary["size_after"] <= 10**5


def test_context_measures_both_tables_at_the_served_context(
    tiny_model_dir, text_file, tmp_path, capsys
):
    import yaml

    out = tmp_path / "calibration"
    args = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_file), "--samples", "2",
            "--context", "96", "--query-tokens", "8", "--layer-kl-samples", "2",
            "--additivity", "0", "--out", str(out), "--json"]  # fmt: skip
    rc, stdout, _ = run(args, capsys)
    assert rc == 0
    meta = yaml.safe_load((out / "tiny-llama" / "per-token" / "metadata.yaml").read_text())
    assert meta["seq_len"] == 96 and meta["layer_kl"]["context"] == 96
