"""What a search run needs, checked before anything is loaded or written.

`SearchSettings` is plain data (it also travels to worker processes); `prepare` resolves the
model's shape, the search space (running calibrate + prune when it is missing), the sensitivity
table, the problem, the seeds and the storage, and refuses bad input with one clear line before
the study is touched.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvtuner.errors import ConfigError
from kvtuner.evaluate import EvalProtocol
from kvtuner.precision import SCHEMES
from kvtuner.search.export import DEFAULT_CAPS
from kvtuner.search.objectives import OBJECTIVES
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.search.seeding import group_errors, seed_configs
from kvtuner.search.study import (
    StudySignature,
    default_storage,
    default_study_name,
    open_storage,
    redact,
    space_fingerprint,
    study_attrs,
    study_exists,
)
from kvtuner.space import SearchSpace

BACKENDS: tuple[str, ...] = ("optuna", "pymoo")
DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class SearchSettings:
    """Every option of `kvtuner search` (defaults as on the command line)."""

    model: str = DEFAULT_MODEL
    scheme: str | None = None  # None: the space file's scheme, else per-token
    caps: tuple[float, ...] = DEFAULT_CAPS
    trials: int = 150
    population: int = 20
    objective: str = "kl"
    backend: str = "optuna"
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    space: str | None = None
    out: str | None = None
    calibration: str = "calibration"
    max_groups: int = 6
    samples: int = 2
    context: int = 512
    continuation: int = 64
    chunk: int = 32
    text: str | None = None
    tasks: str | None = None
    max_new_tokens: int = 256
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    command: str = ""

    def validate(self) -> None:
        """ConfigError for options that are wrong whatever the model and files."""
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"--backend must be one of {', '.join(BACKENDS)}; got '{self.backend}'"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--objective must be one of {', '.join(OBJECTIVES)}; got '{self.objective}'"
            )
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ConfigError(f"--scheme must be one of {', '.join(SCHEMES)}; got '{self.scheme}'")
        if not self.caps or any(c <= 0 for c in self.caps):
            raise ConfigError(f"--max-bits must be positive numbers; got {list(self.caps)}")
        for name in ("trials", "workers", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1; got {getattr(self, name)}")
        if self.population < 2:
            raise ConfigError(f"--population must be at least 2; got {self.population}")
        if self.objective == "accuracy" and self.tasks is None:
            raise ConfigError(
                "--objective accuracy needs --tasks FILE.jsonl ({question, answer} per line)"
            )
        self.protocol()

    def protocol(self) -> EvalProtocol:
        return EvalProtocol(self.context, self.continuation, self.chunk)

    def evaluation(self) -> str:
        """The settings that make losses comparable across runs of one study (stored with it)."""
        if self.objective == "proxy":
            fields: dict[str, Any] = {"objective": "proxy"}
        elif self.objective == "accuracy":
            fields = {"tasks": str(self.tasks), "max_new_tokens": self.max_new_tokens}
        else:
            fields = {
                "samples": self.samples,
                "context": self.context,
                "continuation": self.continuation,
                "chunk": self.chunk,
                "seed": self.seed,
                "text": self.text or "heldout",
            }
        if self.objective != "proxy":  # losses of a float32 cpu and a bfloat16 gpu run do not mix
            from kvtuner.models import resolve_dtype

            device = self.device.split(":")[0]
            fields["device"] = device
            fields["dtype"] = str(resolve_dtype(self.dtype, device)).removeprefix("torch.")
        return json.dumps(fields, sort_keys=True)


@dataclass
class PreparedSearch:
    """Everything resolved from settings: the model's facts, space, problem, seeds, storage."""

    settings: SearchSettings
    model_name: str
    num_layers: int
    head_dim: int
    scheme: str
    space: SearchSpace
    space_path: Path
    sensitivity: pd.DataFrame | None
    problem: SearchProblem
    seeds: list[Choices]
    seed_kinds: list[str]
    out_dir: Path
    storage_url: str
    storage: Any
    study_name: str
    signature: StudySignature
    loaded: Any = None
    shape: Any = None  # kvtuner.memory.ModelShape

    @property
    def where(self) -> str:
        return redact(self.storage_url)


