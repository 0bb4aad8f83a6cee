"""Storage URLs, study signatures and seeding of the queue."""

from __future__ import annotations

import json
import sys

import optuna
import pytest

from kvtuner.errors import ConfigError
from kvtuner.precision import parse_pair
from kvtuner.search.problem import SearchProblem
from kvtuner.search.study import (
    StudySignature,
    enqueue_seeds,
    evaluation_difference,
    open_storage,
    open_study,
    redact,
    scrub,
)
from kvtuner.space import LayerGroup, SearchSpace

from .tiny import PRUNED

SIGNATURE = StudySignature(
    model="m",
    scheme="per-token",
    objective="proxy",
    num_layers=2,
    space="abc",
    cap=6.0,
    evaluation="{}",
)


def test_storage_kinds(tmp_path):
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalStorage

    assert isinstance(open_storage(str(tmp_path / "s.db")), RDBStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'u.db'}"), RDBStorage)
    assert isinstance(open_storage(str(tmp_path / "s.journal")), JournalStorage)
    assert isinstance(open_storage(f"journal:///{tmp_path / 'u.journal'}"), JournalStorage)
    assert (tmp_path / "u.journal").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:////no/such/folder/s.db", "folder /no/such/folder does not exist"),
        ("journal:////no/such/folder/s.journal", "does not exist"),
        (
            "postgresql://kv:secret@127.0.0.1:1/db",
            r"--storage postgresql://kv:\*\*\*@127.0.0.1:1/db",
        ),
        ("notastorage", "not a storage URL"),
    ],
)
def test_unreachable_storage_is_one_line(url, message):
    with pytest.raises(ConfigError, match=message) as info:
        open_storage(url)
    assert "\n" not in str(info.value)
    assert "secret" not in str(info.value)


def test_redact():
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"


def test_signature_mismatch_is_refused_and_study_untouched(tmp_path):
    storage = open_storage(str(tmp_path / "s.db"))
    open_study(storage, "st", SIGNATURE)
    for field, value in (
        ("model", "other"),
        ("space", "zzz"),
        ("cap", 7.0),
        ("evaluation", '{"samples": 9}'),
    ):
        changed = StudySignature(**{**SIGNATURE.__dict__, field: value})
        with pytest.raises(ConfigError, match=f"study 'st' in here: {field}:"):
            open_study(storage, "st", changed, where="here")
    lower_cap = StudySignature(**{**SIGNATURE.__dict__, "cap": 4.0})
    study = open_study(storage, "st", lower_cap)
    assert study.user_attrs["cap"] == 6.0 and study.user_attrs["model"] == "m"
    assert len(study.trials) == 0


def test_enqueue_seeds_skips_known_configs(tmp_path):
    sp = SearchSpace(
        model="m",
        scheme="per-token",
        num_layers=2,
        groups=(LayerGroup((0,), PRUNED), LayerGroup((1,), PRUNED)),
    )
    problem = SearchProblem(sp, cap=6.0)
    storage = open_storage(str(tmp_path / "s.db"))
    study = open_study(storage, "st", SIGNATURE)
    seeds = [(parse_pair("KV4"), parse_pair("KV4")), (parse_pair("KV2"), parse_pair("KV2"))]
    assert enqueue_seeds(study, problem, seeds, ["uniform", "uniform"]) == 2
    assert enqueue_seeds(study, problem, seeds, ["uniform", "uniform"]) == 0
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["seed"] for t in waiting] == ["uniform", "uniform"]


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+psycopg://u:p@h:5433/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
    ],
)
def test_postgres_urls_use_psycopg_3(url, target):
    from kvtuner.search.study import _classify

    assert _classify(url) == ("postgresql", target)


def test_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    with pytest.raises(
        ConfigError, match=r'psycopg is not installed; pip install "kvtuner\[postgres\]"'
    ):
        open_storage("postgresql://kv:secret@127.0.0.1:1/db")


def test_scrub_removes_the_password_however_it_is_written():
    url = "postgresql://kv:p%40ss@h/db"
    text = "failed for postgresql://kv:p%40ss@h/db with password p@ss (p%40ss)"
    assert scrub(text, url) == "failed for postgresql://kv:***@h/db with password *** (***)"
    assert redact("x postgresql://kv:pw@h/db and mysql://a:b@c/d") == (
        "x postgresql://kv:***@h/db and mysql://a:***@c/d"
    )


