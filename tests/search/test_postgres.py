"""One study shared through a real PostgreSQL server: exact totals, dead workers, a lost database.

The server is started for the session (tests/search/postgres.py); workers are separate processes,
as on separate machines, with a heartbeat every second and a 3 s grace period.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from kvtuner.cli import main
from kvtuner.errors import ConfigError
from kvtuner.search import SearchSettings, run_search, study
from kvtuner.search.faults import WORKER_KEY
from kvtuner.search.study import completed_trials, open_storage, study_exists

from .postgres import PASSWORD
from .workers import STUDY, finish, search_argv, start_worker

TOTAL = 10


def load(storage) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=storage)


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def table(study: optuna.Study) -> str:
    """The study's trials, one a line (for assertion messages)."""
    return "\n".join(
        f"{t.number} {t.state.name} {t.params} {t.user_attrs} {t.system_attrs} "
        f"{t.datetime_start} {t.datetime_complete}"
        for t in study.trials
    )


def completed_count(storage) -> int:
    return len(completed_trials(load(storage))) if study_exists(storage, STUDY) else 0


def assert_exact_and_distinct(study: optuna.Study, total: int) -> list[optuna.trial.FrozenTrial]:
    completed = completed_trials(study)
    assert len(completed) == total
    keys = [t.user_attrs["layers"] for t in completed]
    assert len(keys) == len(set(keys)), "a config was completed twice"
    return completed


def test_three_workers_reach_the_exact_total(workdir, tiny_checkpoint, postgres_url):
    argv = search_argv(tiny_checkpoint, postgres_url, TOTAL)
    workers = [start_worker(workdir, argv, slow=0.3) for _ in range(3)]
    results = [finish(w) for w in workers]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    assert {json.loads(out)["trials"] for _, out, _ in results} == {TOTAL}
    study = load(open_storage(postgres_url))
    completed = assert_exact_and_distinct(study, TOTAL)
    assert len({t.user_attrs["worker"] for t in completed}) >= 2, "one worker did everything"


def test_killed_worker_is_retried_and_export_matches_sqlite(
    workdir, tiny_checkpoint, postgres_url, tmp_path
):
    """SIGKILL a worker (as if on another machine) mid-trial: the heartbeat fails its trial and
    the other worker runs that config; the export from PostgreSQL equals that of a sqlite copy."""
    storage = open_storage(postgres_url)
    argv = search_argv(tiny_checkpoint, postgres_url, TOTAL)
    victim = start_worker(workdir, argv, slow=2.0, host="elsewhere")
    caught: list[optuna.trial.FrozenTrial] = []

    def victim_mid_trial() -> bool:
        if not study_exists(storage, STUDY):
            return False
        running = load(storage).get_trials(states=(TrialState.RUNNING,))
        caught.extend(
            t
            for t in running
            if t.system_attrs.get(WORKER_KEY, {}).get("pid") == victim.pid and len(t.params) == 2
        )
        return bool(caught)

    try:
        wait_for(victim_mid_trial, "the victim to be mid-trial")
    finally:
        victim.kill()
        victim.wait()
    code, _, err = finish(start_worker(workdir, argv, slow=0.3))
    assert code == 0, err
    study = load(storage)
    dead = study.trials[caught[0].number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE], table(study)
    assert retries[0].params == dead.params
    assert_exact_and_distinct(study, TOTAL)

    copy = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name=STUDY, from_storage=storage, to_storage=open_storage(copy))
    export = ["export", "--model", str(tiny_checkpoint), "--objective", "proxy"]
    export += ["--study-name", STUDY, "--json"]
    assert main([*export, "--storage", postgres_url, "--out", str(tmp_path / "pg")]) == 0
    assert main([*export, "--storage", copy, "--out", str(tmp_path / "sqlite")]) == 0
    compare_exports(tmp_path / "pg", tmp_path / "sqlite")


