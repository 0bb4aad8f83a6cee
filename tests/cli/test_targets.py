"""`--target ENGINE` of calibrate and allocate on a tiny model: engine formats end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_config, word_tokenizer
from transformers import AutoModelForCausalLM

from kvtuner.cli import main
from kvtuner.engines.export import read_export
from kvtuner.memory import engine_effective_bits
from kvtuner.plan import load_plan


def save_folder(folder, head_dim):
    config = tiny_config("llama")
    config.head_dim = head_dim
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    save_folder(root / "tiny64", 64)
    save_folder(root / "tiny16", 16)
    rng = random.Random(0)
    (root / "words.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(8000)))
    return root


def calibrate(root, target, model="tiny64"):
    return main(["calibrate", "--model", str(root / model), "--target", target,
                 "--text", str(root / "words.txt"), "--layer-kl-samples", "2",
                 "--layer-kl-context", "40", "--out", str(root / "calibration"), "--json"])  # fmt: skip


@pytest.mark.parametrize("target", ["vllm", "llama.cpp", "modelopt", "lmdeploy"])
def test_calibrate_then_allocate_writes_what_the_engine_reads(root, target, capsys, tmp_path):
    assert calibrate(root, target) == 0
    calibrated = json.loads(capsys.readouterr().out)
    folder = root / "calibration" / "tiny64" / target
    assert (folder / "layer_kl.csv").is_file() and (folder / "kv_amax.json").is_file()
    assert len(json.loads((folder / "kv_amax.json").read_text())) == 4
    assert all(s["max"] >= s["min"] >= 0 for s in calibrated["kl"].values())
    rc = main(["allocate", "--model", str(root / "tiny64"), "--target", target,
               "--max-bits", "5,8", "--calibration", str(root / "calibration"),
               "--out", str(tmp_path), "--samples", "2", "--json"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    for row in summary["configs"]:
        if row["path"] is None:
            continue
        plan = load_plan(row["path"])
        assert plan.target == target and plan.num_layers == 4 and plan.kv_amax is not None
        assert row["effective_bits"] <= row["cap"] + 1e-9
        assert row["effective_bits"] == pytest.approx(
            engine_effective_bits(plan.layers, 64, [None] * 4, summary["context"])
        )
        assert row["heldout_kl"] >= 0 and row["uniform"]["heldout_kl"] >= 0
        engine_file = row["files"][0]
        assert read_export(engine_file, 4).layers == plan.layers
        if target == "vllm":
            assert row["command"].startswith("vllm serve ")
        if target == "llama.cpp":
            assert " -ctk " in row["command"] and " -ctv " in row["command"]
        if target == "modelopt":
            assert engine_file.endswith("hf_quant_config.json")


def test_eval_reads_an_engine_file_back(root, capsys, tmp_path):
    assert calibrate(root, "vllm") == 0
    capsys.readouterr()
    assert main(["allocate", "--model", str(root / "tiny64"), "--target", "vllm", "--max-bits",
                 "6", "--calibration", str(root / "calibration"), "--out", str(tmp_path),
                 "--no-eval", "--json"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)["configs"][0]
    for config in (row["files"][0], row["path"]):
        rc = main(["eval", "--model", str(root / "tiny64"), "--config", config,
                   "--text", str(root / "words.txt"), "--samples", "2", "--context", "40",
                   "--continuation", "8", "--json"])  # fmt: skip
        assert rc == 0
        result = json.loads(capsys.readouterr().out)
        assert result["target"] == "vllm" and result["kl"] >= 0
        assert result["effective_bits"] == pytest.approx(row["effective_bits"], rel=0.2)
    rc = main(["show", row["files"][0], "--model", str(root / "tiny64"), "--json"])
    assert rc == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["command"] == row["command"]


def test_a_format_the_model_cannot_take_is_refused_before_measuring(root, capsys):
    assert calibrate(root, "llama.cpp", model="tiny16") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tiny16" in err and "multiple of 32; this model has 16" in err
    assert not (root / "calibration" / "tiny16").exists()


def test_an_unknown_target_is_refused(root, capsys):
    assert calibrate(root, "tgi") == 2
    assert "unknown target 'tgi'" in capsys.readouterr().err


def test_search_target_seeds_with_the_knapsack_resumes_and_exports(root, capsys, tmp_path):
    assert calibrate(root, "modelopt") == 0
    capsys.readouterr()
    args = ["search", "--model", str(root / "tiny64"), "--target", "modelopt",
            "--max-bits", "6,9", "--trials", "6", "--population", "4",
            "--calibration", str(root / "calibration"), "--text", str(root / "words.txt"),
            "--samples", "2", "--continuation", "8", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["trials"] == 6
    for row in first["configs"]:
        assert row["effective_bits"] <= row["cap"] + 1e-9
        assert (tmp_path / "engine_c6.0" / "hf_quant_config.json").is_file()
    import optuna

    study = optuna.load_study(
        study_name="tiny64-modelopt", storage=f"sqlite:///{tmp_path}/study.db"
    )
    assert main(["allocate", "--model", str(root / "tiny64"), "--target", "modelopt",
                 "--max-bits", "6", "--calibration", str(root / "calibration"),
                 "--out", str(tmp_path / "k"), "--no-eval", "--json"]) == 0  # fmt: skip
    knapsack = json.loads(capsys.readouterr().out)["configs"][0]["layers"]
    assert study.trials[0].user_attrs["key"] == " ".join(knapsack)  # seeded with the knapsack
    args[args.index("--trials") + 1] = "9"  # the same storage: it continues to 9 trials
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["trials"] == 9
    assert main(["export", "--model", str(root / "tiny64"), "--target", "modelopt",
                 "--max-bits", "6", "--out", str(tmp_path), "--json"]) == 0  # fmt: skip
    exported = json.loads(capsys.readouterr().out)["configs"][0]
    plan = load_plan(exported["path"])
    assert plan.target == "modelopt" and exported["search_kl"] >= 0
    assert main(["export", "--model", str(root / "tiny64"), "--target", "vllm",
                 "--study-name", "tiny64-modelopt", "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "searched for target 'modelopt', not 'vllm'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--samples", "3"], "--samples"),
        (["--scheme", "kivi", "--no-smooth"], "--scheme, --smooth"),
    ],
)
def test_e_o_options_with_a_target_are_refused_not_ignored(root, capsys, extra, named):
    args = ["calibrate", "--model", str(root / "tiny64"), "--target", "vllm", *extra,
            "--text", str(root / "words.txt"), "--out", str(root / "refused")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"kvtuner: error: {named}: not used with --target"
    )
    assert not (root / "refused").exists()
