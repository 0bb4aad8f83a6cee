"""The few Optuna internals kvtuner relies on, in one place (checked against Optuna 5.0 and 5.1).

- An enqueued trial keeps its parameters in the `fixed_params` system attribute.
- NSGA-II records a trial's generation in a system attribute (`get_trial_generation` sets it); a
  trial whose parameters are all fixed never calls `sample_relative`, so it is set here.
- RDB storages keep heartbeats in the `trial_heartbeats` table; a trial killed before its first
  heartbeat has no row there and Optuna never finds it stale.
- `fail_stale_trials` is experimental and warns on every call.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import optuna
from optuna.samplers import BaseGASampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

FIXED_PARAMS = "fixed_params"


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask()` without Optuna's warning that heartbeats are meant for `optimize` (we beat)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def fixed_params(trial: FrozenTrial) -> dict[str, Any] | None:
    """The parameters an enqueued trial was given (None for a sampled trial)."""
    return trial.system_attrs.get(FIXED_PARAMS)


def planned_params(trial: FrozenTrial) -> dict[str, Any]:
    """What a trial evaluates or will evaluate: its fixed parameters, else those suggested so far."""
    return fixed_params(trial) or trial.params


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage's id of a trial (numbers count per study, ids across the storage)."""
    return trial._trial_id


def frozen(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """The trial as stored now (params, attributes, state)."""
    return study._storage.get_trial(trial_id)


def set_system_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    """A system attribute on a trial (Optuna no longer offers it on `Trial`)."""
    study._storage.set_trial_system_attr(trial_id, key, value)


def enqueue(
    study: optuna.Study,
    params: dict[str, Any],
    user_attrs: dict[str, Any] | None = None,
    system_attrs: dict[str, Any] | None = None,
) -> None:
    """`study.enqueue_trial` that also keeps extra system attributes (a retry's history)."""
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            system_attrs={**(system_attrs or {}), FIXED_PARAMS: dict(params)},
            user_attrs=user_attrs or {},
        )
    )


def join_generation(study: optuna.Study, trial: FrozenTrial) -> None:
    """Give an enqueued trial its NSGA-II generation (sampled ones got it when sampled)."""
    sampler = study.sampler
    if isinstance(sampler, BaseGASampler) and sampler.population_size is not None:
        sampler.get_trial_generation(study, trial)


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check: stale RUNNING trials become FAIL and the storage's callback runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def rdb_storage(study: optuna.Study) -> RDBStorage | None:
    """The RDB storage under `study` (Optuna wraps it in a cache), or None for other storages."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, RDBStorage) else None


def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between heartbeats, None when the storage records none (journal, in-memory)."""
    getter = getattr(study._storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


def grace_period(storage: RDBStorage) -> int:
    """Seconds after the last heartbeat at which a trial is stale (Optuna's default: 2 intervals)."""
    return storage.grace_period or 2 * (storage.heartbeat_interval or 0)


def running_without_heartbeat(study: optuna.Study) -> set[int]:
    """Trial ids of RUNNING trials of `study` that never recorded a heartbeat (RDB storages)."""
    storage = rdb_storage(study)
    if storage is None:
        return set()
    from optuna.storages._rdb import models
    from sqlalchemy import select

    trials, beats = models.TrialModel, models.TrialHeartbeatModel
    query = (
        select(trials.trial_id)
        .outerjoin(beats, beats.trial_id == trials.trial_id)
        .where(trials.study_id == study._study_id)
        .where(trials.state == TrialState.RUNNING)
        .where(beats.trial_heartbeat_id.is_(None))
    )
    with storage.engine.connect() as connection:
        return {row[0] for row in connection.execute(query)}


def fail_trial(study: optuna.Study, trial_id: int) -> FrozenTrial | None:
    """Mark a RUNNING trial FAIL and run the storage's stale-trial callback (the retry) on it.

    Returns the failed trial, or None when another process finished or failed it first.
    """
    storage = study._storage
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    trial = storage.get_trial(trial_id)
    getter = getattr(storage, "get_heartbeat_stale_trial_callback", None)
    callback = getter() if getter is not None else None
    if callback is not None:
        callback(study, trial)
    return trial


class Heartbeat:
    """Records the heartbeat of one trial every interval in a thread; a failed write is retried
    at the next beat (the main thread reports a lost database), never printed as a traceback."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study._storage
        self.trial_id = trial_id
        self.interval = heartbeat_interval(study)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval is not None:
            self._beat()  # before the thread starts: a trial without a heartbeat is never stale
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the database is away; the trial's own writes will say so
                pass

    def _beat(self) -> None:
        self.storage.record_heartbeat(self.trial_id)