def compare_exports(first: Path, second: Path) -> None:
    pd.testing.assert_frame_equal(
        pd.read_csv(first / "pareto.csv"), pd.read_csv(second / "pareto.csv")
    )
    names = sorted(p.name for p in first.glob("*.yaml"))
    assert names and names == sorted(p.name for p in second.glob("*.yaml"))
    for name in names:
        a, b = (yaml.safe_load((folder / name).read_text()) for folder in (first, second))
        a["metadata"].pop("date"), b["metadata"].pop("date")
        assert a == b, name


def test_lost_database_stops_in_one_line_and_rerun_continues(
    workdir, tiny_checkpoint, postgres_server, postgres_url
):
    storage = open_storage(postgres_url)
    argv = search_argv(tiny_checkpoint, postgres_url, TOTAL)
    worker = start_worker(workdir, argv, slow=0.5)
    try:
        wait_for(lambda: completed_count(storage) >= 3 or worker.poll() is not None, "3 trials")
        assert worker.poll() is None, finish(worker)
        storage.engine.dispose()
        postgres_server.stop()
        try:
            code, out, err = finish(worker, timeout=60)
        finally:
            postgres_server.start()
    finally:
        worker.kill()
        worker.wait()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtuner: error: "), err
    assert "lost the database" in lines[0] and "kvtuner:***@" in lines[0]
    # the reason, asked of the server after the failure
    assert "Connection refused" in lines[0] or "shutting down" in lines[0]
    assert PASSWORD not in err + out
    before = completed_count(storage)
    assert 3 <= before < TOTAL
    code, out, err = finish(start_worker(workdir, argv))
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["trials"], summary["new_trials"]) == (TOTAL, TOTAL - before)
    assert_exact_and_distinct(load(storage), TOTAL)


def silent_server() -> int:
    """A port that accepts connections and never answers (a host that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize("case", ["wrong password", "closed port", "unknown host", "hangs"])
def test_unreachable_database_is_one_line_without_the_password(
    workdir, tiny_checkpoint, postgres_server, capsys, monkeypatch, case
):
    # a hang ends at the connect timeout: 2 s here rather than the default 10 s
    monkeypatch.setattr(study, "CONNECT_TIMEOUT", 2)
    secret = "Wr0ng-p@ss"
    host_port = {
        "wrong password": f"127.0.0.1:{postgres_server.port}",
        "closed port": f"127.0.0.1:{_closed_port()}",
        "unknown host": "no-such-host.invalid:5432",
        "hangs": f"127.0.0.1:{silent_server()}",
    }[case]
    url = f"postgresql://kvtuner:{secret.replace('@', '%40')}@{host_port}/postgres"
    started = time.monotonic()
    code = main(search_argv(tiny_checkpoint, url, 4))
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2 and elapsed < 7, (code, elapsed)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtuner: error: --storage "), err
    assert "kvtuner:***@" in lines[0] and "cannot open" in lines[0]
    for part in (secret, "Wr0ng", "p%40ss", "p@ss"):
        assert part not in out + err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_with_another_dtype_is_refused(workdir, tiny_checkpoint, postgres_url, capsys):
    kl = ["--objective", "kl", "--samples", "1", "--eval-context", "24", "--continuation", "8"]
    kl += ["--chunk", "4"]
    first = SearchSettings(
        model=str(tiny_checkpoint),
        objective="kl",
        samples=1,
        context=24,
        continuation=8,
        chunk=4,
        trials=1,
        population=4,
        storage=postgres_url,
        study_name=STUDY,
        space="groups",
        budget="equivalent",
        caps=(3.0, 3.5, 4.0, 6.0),
    )
    assert run_search(first, quiet=True).trials == 1
    capsys.readouterr()  # the first run's model loading bar
    argv = search_argv(tiny_checkpoint, postgres_url, 2)
    argv[argv.index("proxy") - 1 : argv.index("proxy") + 1] = kl
    assert main([*argv, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and PASSWORD not in err
    assert (
        "evaluation: the study was created with dtype float32, this run has dtype bfloat16" in err
    )
    with pytest.raises(ConfigError, match="dtype float32"):
        run_search(SearchSettings(**{**first.__dict__, "dtype": "float16"}), quiet=True)