def prepare(
    settings: SearchSettings, *, loaded: Any = None, quiet: bool = False, calibrate: bool = True
) -> PreparedSearch:
    """Resolve and check everything; run calibrate + prune first when the space file is missing."""
    from kvtuner.models import load_model_config, model_name, text_config

    settings.validate()
    name = model_name(settings.model) if loaded is None else loaded.name
    model_config = text_config(
        loaded.model.config if loaded is not None else load_model_config(settings.model)
    )
    num_layers = int(model_config.num_hidden_layers)
    head_dim = int(
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    from kvtuner.compat import model_shape

    shape = model_shape(model_config)
    scheme = settings.scheme or "per-token"
    if settings.space is not None:
        space_path = Path(settings.space)
    else:
        space_path = Path(settings.calibration) / name / scheme / "space.yaml"
        if not space_path.is_file() and calibrate:
            loaded = loaded or load_for_search(settings, quiet)
            space_path = run_calibration(
                loaded, scheme, Path(settings.calibration), settings, quiet
            )
    space = SearchSpace.load(space_path)
    scheme = settings.scheme or space.scheme
    _check_space(space, space_path, name, num_layers, scheme)
    sensitivity = _sensitivity(space, space_path, num_layers)
    if settings.objective == "proxy" and sensitivity is None:
        raise ConfigError(
            f"{space_path.parent / 'sensitivity.csv'}: the proxy objective needs the calibration's sensitivity.csv"
        )
    errors = group_errors(space, sensitivity) if sensitivity is not None else None

    smallest = SearchProblem(space, cap=max(settings.caps)).min_bits()
    if min(settings.caps) < smallest - 1e-9:
        raise ConfigError(
            f"--max-bits {min(settings.caps):g}: below the smallest config in the space "
            f"({smallest:g} equivalent bits, from {space_path})"
        )

    out_dir = Path(settings.out) if settings.out else Path("searched_configs") / name / scheme
    storage_url = settings.storage or default_storage(out_dir)
    if settings.storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url)
    study_name = settings.study_name or default_study_name(name, scheme, settings.objective)
    cap = max(settings.caps)
    signature = StudySignature(
        model=name,
        scheme=scheme,
        objective=settings.objective,
        num_layers=num_layers,
        space=space_fingerprint(space),
        cap=cap,
        evaluation=settings.evaluation(),
    )
    if study_exists(storage, study_name):
        stored = study_attrs(storage, study_name)
        signature.check(stored, f"study '{study_name}' in {redact(storage_url)}")
        cap = float(stored["cap"])  # the constraint stays the one the study was created with
    problem = SearchProblem(space, cap=cap, group_errors=errors)
    seeds = seed_configs(problem, errors, settings.caps)
    return PreparedSearch(
        settings=settings,
        model_name=name,
        num_layers=num_layers,
        head_dim=head_dim,
        shape=shape,
        scheme=scheme,
        space=space,
        space_path=space_path,
        sensitivity=sensitivity,
        problem=problem,
        seeds=[choices for choices, _ in seeds],
        seed_kinds=[kind for _, kind in seeds],
        out_dir=out_dir,
        storage_url=storage_url,
        storage=storage,
        study_name=study_name,
        signature=signature,
        loaded=loaded,
    )


def load_for_search(settings: SearchSettings, quiet: bool = False) -> Any:
    """LoadedModel for `settings.model` on its device and dtype."""
    from kvtuner.models import load_model

    _say(f"loading {settings.model} ...", quiet)
    return load_model(settings.model, device=settings.device, dtype=settings.dtype)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _check_space(space: SearchSpace, path: Path, name: str, num_layers: int, scheme: str) -> None:
    if space.model and space.model != name:
        raise ConfigError(f"{path}: model: search space is for '{space.model}', not '{name}'")
    if space.num_layers != num_layers:
        raise ConfigError(
            f"{path}: num_layers: search space has {space.num_layers} layers, model has {num_layers}"
        )
    if space.scheme != scheme:
        raise ConfigError(
            f"{path}: scheme: search space is for {space.scheme}, this search is {scheme}"
        )


def _sensitivity(space: SearchSpace, space_path: Path, num_layers: int) -> pd.DataFrame | None:
    """The calibration table the space was pruned from (next to it, or named in its metadata)."""
    from kvtuner.calibrate import load_sensitivity

    candidates = [space_path.parent / "sensitivity.csv"]
    if space.metadata.get("sensitivity"):
        candidates.append(Path(space.metadata["sensitivity"]))
    for path in candidates:
        if path.is_file():
            table, meta = load_sensitivity(path)
            if int(meta.get("num_layers", num_layers)) == num_layers and meta.get("model") in (
                None,
                space.model,
            ):
                return table
    return None


def run_calibration(
    loaded: Any, scheme: str, root: Path, settings: SearchSettings, quiet: bool
) -> Path:
    """The stages before search, with their default settings: calibrate, prune, cluster -> space.yaml."""
    from kvtuner.calibrate import CalibrationSettings, calibrate, output_folder, write_outputs
    from kvtuner.cluster import build_search_space
    from kvtuner.data import calibration_text, token_samples

    folder = output_folder(root, loaded.name, scheme)
    _say(
        f"no search space at {folder / 'space.yaml'}: calibrating {loaded.name} ({scheme}) first",
        quiet,
    )
    calibration = CalibrationSettings(scheme=scheme, seed=settings.seed)
    tokens = token_samples(
        loaded.tokenizer,
        calibration_text(),
        calibration.samples,
        calibration.seq_len,
        calibration.seed,
    )
    result = calibrate(
        loaded.model, tokens, calibration, model_name=loaded.name, progress=not quiet
    )
    paths = write_outputs(result, folder)
    meta = result.metadata
    cluster = build_search_space(
        result.table,
        model=loaded.name,
        num_layers=int(meta["num_layers"]),
        scheme=scheme,
        layout=meta,
        max_groups=settings.max_groups,
        metadata={"sensitivity": str(paths["sensitivity"])},
    )
    path = cluster.space.save(folder / "space.yaml")
    _say(f"wrote {paths['sensitivity']} and {path} ({len(cluster.space.groups)} groups)", quiet)
    return path
