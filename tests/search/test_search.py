"""End-to-end searches on a tiny model: both backends, caps respected, resume, workers, export files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from transformers import AutoConfig

from kvtuner.compat import model_shape
from kvtuner.config import load_config
from kvtuner.search import SearchSettings, run_search
from kvtuner.search.export import config_filename, export_study
from kvtuner.search.problem import layers_key
from kvtuner.search.study import completed_trials, open_storage

from .tiny import TINY_LAYERS

CAPS = (3.0, 3.5, 4.0, 6.0)


def settings(checkpoint: Path, **kwargs) -> SearchSettings:
    """The paper's setting: the grouped space of `kvtuner prune`, caps on equivalent bits."""
    base = dict(model=str(checkpoint), objective="proxy", trials=14, population=4, caps=CAPS,
                space="groups", budget="equivalent")  # fmt: skip
    return SearchSettings(**{**base, **kwargs})


def check_outputs(out: Path, caps=CAPS) -> pd.DataFrame:
    """pareto.csv is a front (bits up, loss down), and each YAML loads, is under its cap and best there."""
    front = pd.read_csv(out / "pareto.csv")
    assert (out / "pareto.png").stat().st_size > 10_000
    assert list(front.columns[:4]) == ["bits", "equivalent_bits", "effective_bits", "proxy"]
    assert front["bits"].is_monotonic_increasing
    assert front["proxy"].is_monotonic_decreasing
    assert set(front["source"]) <= {"uniform", "knapsack", "greedy", "nsga"}
    for cap in caps:
        cfg = load_config(out / config_filename(cap), num_layers=TINY_LAYERS)
        assert cfg.equivalent_bits <= cap
        best_on_front = front[front["bits"] <= cap]["proxy"].min()
        assert cfg.metadata["value"] == pytest.approx(best_on_front, rel=1e-5)
        assert cfg.metadata["objective"] == "proxy" and cfg.metadata["model"] == "tiny-llama"
        assert cfg.metadata["found_by"].startswith("kvtuner search")
    return front


@pytest.mark.parametrize("backend", ["optuna", "pymoo"])
def test_backend_finds_the_front_and_exports_under_caps(workdir, tiny_checkpoint, backend):
    outcome = run_search(settings(tiny_checkpoint, backend=backend), quiet=True)
    out = workdir / "searched_configs" / "tiny-llama" / "per-token"
    assert outcome.trials == 14 and outcome.new_trials == 14
    assert outcome.export.out_dir.resolve() == out
    front = check_outputs(out)
    # uniform configs are seeded: every one under the cap is evaluated and KV2, the cheapest, is on the front
    assert {"KV8", "K8V4", "KV4", "K4V2", "KV2"} <= set(outcome.export.front["uniform"]) | {"KV8"}
    assert front["bits"].min() == 2.0
    # the proxy is additive: the mixed 3.5-bit config beats uniform K4V2 (3.0) and costs less than KV4
    assert (
        front[front["bits"] == 3.5]["proxy"].item()
        < front[front["uniform"] == "K4V2"]["proxy"].item()
    )
    study = optuna.load_study(
        study_name=outcome.study_name, storage=open_storage(str(out / "study.db"))
    )
    keys = [
        t.user_attrs["layers"]
        for t in completed_trials(study)
        if "duplicate_of" not in t.user_attrs
    ]
    assert len(keys) == len(set(keys)), "a config was evaluated twice"


def test_constraint_keeps_proposals_under_the_cap(workdir, tiny_checkpoint):
    outcome = run_search(settings(tiny_checkpoint, caps=(3.0,), trials=16), quiet=True)
    study = optuna.load_study(
        study_name=outcome.study_name,
        storage=open_storage(str(outcome.export.out_dir / "study.db")),
    )
    trials = completed_trials(study)
    assert all(t.constraints["bits"] == pytest.approx(t.values[1] - 3.0) for t in trials)
    sampled = [t for t in trials if "seed" not in t.user_attrs]
    assert sampled and all(t.values[1] <= 3.0 for t in sampled)
    check_outputs(outcome.export.out_dir, caps=(3.0,))


def test_rerun_continues_the_study(workdir, tiny_checkpoint):
    first = run_search(settings(tiny_checkpoint, trials=6), quiet=True)
    second = run_search(settings(tiny_checkpoint, trials=11), quiet=True)
    third = run_search(settings(tiny_checkpoint, trials=11), quiet=True)
    assert (first.trials, second.trials, second.new_trials, third.new_trials) == (6, 11, 5, 0)
    study = optuna.load_study(
        study_name=first.study_name, storage=open_storage(str(first.export.out_dir / "study.db"))
    )
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))