@pytest.mark.parametrize("value", ["0", "-3", "ten", "1.5"])
def test_heartbeat_settings_must_be_whole_seconds(tmp_path, monkeypatch, value):
    monkeypatch.setenv("KVTUNER_GRACE_SECONDS", value)
    with pytest.raises(ConfigError, match=f"KVTUNER_GRACE_SECONDS must be .*; got '{value}'"):
        open_storage(str(tmp_path / "s.db"))


def test_heartbeat_settings_reach_the_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTUNER_HEARTBEAT_SECONDS", "2")
    storage = open_storage(str(tmp_path / "s.db"))
    assert (storage.heartbeat_interval, storage.grace_period) == (2, 120)


def test_evaluation_records_device_and_dtype_and_old_studies_still_match():
    from kvtuner.search import SearchSettings

    cpu = json.loads(SearchSettings().evaluation())
    assert (cpu["device"], cpu["dtype"]) == ("cpu", "float32")
    assert "dtype" not in json.loads(SearchSettings(objective="proxy").evaluation())
    # before devices and dtypes were resolved: `dtype: default`, no device
    legacy = json.dumps({**{k: v for k, v in cpu.items() if k != "device"}, "dtype": "default"})
    assert evaluation_difference(legacy, SearchSettings().evaluation()) is None
    bf16 = SearchSettings(dtype="bfloat16").evaluation()
    assert evaluation_difference(legacy, bf16) == ("dtype", "default", "bfloat16")
    assert evaluation_difference(SearchSettings().evaluation(), bf16) == (
        "dtype",
        "float32",
        "bfloat16",
    )
    proxy = SearchSettings(objective="proxy").evaluation()
    old_proxy = json.dumps({**json.loads(proxy), "dtype": "default"})
    assert evaluation_difference(old_proxy, proxy) is None
    # a study on another budget is another search
    equivalent = SearchSettings(budget="equivalent").evaluation()
    assert evaluation_difference(equivalent, SearchSettings().evaluation())[0] == "budget"


def test_a_study_whose_creator_has_not_yet_written_its_signature_is_waited_for(tmp_path):
    """Workers starting together: one creates the study, another opens it before the signature."""
    import threading
    import time

    storage = open_storage(str(tmp_path / "s.db"))
    created = optuna.create_study(study_name="st", storage=storage, directions=["minimize"] * 2)

    def creator_finishes() -> None:  # what open_study does after creating
        time.sleep(0.5)
        for key, value in {**SIGNATURE.__dict__, "kvtuner_study": 1}.items():
            created.set_user_attr(key, value)

    thread = threading.Thread(target=creator_finishes)
    thread.start()
    study = open_study(storage, "st", SIGNATURE, where="here")
    thread.join()
    assert study.user_attrs["kvtuner_study"] == 1 and study.user_attrs["model"] == "m"


def test_export_keeps_the_exact_knapsack_unless_another_config_is_clearly_better():
    import pandas as pd

    from kvtuner.search.export import best_under

    frame = pd.DataFrame(
        {
            "trial": [0, 1, 2],
            "loss": [0.30, 0.20, 0.25],
            "bits": [4.0, 3.9, 3.8],
            "layers": ["A", "B", "C"],
            "rescored_loss": [1.0, 0.98, 0.55],
        }
    )
    rescored = {
        "A": {"per_sample": [1.0, 1.2, 0.8, 1.0]},
        "B": {"per_sample": [0.9, 1.3, 0.7, 1.02]},  # lower mean, inside one standard error
        "C": {"per_sample": [0.5, 0.7, 0.4, 0.6]},  # better on every sample
    }
    assert best_under(frame, 4.0, "A", rescored)["layers"] == "C"
    # B ties: the anchor stays
    assert best_under(frame.iloc[:2], 4.0, "A", rescored)["layers"] == "A"
    assert best_under(frame.iloc[:2], 4.0, None, rescored)["layers"] == "B"  # no anchor: the lowest
    assert best_under(frame, 3.85, "A", rescored)["layers"] == "C"  # A over the cap
