"""`kvtuner search` and `kvtuner export` on a tiny model: JSON output, files, and bad input (exit 2)."""

from __future__ import annotations

import contextlib
import io
import json

import optuna
import pytest
import yaml
from search.tiny import PRUNED, TINY_LAYERS, write_calibration, write_tiny_checkpoint  # noqa: I001

from kvtuner.cli import main
from kvtuner.search.study import open_storage
from kvtuner.space import LayerGroup, SearchSpace

STUDY = "tiny-llama-per-token-proxy"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def searched_once(tmp_path_factory, checkpoint):
    """A working folder with a calibration and a finished 10-trial proxy search (one per module:
    the tests read it, and those that try to change it check that it stayed as it was)."""
    folder = tmp_path_factory.mktemp("searched")
    write_calibration(folder / "calibration")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(folder)
        rc = main(
            [
                "search",
                "--model",
                str(checkpoint),
                "--objective",
                "proxy",
                "--trials",
                "10",
                "--population",
                "4",
                "--space",
                "groups",
                "--budget",
                "equivalent",
                "--max-bits",
                "3,3.5,4,6",
                "--json",
            ]
        )
    assert rc == 0
    return folder, json.loads(out.getvalue())


@pytest.fixture
def searched(searched_once, monkeypatch):
    monkeypatch.chdir(searched_once[0])
    return searched_once


def study_state(folder):
    storage = open_storage(
        str(folder / "searched_configs" / "tiny-llama" / "per-token" / "study.db")
    )
    study = optuna.load_study(study_name=STUDY, storage=storage)
    return len(study.trials), dict(study.user_attrs)


def test_search_json_and_files(searched):
    folder, summary = searched
    assert summary["study"] == STUDY and summary["trials"] == 10 and summary["new_trials"] == 10
    assert [c["cap"] for c in summary["configs"]] == [3.0, 3.5, 4.0, 6.0]
    assert {c["source"] for c in summary["configs"]} <= {"uniform", "knapsack", "greedy", "nsga"}
    out = folder / "searched_configs" / "tiny-llama" / "per-token"
    for c in summary["configs"]:
        assert c["equivalent_bits"] <= c["cap"]
        data = yaml.safe_load((out / f"kvtuner_c{c['cap']:.1f}.yaml").read_text())
        assert data["metadata"]["found_by"].startswith("kvtuner search --model")
        assert data["num_layers"] == TINY_LAYERS
    assert (out / "pareto.csv").is_file() and (out / "pareto.png").is_file()


def test_show_reads_the_exported_config(searched, capsys):
    folder, _ = searched
    path = folder / "searched_configs" / "tiny-llama" / "per-token" / "kvtuner_c3.5.yaml"
    assert main(["show", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["num_layers"] == TINY_LAYERS and shown["equivalent_bits"] <= 3.5


def test_export_command(searched, capsys, checkpoint):
    folder, _ = searched
    storage = str(folder / "searched_configs" / "tiny-llama" / "per-token" / "study.db")
    argv = ["export", "--model", str(checkpoint), "--objective", "proxy", "--max-bits", "2.5,5"]
    assert main([*argv, "--storage", storage, "--out", "exported", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [c["cap"] for c in summary["configs"]] == [2.5, 5.0]
    assert all(c["equivalent_bits"] <= c["cap"] for c in summary["configs"])
    assert (folder / "exported" / "kvtuner_c2.5.yaml").is_file()


def other_model_space(folder):
    groups = (LayerGroup(tuple(range(TINY_LAYERS)), PRUNED),)
    return SearchSpace(
        model="other-model", scheme="per-token", num_layers=TINY_LAYERS, groups=groups
    ).save(folder / "other.yaml")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--max-bits", "1.5"],
            "--max-bits 1.5: below the smallest config in the space (2 equivalent bits",
        ),
        (["--backend", "hyperopt"], "--backend must be one of optuna, pymoo; got 'hyperopt'"),
        (
            ["--storage", "sqlite:////no/such/dir/s.db"],
            "--storage sqlite:////no/such/dir/s.db: folder /no/such/dir does not exist",
        ),
        (
            ["--storage", "postgresql://u:pw@127.0.0.1:1/kv"],
            "--storage postgresql://u:***@127.0.0.1:1/kv",
        ),
        (["--space", "OTHER"], "model: search space is for 'other-model', not 'tiny-llama'"),
        (
            ["--samples", "3", "--objective", "kl", "--study-name", STUDY],
            f"study '{STUDY}' in sqlite:",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_study(searched, checkpoint, capsys, extra, message):
    folder, _ = searched
    before = study_state(folder)
    extra = [str(other_model_space(folder)) if x == "OTHER" else x for x in extra]
    argv = ["search", "--model", str(checkpoint), "--objective", "proxy", "--trials", "20",
            "--space", "groups", "--budget", "equivalent", *extra]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("kvtuner: error: ") and message in err
    assert err.count("\n") == 1, err
    assert study_state(folder) == before


def test_export_without_a_study_is_an_error(tmp_path, monkeypatch, capsys, checkpoint):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", str(checkpoint)]) == 2
    assert "no study there" in capsys.readouterr().err