def completed_in_sqlite(path: Path) -> int:
    """Completed trials, read with plain sqlite3 (an Optuna storage would create tables mid-run)."""
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_search_resumes(workdir, tiny_checkpoint, monkeypatch):
    """SIGKILL a search after a few trials; the same command again keeps them and counts on."""
    # killed before it recorded its process, the trial waits for the grace period: keep it short
    monkeypatch.setenv("KVTUNER_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("KVTUNER_GRACE_SECONDS", "3")
    out = workdir / "searched_configs" / "tiny-llama" / "per-token"
    argv = [
        "search",
        "--model",
        str(tiny_checkpoint),
        "--objective",
        "proxy",
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
    code = "import sys; from kvtuner.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--trials", "5000"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and done < 8:
            time.sleep(0.2)
            done = completed_in_sqlite(out / "study.db")
    finally:  # also when pytest itself is interrupted: never leave the search running
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert done >= 8, "the search did not get going"
    killed_at = completed_in_sqlite(out / "study.db")
    assert killed_at < 5000
    outcome = run_search(settings(tiny_checkpoint, trials=killed_at + 4), quiet=True)
    assert outcome.trials == killed_at + 4 and outcome.new_trials == 4


def test_two_workers_share_one_journal_study(workdir, tiny_checkpoint):
    journal = workdir / "study.journal"
    outcome = run_search(
        settings(tiny_checkpoint, trials=20, workers=2, storage=str(journal)), quiet=True
    )
    assert outcome.trials == 20  # exactly: a worker starts a trial only while a slot is free
    study = optuna.load_study(study_name=outcome.study_name, storage=open_storage(str(journal)))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    evaluated_by = {
        t.user_attrs["worker"]
        for t in completed_trials(study)
        if "duplicate_of" not in t.user_attrs
    }
    assert evaluated_by and not any(w.endswith(f":{os.getpid()}") for w in evaluated_by)
    check_outputs(outcome.export.out_dir)


def test_kl_objective_on_the_real_cache(workdir, tiny_checkpoint):
    outcome = run_search(
        settings(
            tiny_checkpoint,
            objective="kl",
            trials=7,
            samples=2,
            context=24,
            continuation=8,
            chunk=4,
            caps=(3.0, 6.0),
            rescore_samples=0,
        ),
        quiet=True,
    )
    front = pd.read_csv(outcome.export.out_dir / "pareto.csv")
    assert {"kl", "ppl"} <= set(front.columns)
    assert (front["kl"] >= 0).all() and front["kl"].is_monotonic_decreasing
    kv2 = front[front["uniform"] == "KV2"]
    assert len(kv2) == 1 and kv2["kl"].item() > front["kl"].min()


def test_export_is_repeatable(workdir, tiny_checkpoint):
    outcome = run_search(settings(tiny_checkpoint, trials=8), quiet=True)
    study = optuna.load_study(
        study_name=outcome.study_name,
        storage=open_storage(str(outcome.export.out_dir / "study.db")),
    )
    again = export_study(study, workdir / "again", caps=(2.0, 5.0))
    assert [c.cap for c in again.choices] == [2.0, 5.0]
    assert load_config(workdir / "again" / "kvtuner_c2.0.yaml").equivalent_bits == 2.0


def test_missing_space_runs_calibrate_and_prune_first(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    outcome = run_search(settings(tiny_checkpoint, trials=6, max_size=25), quiet=True)
    folder = tmp_path / "calibration" / "tiny-llama" / "per-token"
    assert (folder / "sensitivity.csv").is_file() and (folder / "space.yaml").is_file()
    assert (folder / "layer_kl.csv").is_file()
    assert outcome.space_size <= 25 and outcome.trials == 6


def test_default_search_starts_from_the_knapsack_front_and_rescores(workdir, tiny_checkpoint):
    """Per-layer space, caps on effective bits, the knapsack's configs seeded, candidates re-scored."""
    caps = (4.5, 6.5)
    outcome = run_search(
        SearchSettings(model=str(tiny_checkpoint), caps=caps, trials=12, population=4, samples=2,
                       context=24, continuation=8, chunk=4, rescore_samples=2, rescore_top=2),
        quiet=True,
    )  # fmt: skip
    out = outcome.export.out_dir
    assert outcome.groups == TINY_LAYERS  # one variable per layer
    study = optuna.load_study(
        study_name=outcome.study_name, storage=open_storage(str(out / "study.db"))
    )
    sources = {t.user_attrs.get("seed", "nsga") for t in completed_trials(study)}
    assert {"uniform", "knapsack"} <= sources
    rescored = study.user_attrs["rescored"]
    front = pd.read_csv(out / "pareto.csv")
    assert front["bits"].is_monotonic_increasing and "source" in front.columns
    shape = model_shape(AutoConfig.from_pretrained(tiny_checkpoint))
    for cap in caps:
        cfg = load_config(out / config_filename(cap), num_layers=TINY_LAYERS)
        assert cfg.effective_bits(shape, 4096) <= cap + 1e-9
        assert cfg.metadata["budget"] == "effective" and cfg.metadata["rescored_samples"] == 2
        assert cfg.metadata["value"] == pytest.approx(rescored[layers_key(cfg.layers)]["loss"])
