"""Dead workers without a database server: retry of a failed trial, local reaping, silent trials."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from kvtuner.search import optuna_compat as compat
from kvtuner.search.faults import (
    WORKER_KEY,
    SilentTrials,
    mark_worker,
    process_exists,
    reap_dead_local_workers,
    this_worker,
)
from kvtuner.search.study import open_storage, open_study

from .test_study import SIGNATURE


@pytest.fixture
def study(tmp_path, monkeypatch) -> optuna.Study:
    monkeypatch.setenv("KVTUNER_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("KVTUNER_GRACE_SECONDS", "1")
    return open_study(open_storage(str(tmp_path / "s.db")), "st", SIGNATURE)


def running_trial(study: optuna.Study, seed: str | None = None) -> optuna.Trial:
    """A RUNNING trial with both params suggested, as a worker leaves it when it dies."""
    if seed is not None:
        compat.enqueue(study, {"g0": "KV4", "g1": "KV2"}, user_attrs={"seed": seed})
    trial = compat.ask(study)
    for name in ("g0", "g1"):
        trial.suggest_categorical(name, ["KV4", "KV2"])
    return trial


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_failed_trial_is_queued_again_with_its_history(study):
    trial = running_trial(study, seed="uniform")
    failed = compat.fail_trial(study, compat.trial_id(trial))
    assert failed is not None and failed.state == TrialState.FAIL
    assert compat.fail_trial(study, compat.trial_id(trial)) is None  # already failed
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert compat.fixed_params(retry) == trial.params == {"g0": "KV4", "g1": "KV2"}
    assert retry.system_attrs["failed_trial"] == trial.number
    assert retry.system_attrs["retry_history"] == [trial.number]
    assert retry.user_attrs == {"seed": "uniform"}


def test_a_trial_without_a_config_is_not_queued_again(study):
    compat.fail_trial(study, compat.trial_id(compat.ask(study)))  # died before suggesting
    assert study.get_trials(states=(TrialState.WAITING,)) == []


def test_a_config_that_keeps_killing_workers_is_given_up(study):
    compat.fail_trial(study, compat.trial_id(running_trial(study)))
    for _ in range(3):  # three retries, each killed again
        (retry,) = study.get_trials(states=(TrialState.WAITING,))
        popped = compat.ask(study)
        assert popped.number == retry.number
        compat.fail_trial(study, compat.trial_id(popped))
    assert study.get_trials(states=(TrialState.WAITING,)) == []


def test_trials_of_dead_local_workers_are_failed_at_once(study):
    alive = running_trial(study)
    mark_worker(study, compat.trial_id(alive))
    dead = running_trial(study)
    owner = {**this_worker(), "pid": dead_pid()}
    compat.set_system_attr(study, compat.trial_id(dead), WORKER_KEY, owner)
    elsewhere = running_trial(study)
    compat.set_system_attr(study, compat.trial_id(elsewhere), WORKER_KEY, {**owner, "host": "x"})
    assert reap_dead_local_workers(study) == 1
    states = {t.number: t.state for t in study.trials}
    assert states[alive.number] == TrialState.RUNNING
    assert states[dead.number] == TrialState.FAIL
    assert states[elsewhere.number] == TrialState.RUNNING  # only its heartbeat can tell


def test_a_zombie_process_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while process_exists(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_exists(child.pid)  # exited, not yet reaped by its parent
    child.wait()
    assert process_exists(this_worker()["pid"])


def test_a_trial_without_any_heartbeat_is_failed_after_the_grace_period(study):
    silent = running_trial(study)  # asked, never beat: Optuna's heartbeat check skips it
    with compat.Heartbeat(study, compat.trial_id(running_trial(study))):
        watch = SilentTrials(study)
        assert watch.sweep() == 0
        compat.fail_stale_trials(study)
        assert study.trials[silent.number].state == TrialState.RUNNING
        time.sleep(1.2)
        assert watch.sweep() == 1
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.FAIL, TrialState.RUNNING]
    assert states[2:] == [TrialState.WAITING]
