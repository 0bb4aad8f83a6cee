"""Storage URLs, study signatures and seeding of the queue."""

from __future__ import annotations

import optuna
import pytest

from kvtuner.errors import ConfigError
from kvtuner.precision import parse_pair
from kvtuner.search.problem import SearchProblem
from kvtuner.search.study import (
    StudySignature,
    enqueue_seeds,
    open_storage,
    open_study,
    redact,
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
