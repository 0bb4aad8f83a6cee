"""Optuna storage and study: open by URL, name, check that a resumed study is the same search.

Storage URLs: `sqlite:///path.db` (or a bare `*.db` / `*.sqlite3` path), `journal:///path` (or a bare
`*.journal` / `*.log` path; a journal file takes several processes, also over NFS), and any
SQLAlchemy URL such as `postgresql://user:pass@host/db` that workers on several machines can share.
A study remembers what it searches (model, scheme, objective, space, evaluation settings, bit cap);
running the same command again continues it, a different search under the same name is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from kvtuner.errors import ConfigError
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.space import SearchSpace

STUDY_FORMAT = 1
DIRECTIONS = ("minimize", "minimize")  # quality loss, equivalent bits
_JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


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
        """ConfigError naming the first field in which `stored` (a study's user attrs) differs."""
        if stored.get("kvtuner_study") != STUDY_FORMAT:
            raise ConfigError(
                f"{where}: not a kvtuner study; pass --study-name to start another one"
            )
        for name, value in asdict(self).items():
            old = stored.get(name)
            same = old is not None and (value <= old + 1e-9 if name == "cap" else old == value)
            if not same:
                hint = "a higher bit cap" if name == "cap" else f"another {name} ({old})"
                raise ConfigError(
                    f"{where}: {name}: the study was created for {hint}, this run has {value}; "
                    "pass --study-name to start another study"
                )


def space_fingerprint(space: SearchSpace) -> str:
    """Short hash of the groups and their candidates (what the search's variables are)."""
    groups = [[list(g.layers), sorted(p.name for p in g.candidates)] for g in space.groups]
    text = json.dumps(
        [space.num_layers, space.scheme, space.group_size, space.residual_length, groups]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_study_name(model: str, scheme: str, objective: str) -> str:
    return f"{model}-{scheme}-{objective}"


def default_storage(out_dir: str | Path) -> str:
    """A sqlite file next to the outputs."""
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def redact(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


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
        engine = (
            {"connect_args": {"connect_timeout": 10}} if target.startswith("postgresql") else None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # heartbeats let another run notice a killed worker's trial and mark it failed
            storage = optuna.storages.RDBStorage(
                target, engine_kwargs=engine, heartbeat_interval=30, grace_period=120
            )
        if kind == "sqlite":
            _write_ahead_log(storage)
        return storage
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(
            f"--storage {redact(url)}: driver missing ({exc.name or exc}); install it"
        ) from None
    except Exception as exc:  # SQLAlchemy and driver errors have no common base worth importing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--storage {redact(url)}: cannot open ({first})") from None


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
    """(kind, target): ('journal', path), ('sqlite', 'sqlite:///abs'), or ('rdb', url)."""
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
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        signature.check(study.user_attrs, label)
        return study
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
        study.set_user_attr("kvtuner_study", STUDY_FORMAT)
        for key, value in asdict(signature).items():
            study.set_user_attr(key, value)
    else:  # another worker created it first
        signature.check(study.user_attrs, label)
    return study


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


def enqueue_seeds(
    study: optuna.Study, problem: SearchProblem, seeds: list[Choices], kinds: list[str]
) -> int:
    """Enqueue the seeds not yet completed or waiting; returns how many were enqueued."""
    known = set(completed_by_key(study))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        fixed = trial.system_attrs.get("fixed_params") or trial.params
        if all(name in fixed for name in problem.names):
            known.add(problem.key(problem.from_params(fixed)))
    added = 0
    for choices, kind in zip(seeds, kinds):
        key = problem.key(choices)
        if key in known:
            continue
        study.enqueue_trial(problem.params(choices), user_attrs={"seed": kind})
        known.add(key)
        added += 1
    return added
