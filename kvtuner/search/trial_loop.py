"""Run trials until a study holds exactly `total` completed ones, however many workers share it.

A worker starts a trial only while completed + running < total. Once the trial has its config it
counts again (another worker may have started one at the same moment) and backs off (the trial is
PRUNED, a queued config goes back in the queue) when the study would pass the total, when a
running trial with a lower number already evaluates the same config, or when a queued config was
completed meanwhile (workers starting together may queue the same seeds). When no trial may start, it
polls until the study is complete: stale trials (heartbeat), trials of dead workers on this machine
and trials that never sent a heartbeat are failed, their configs queued again and picked up here.
Storages without heartbeats (journal files) cannot tell a slow worker from a dead one elsewhere, so
there a worker stops once nothing is left for it to start.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kvtuner.search import optuna_compat as compat
from kvtuner.search.faults import SilentTrials, mark_worker, reap_dead_local_workers

POLL_SECONDS = 2.0


@dataclass
class TrialLoop:
    """`suggest` sets a trial's params and returns its dedupe key; `evaluate` returns its values."""

    study: optuna.Study
    total: int
    suggest: Callable[[optuna.Trial], str]
    evaluate: Callable[[optuna.Trial], list[float]]
    key_of: Callable[[dict[str, Any]], str | None]
    on_change: Callable[[], None] | None = None
    poll: float = POLL_SECONDS

    def run(self) -> None:
        """Run trials, or wait for other workers' trials, until `total` trials are complete."""
        silent = SilentTrials(self.study)
        heartbeats = compat.heartbeat_interval(self.study) is not None
        reap_dead_local_workers(self.study)
        while True:
            compat.fail_stale_trials(self.study)  # as Optuna's optimize does before each trial
            counts = self._counts()
            if counts[TrialState.COMPLETE] >= self.total:
                return
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] < self.total:
                if self._one_trial() and self.on_change is not None:
                    self.on_change()
                continue
            # no free slot: the running trials finish, or some fail and are queued again
            freed = reap_dead_local_workers(self.study) + silent.sweep()
            if freed:
                continue
            if not heartbeats:
                return
            if self.on_change is not None:
                self.on_change()
            time.sleep(self.poll * random.uniform(0.5, 1.5))

    def _counts(self) -> Counter:
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        return Counter(t.state for t in self.study.get_trials(deepcopy=False, states=states))

    def _one_trial(self) -> bool:
        """Ask, claim and evaluate one trial; True when it completed."""
        study = self.study
        trial = compat.ask(study)
        trial_id = compat.trial_id(trial)
        mark_worker(study, trial_id)  # first: a dead local worker's trial is then failed at once
        with compat.Heartbeat(study, trial_id):
            try:
                key = self.suggest(trial)
                frozen = compat.frozen(study, trial_id)
                compat.join_generation(study, frozen)
                queued = compat.fixed_params(frozen) is not None
                reason = self._conflict(trial.number, key, queued)
                if reason is not None:
                    self._back_off(trial, frozen, reason)
                    return False
                values = self.evaluate(trial)
            except KeyboardInterrupt:
                compat.fail_trial(study, trial_id)  # queued again for the next run
                raise
            except Exception:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
        # skip: the heartbeat check of another worker took this trial for dead and failed it
        return study.tell(trial, values, skip_if_finished=True).state == TrialState.COMPLETE

    def _conflict(self, number: int, key: str, queued: bool) -> str | None:
        """Why this trial must not run: the study would pass its total, its config already runs
        in a trial with a lower number, or (a queued config, enqueued twice by workers starting
        together) it is already completed."""
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)
        )
        if len(trials) > self.total:
            return "total"
        for other in trials:
            if other.number == number or self.key_of(compat.planned_params(other)) != key:
                continue
            if other.state == TrialState.RUNNING and other.number < number:
                return f"same config as trial {other.number}"
            if other.state == TrialState.COMPLETE and queued:
                return f"already completed as trial {other.number}"
        return None

    def _back_off(self, trial: optuna.Trial, frozen: FrozenTrial, reason: str) -> None:
        trial.set_user_attr("backed_off", reason)
        self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        params = compat.fixed_params(frozen)
        if params is not None and reason == "total":  # a queued config waits for the next free slot
            keep = ("failed_trial", "retry_history")
            system_attrs = {k: frozen.system_attrs[k] for k in keep if k in frozen.system_attrs}
            user_attrs = {k: frozen.user_attrs[k] for k in ("seed",) if k in frozen.user_attrs}
            compat.enqueue(self.study, params, user_attrs, system_attrs)
