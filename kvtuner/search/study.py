"""Optuna storage and study: open by URL, name, check that a resumed study is the same search.

Storage URLs: `sqlite:///path.db` (or a bare `*.db` / `*.sqlite3` path), `journal:///path` (or a bare
`*.journal` / `*.log` path; a journal file takes several processes, also over NFS), and any
SQLAlchemy URL that workers on several machines can share, such as `postgresql://user:pass@host/db`
(driven by psycopg 3: `pip install "kvtuner[postgres]"`). Database storages record a heartbeat of
every running trial (every `KVTUNER_HEARTBEAT_SECONDS`, default 30); a trial silent for
`KVTUNER_GRACE_SECONDS` (default 120) is failed by another worker and its config queued again.
A study remembers what it searches (model, scheme, objective, space, evaluation settings, bit cap);
running the same command again continues it, a different search under the same name is refused.
No password reaches the output: URLs are shown redacted and driver messages scrubbed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from kvtuner.errors import ConfigError, KVTunerError
from kvtuner.search import optuna_compat as compat
from kvtuner.search.faults import RetryStaleTrial
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.space import SearchSpace

STUDY_FORMAT = 1
DIRECTIONS = ("minimize", "minimize")  # quality loss, equivalent bits
_JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
# what users write -> the psycopg 3 driver (SQLAlchemy's plain postgresql:// means psycopg2)
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
HEARTBEAT_ENV = ("KVTUNER_HEARTBEAT_SECONDS", 30)
GRACE_ENV = ("KVTUNER_GRACE_SECONDS", 120)
CONNECT_TIMEOUT = 10  # seconds to reach a database server before giving up


@dataclass(frozen=True)
class StudySignature:
    """What a study searches; a resumed run must match it (cap: at most the study's)."""

    model: str
    scheme: str
    objective: str
    num_layers: int
    space: str
    cap: float
    evaluation: str

    def check(self, stored: dict[str, Any], where: str) -> None:
        """ConfigError naming the first field in which `stored` (a study's user attrs) differs, with
        the study's value and this run's."""
        if stored.get("kvtuner_study") != STUDY_FORMAT:
            raise ConfigError(
                f"{where}: not a kvtuner study; pass --study-name to start another one"
            )
        for name, value in asdict(self).items():
            old = stored.get(name)
            if name == "evaluation" and old is not None:
                difference = evaluation_difference(old, value)
                if difference is None:
                    continue
                key, before, after = difference
                old, value = f"{key} {before}", f"{key} {after}"
            elif old is not None and (value <= old + 1e-9 if name == "cap" else old == value):
                continue
            what = f"a bit cap of {old}" if name == "cap" else old
            raise ConfigError(
                f"{where}: {name}: the study was created with {what}, this run has {value}; "
                "pass --study-name to start another study"
            )


def evaluation_difference(old: str, new: str) -> tuple[str, Any, Any] | None:
    """(setting, study's value, this run's value) of the first differing evaluation setting, or None.

    Studies made before devices and dtypes were recorded say `dtype: default`: the same as a run
    in the default dtype of its device (float32 on cpu, bfloat16 on cuda).
    """
    before, after = json.loads(old), json.loads(new)
    if before.get("dtype") == "default" and "device" not in before:
        device = after.pop("device", None)
        if "dtype" not in after or _is_default_dtype(device, after["dtype"]):
            before.pop("dtype")
            after.pop("dtype", None)
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            return key, before.get(key, "unset"), after.get(key, "unset")
    return None


def _is_default_dtype(device: str | None, dtype: str) -> bool:
    from kvtuner.models import DEFAULT_DTYPES

    default = DEFAULT_DTYPES.get(device)
    return default is not None and str(default).removeprefix("torch.") == dtype


def space_fingerprint(space: SearchSpace) -> str:
    """Short hash of the groups and their candidates (what the search's variables are)."""
    groups = [[list(g.layers), sorted(p.name for p in g.candidates)] for g in space.groups]
    text = json.dumps([space.num_layers, space.layout_fields, groups], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_study_name(model: str, scheme: str, objective: str) -> str:
    return f"{model}-{scheme}-{objective}"


def default_storage(out_dir: str | Path) -> str:
    """A sqlite file next to the outputs."""
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def redact(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db` (every URL in the text)."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", url)


def scrub(text: str, url: str) -> str:
    """`text` with URLs redacted and the password of `url` (as written or decoded) replaced by ***."""
    text = redact(text)
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def describe(exc: BaseException, url: str) -> str:
    """The first line of the innermost database error behind `exc`, without SQLAlchemy's prefix."""
    while exc.__cause__ is not None and isinstance(exc, optuna.exceptions.StorageInternalError):
        exc = exc.__cause__  # Optuna hides the driver's message behind a generic one
    text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    first = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", first)
    return scrub(re.sub(r"^\([\w.]+\) ", "", first), url)


def storage_error_types() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, optuna.exceptions.StorageInternalError)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a database lost mid-run into one KVTunerError line (password scrubbed)."""
    try:
        yield
    except KVTunerError:
        raise
    except storage_error_types() as exc:
        # the error a worker meets is often a late one ("invalid transaction"): ask the server
        reason = _probe(url) or describe(exc, url)
        raise KVTunerError(
            f"{redact(url)}: lost the database ({reason}); the study keeps its "
            "completed trials: run the same command again when the database is back"
        ) from None


def _probe(url: str) -> str | None:
    """Why a fresh connection to the database at `url` fails, or None when it works."""
    kind, target = _classify(url)
    if kind not in ("postgresql", "rdb"):
        return None
    from sqlalchemy import create_engine

    args = {"connect_timeout": CONNECT_TIMEOUT} if kind == "postgresql" else {}
    try:
        engine = create_engine(target, connect_args=args)
    except Exception:
        return None
    try:
        with engine.connect():
            return None
    except Exception as exc:
        return describe(exc, url)
    finally:
        engine.dispose()


def open_storage(url: str) -> BaseStorage:
    """Optuna storage for `url`; ConfigError with one line when it cannot be opened."""
    kind, target = _classify(url)
    try:
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            _parent_exists(Path(target), url)
            return JournalStorage(JournalFileBackend(str(target)))
        if kind == "sqlite":
            path = target.removeprefix("sqlite:///")
            if path and path != ":memory:":
                _parent_exists(Path(path), url)
        engine: dict[str, Any] = {"pool_pre_ping": True}  # a restarted server: reconnect
        if target.startswith("postgresql"):
            engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        storage = _rdb_storage(target, engine)
        if kind == "sqlite":
            _write_ahead_log(storage)
        return storage
    except ConfigError:
        raise
    except ImportError as exc:
        if kind == "postgresql":
            raise ConfigError(
                f"--storage {redact(url)}: the PostgreSQL driver psycopg is not installed; "
                'pip install "kvtuner[postgres]"'
            ) from None
        raise ConfigError(
            f"--storage {redact(url)}: driver missing ({exc.name or exc}); install it"
        ) from None
    except Exception as exc:  # SQLAlchemy and driver errors have no common base worth importing
        raise ConfigError(f"--storage {redact(url)}: cannot open ({describe(exc, url)})") from None


def _rdb_storage(target: str, engine: dict[str, Any], tries: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats and retries; workers that open a new database at the same
    moment race to create its tables, and the losers try again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(tries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # heartbeats let another worker notice a killed worker's trial, fail it and retry it
                return optuna.storages.RDBStorage(
                    target,
                    engine_kwargs=engine,
                    heartbeat_interval=_seconds(*HEARTBEAT_ENV),
                    grace_period=_seconds(*GRACE_ENV),
                    heartbeat_stale_trial_callback=RetryStaleTrial(),
                )
        except (IntegrityError, ProgrammingError):  # "duplicate key", "relation already exists"
            if attempt == tries - 1:
                raise
            time.sleep(random.uniform(0.2, 1.0))
    raise AssertionError("unreachable")


def _seconds(variable: str, default: int) -> int:
    text = os.environ.get(variable)
    if text is None:
        return default
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"{variable} must be a whole number of seconds >= 1; got '{text}'")
    return int(text)


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """sqlite in WAL mode: readers do not block the writer, and a commit costs no full fsync."""
    from sqlalchemy import event

    def pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened before the listener are dropped


def _classify(url: str) -> tuple[str, str]:
    """(kind, target): ('journal', path), ('sqlite', 'sqlite:///abs'), ('postgresql', URL with a
    driver), or ('rdb', url)."""
    if url.startswith("journal://"):
        # journal:///abs/path.journal (three slashes: an absolute path), journal://rel/path.journal
        return "journal", str(Path(url.removeprefix("journal://")).expanduser().resolve())
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        if path.suffix.lower() in _JOURNAL_SUFFIXES:
            return "journal", str(path)
        if path.suffix.lower() in _SQLITE_SUFFIXES:
            return "sqlite", f"sqlite:///{path}"
        raise ConfigError(
            f"--storage {url}: not a storage URL (sqlite:///file.db, journal:///file.journal, "
            "postgresql://user@host/db) nor a .db or .journal path"
        )
    if url.startswith("sqlite:"):
        return "sqlite", url
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return "postgresql", "postgresql+psycopg://" + url.removeprefix(scheme)
    if url.startswith("postgresql+"):
        return "postgresql", url
    return "rdb", url


def _parent_exists(path: Path, url: str) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"--storage {redact(url)}: folder {path.parent} does not exist")


def study_exists(storage: BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def open_study(
    storage: BaseStorage,
    name: str,
    signature: StudySignature,
    sampler: optuna.samplers.BaseSampler | None = None,
    *,
    where: str = "",
    create: bool = True,
) -> optuna.Study:
    """Load study `name` after checking its signature, or create it (create=True) and record the signature."""
    label = f"study '{name}'" + (f" in {where}" if where else "")
    if study_exists(storage, name):
        signature.check(study_attrs(storage, name), label)
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    if not create:
        raise ConfigError(f"{label}: no such study (run `kvtuner search` first)")
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        directions=list(DIRECTIONS),
        load_if_exists=True,
    )
    if "kvtuner_study" not in study.user_attrs:
        for key, value in asdict(signature).items():
            study.set_user_attr(key, value)
        study.set_user_attr("kvtuner_study", STUDY_FORMAT)  # last: the signature is complete
    # another worker may have created it (or written its signature) at the same moment
    signature.check(study_attrs(storage, name), label)
    return study


def study_attrs(storage: BaseStorage, name: str, wait: float = 10.0) -> dict[str, Any]:
    """User attributes of study `name`. A worker writes the signature just after creating the
    study, so an empty study without one is given `wait` seconds to get it."""
    study_id = storage.get_study_id_from_name(name)
    deadline = time.monotonic() + wait
    while True:
        # trials first: a creator writes its signature before any trial, so trials counted
        # before reading the attributes mean the signature is in them or the study is foreign
        has_trials = storage.get_n_trials(study_id) > 0
        attrs = storage.get_study_user_attrs(study_id)
        if "kvtuner_study" in attrs or has_trials or time.monotonic() > deadline:
            return attrs
        time.sleep(0.2)


def load_existing_study(storage: BaseStorage, name: str, where: str = "") -> optuna.Study:
    """A kvtuner study for export: ConfigError if it is missing or not a kvtuner study."""
    label = f"study '{name}'" + (f" in {where}" if where else "")
    if not study_exists(storage, name):
        names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        raise ConfigError(f"{label}: no such study (studies there: {names})")
    study = optuna.load_study(study_name=name, storage=storage)
    if study.user_attrs.get("kvtuner_study") != STUDY_FORMAT:
        raise ConfigError(f"{label}: not a kvtuner study")
    return study


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def completed_by_key(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Completed trials by their per-layer assignment (`layers` user attribute); the first one wins."""
    index: dict[str, FrozenTrial] = {}
    for trial in completed_trials(study):
        key = trial.user_attrs.get("layers")
        if key is not None and key not in index:
            index[key] = trial
    return index


def live_keys(study: optuna.Study, problem: SearchProblem) -> set[str]:
    """Configs of running and queued trials (those whose every group is known)."""
    keys = set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        params = compat.planned_params(trial)
        if all(name in params for name in problem.names):
            keys.add(problem.key(problem.from_params(params)))
    return keys


def enqueue_seeds(
    study: optuna.Study, problem: SearchProblem, seeds: list[Choices], kinds: list[str]
) -> int:
    """Enqueue the seeds not yet completed, running or waiting; returns how many were enqueued."""
    known = set(completed_by_key(study)) | live_keys(study, problem)
    added = 0
    for choices, kind in zip(seeds, kinds):
        key = problem.key(choices)
        if key in known:
            continue
        compat.enqueue(study, problem.params(choices), user_attrs={"seed": kind})
        known.add(key)
        added += 1
    return added
