"""Worker faults: which process runs a trial, queueing a dead worker's config again, finding dead workers.

A trial whose worker died (SIGKILL, machine gone) stays RUNNING in the storage. Three ways find it:
Optuna's heartbeat (no heartbeat for the grace period: another worker fails it), a trial that never
sent a heartbeat (watched here for the grace period), and, at once, a trial whose worker process ran
on this machine and no longer exists. A failed trial's config is queued again (`RetryStaleTrial`),
so another worker evaluates it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from kvtuner.search import optuna_compat as compat

WORKER_KEY = "kvtuner:worker"  # system attribute: {"host", "boot", "pid"} of the running process
MAX_RETRY = 3  # a config that killed its worker this often is given up (the total is still reached)


def this_worker() -> dict[str, object]:
    """Host name, boot id (tells machines with the same host name apart) and process id."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}


def _boot_id() -> str:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.is_file() else ""


def process_exists(pid: int) -> bool:
    """True while `pid` runs on this machine (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class RetryStaleTrial:
    """Stale-trial callback of the storage: queue the failed trial's config again, with its history.

    Like Optuna's `RetryHeartbeatStaleTrialCallback`, but the retry is an ordinary enqueued trial
    (`fixed_params`) that keeps only the seed kind among the user attributes.
    """

    max_retry: int = MAX_RETRY

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        params = compat.planned_params(trial)
        if not params:  # died before it had a config: nothing to run again
            return
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > self.max_retry:
            return
        user_attrs = {k: trial.user_attrs[k] for k in ("seed",) if k in trial.user_attrs}
        system_attrs = {"failed_trial": history[0], "retry_history": history}
        compat.enqueue(study, params, user_attrs, system_attrs)


def reap_dead_local_workers(study: optuna.Study) -> int:
    """Fail (and so retry) RUNNING trials whose worker ran on this machine and is gone; returns how many."""
    me = this_worker()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(WORKER_KEY)
        if not owner or owner.get("host") != me["host"] or owner.get("boot") != me["boot"]:
            continue
        if owner.get("pid") != me["pid"] and not process_exists(int(owner["pid"])):
            failed += compat.fail_trial(study, compat.trial_id(trial)) is not None
    return failed


@dataclass
class SilentTrials:
    """RUNNING trials that never sent a heartbeat, failed once this process has seen them for the grace period.

    Optuna's heartbeat check skips them; the grace period is timed on this machine's clock, so
    clocks of other machines do not matter.
    """

    study: optuna.Study
    first_seen: dict[int, float] = field(default_factory=dict)

    def sweep(self) -> int:
        storage = compat.rdb_storage(self.study)
        if storage is None or storage.heartbeat_interval is None:
            return 0
        now = time.monotonic()
        silent = compat.running_without_heartbeat(self.study)
        self.first_seen = {t: self.first_seen.get(t, now) for t in silent}
        failed = 0
        for trial_id, since in list(self.first_seen.items()):
            if now - since > compat.grace_period(storage):
                failed += compat.fail_trial(self.study, trial_id) is not None
                del self.first_seen[trial_id]
        return failed


def mark_worker(study: optuna.Study, trial_id: int) -> None:
    """Record which process runs the trial (read by `reap_dead_local_workers`)."""
    compat.set_system_attr(study, trial_id, WORKER_KEY, this_worker())
