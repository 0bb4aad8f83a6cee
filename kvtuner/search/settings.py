"""What a search run needs, checked before anything is loaded or written.

`SearchSettings` is plain data (it also travels to worker processes); `prepare` resolves the
model's shape, the calibration (running `kvtuner calibrate` and `prune` first when it is missing),
the search space, the budget's costs, the problem, the seeds and the storage, and refuses bad input
with one clear line before the study is touched.

Spaces: `layers` (the default) gives every layer its own variable over its Pareto pairs (by
single-layer KL), the space the knapsack front lives in; `groups` is `kvtuner prune`'s space.yaml
(the paper's clustered space); a path names any space.yaml.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvtuner import defaults
from kvtuner.errors import ConfigError
from kvtuner.evaluate import EvalProtocol
from kvtuner.memory import BUDGETS
from kvtuner.precision import SCHEMES
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
SPACES: tuple[str, ...] = ("layers", "groups")
DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class SearchSettings:
    """Every option of `kvtuner search` (defaults as on the command line)."""

    model: str = DEFAULT_MODEL
    scheme: str | None = None  # None: per-token (or a space file's scheme)
    caps: tuple[float, ...] = defaults.CAPS
    budget: str = defaults.BUDGET
    budget_context: int = defaults.BUDGET_CONTEXT
    trials: int = defaults.TRIALS
    population: int = defaults.POPULATION
    objective: str = "kl"
    backend: str = "optuna"
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    space: str = "layers"  # layers, groups, or a space.yaml path
    out: str | None = None
    calibration: str = "calibration"
    max_size: int = defaults.MAX_SPACE_SIZE
    samples: int = defaults.SEARCH_SAMPLES
    context: int | None = None  # evaluation context; None: the calibration's single-layer KL one
    continuation: int = defaults.SEARCH_CONTINUATION
    chunk: int = defaults.EVAL_CHUNK
    rescore_samples: int = defaults.RESCORE_SAMPLES
    rescore_top: int = defaults.RESCORE_TOP
    text: str | None = None  # None: the calibration text (never the held-out text)
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
        if self.budget not in BUDGETS:
            raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}; got '{self.budget}'")
        if not self.caps or any(c <= 0 for c in self.caps):
            raise ConfigError(f"--max-bits must be positive numbers; got {list(self.caps)}")
        for name in ("trials", "workers", "samples", "budget_context"):
            if getattr(self, name) < 1:
                option = "--context" if name == "budget_context" else f"--{name}"
                raise ConfigError(f"{option} must be at least 1; got {getattr(self, name)}")
        if self.rescore_samples < 0 or self.rescore_top < 0:
            raise ConfigError("--rescore-samples and --rescore-top must be >= 0")
        if self.population < 2:
            raise ConfigError(f"--population must be at least 2; got {self.population}")
        if self.objective == "accuracy" and self.tasks is None:
            raise ConfigError(
                "--objective accuracy needs --tasks FILE.jsonl ({question, answer} per line)"
            )
        self.protocol(defaults.EVAL_CONTEXT)

    def protocol(self, context: int) -> EvalProtocol:
        """The trials' protocol at `context` tokens (`--eval-context` when given)."""
        return EvalProtocol(self.context or context, self.continuation, self.chunk)

    def evaluation(self, context: int = defaults.EVAL_CONTEXT) -> str:
        """The settings that make losses comparable across runs of one study (stored with it)."""
        if self.objective == "proxy":
            fields: dict[str, Any] = {"objective": "proxy"}
        elif self.objective == "accuracy":
            fields = {"tasks": str(self.tasks), "max_new_tokens": self.max_new_tokens}
        else:
            fields = {
                "samples": self.samples,
                "context": self.context or context,
                "continuation": self.continuation,
                "chunk": self.chunk,
                "seed": self.seed,
                "text": self.text or "calibration",
                "rescore_samples": self.rescore_samples,
            }
        fields["budget"] = self.budget
        if self.budget == "effective":
            fields["budget_context"] = self.budget_context
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
    layer_kl: pd.DataFrame | None
    base: Any  # a 16-bit PrecisionConfig in the calibration's layout
    context: int  # evaluation context of the trials
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
    losses: Any = None  # per group: summed single-layer KL per candidate (None without the table)

    @property
    def where(self) -> str:
        return redact(self.storage_url)


def prepare(
    settings: SearchSettings, *, loaded: Any = None, quiet: bool = False, calibrate: bool = True
) -> PreparedSearch:
    """Resolve and check everything; calibrate (and prune) first when the calibration is missing."""
    from kvtuner.calibrate import base_config, load_layer_kl, load_sensitivity, output_folder
    from kvtuner.compat import model_shape
    from kvtuner.memory import budget_costs
    from kvtuner.models import load_model_config, model_name, text_config

    settings.validate()
    name = model_name(settings.model) if loaded is None else loaded.name
    model_config = text_config(
        loaded.model.config if loaded is not None else load_model_config(settings.model)
    )
    shape = model_shape(model_config)
    num_layers = shape.num_layers
    scheme = settings.scheme or "per-token"
    folder = output_folder(settings.calibration, name, scheme)
    space_path = _space_path(settings, folder)
    if space_path is not None and settings.scheme is None and space_path.is_file():
        scheme = SearchSpace.load(space_path).scheme
        folder = output_folder(settings.calibration, name, scheme)
    needs = [folder / "sensitivity.csv"] + ([space_path] if space_path is not None else [])
    if calibrate and not all(path.is_file() for path in needs):
        loaded = loaded or load_for_search(settings, quiet)
        run_calibration(loaded, scheme, Path(settings.calibration), settings, quiet)
    sensitivity, meta = load_sensitivity(folder / "sensitivity.csv")
    if int(meta["num_layers"]) != num_layers:
        raise ConfigError(
            f"{folder}: num_layers: calibration has {meta['num_layers']} layers, model has {num_layers}"
        )
    base = base_config(meta)
    layer_kl = load_layer_kl(folder, num_layers)
    if space_path is None:
        space = per_layer_space(sensitivity, layer_kl, base, shape, settings)
        space_path = folder / "layer_kl.csv" if layer_kl is not None else folder / "sensitivity.csv"
    else:
        space = SearchSpace.load(space_path)
        _check_space(space, space_path, name, num_layers, scheme)
    if settings.objective == "proxy" and sensitivity is None:
        raise ConfigError(f"{folder / 'sensitivity.csv'}: the proxy objective needs it")
    costs = budget_costs(
        _layer_candidates(space),
        base.layout,
        shape,
        budget=settings.budget,
        context=settings.budget_context,
    )
    from kvtuner.search.problem import group_costs

    group_cost = group_costs(space, costs)
    errors = group_errors(space, sensitivity)
    losses = _losses(space, layer_kl)
    smallest = SearchProblem(space, cap=max(settings.caps), costs=group_cost).min_bits()
    if max(settings.caps) < smallest - 1e-9:  # a lower cap alone is reported missing at export
        raise ConfigError(
            f"--max-bits {max(settings.caps):g}: below the smallest config in the space "
            f"({smallest:.3g} {settings.budget} bits, from {space_path})"
        )
    context = settings.context or int(
        (meta.get("layer_kl") or {}).get("context") or _eval_context(model_config)
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
        evaluation=settings.evaluation(context),
    )
    if study_exists(storage, study_name):
        stored = study_attrs(storage, study_name)
        signature.check(stored, f"study '{study_name}' in {redact(storage_url)}")
        cap = float(stored["cap"])  # the constraint stays the one the study was created with
    problem = SearchProblem(space, cap=cap, group_errors=losses or errors, costs=group_cost)
    seeds = seed_configs(problem, errors, settings.caps, losses)
    return PreparedSearch(
        settings=settings,
        model_name=name,
        num_layers=num_layers,
        head_dim=shape.head_dim,
        shape=shape,
        scheme=scheme,
        space=space,
        space_path=space_path,
        sensitivity=sensitivity,
        layer_kl=layer_kl,
        base=base,
        context=context,
        problem=problem,
        seeds=[choices for choices, _ in seeds],
        seed_kinds=[kind for _, kind in seeds],
        out_dir=out_dir,
        storage_url=storage_url,
        storage=storage,
        study_name=study_name,
        signature=signature,
        loaded=loaded,
        losses=losses,
    )


def per_layer_space(
    sensitivity: pd.DataFrame,
    layer_kl: pd.DataFrame | None,
    base: Any,
    shape: Any,
    settings: SearchSettings,
) -> SearchSpace:
    """One variable per layer over its Pareto pairs: by (budget cost, single-layer KL) when the KL
    table exists (a pair that costs more and loses more alone is never worth it), else by e_o."""
    import numpy as np

    from kvtuner.memory import budget_costs
    from kvtuner.pareto import pareto_front
    from kvtuner.precision import PrecisionPair
    from kvtuner.prune import prune_table

    pruned = prune_table(sensitivity)
    candidates = [pruned[layer] for layer in range(shape.num_layers)]
    if layer_kl is not None:
        measured = [[] for _ in range(shape.num_layers)]
        for row in layer_kl.itertuples(index=False):
            measured[int(row.layer)].append(
                (PrecisionPair(int(row.key_bits), int(row.value_bits)), float(row.kl))
            )
        costs = budget_costs(
            [[p for p, _ in pairs] for pairs in measured],
            base.layout,
            shape,
            budget=settings.budget,
            context=settings.budget_context,
        )
        candidates = []
        for layer, pairs in enumerate(measured):
            points = np.array([[costs[layer][p], kl] for p, kl in pairs])
            kept = [pairs[i][0] for i in pareto_front(points)]
            candidates.append(tuple(sorted(kept, key=lambda p: (-p.equivalent_bits, -p.key_bits))))
    return SearchSpace.per_layer(candidates, model=base.model or "", **asdict(base.layout))


def _space_path(settings: SearchSettings, folder: Path) -> Path | None:
    if settings.space == "layers":
        return None
    if settings.space == "groups":
        return folder / "space.yaml"
    return Path(settings.space)


def _layer_candidates(space: SearchSpace) -> list[tuple[Any, ...]]:
    """Per layer, the candidates of its group."""
    per_layer: list[tuple[Any, ...]] = [()] * space.num_layers
    for group in space.groups:
        for layer in group.layers:
            per_layer[layer] = group.candidates
    return per_layer


def _losses(space: SearchSpace, layer_kl: pd.DataFrame | None) -> Any:
    """Per group: its summed single-layer KL per candidate (None without the table or when a
    group's candidates were not all measured)."""
    if layer_kl is None:
        return None
    try:
        return group_errors(space, layer_kl, "kl")
    except ConfigError:
        return None


def _eval_context(model_config: Any) -> int:
    from kvtuner.compat import sliding_windows

    return defaults.eval_context(sliding_windows(model_config))


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


def run_calibration(
    loaded: Any, scheme: str, root: Path, settings: SearchSettings, quiet: bool
) -> Path:
    """The stages before search, with their default settings: calibrate (e_o and single-layer KL),
    then prune -> space.yaml; returns the calibration folder."""
    from kvtuner.calibrate import (
        CalibrationSettings,
        calibrate,
        layer_kl_samples,
        output_folder,
        write_outputs,
    )
    from kvtuner.cluster import build_search_space
    from kvtuner.data import calibration_text, token_samples

    folder = output_folder(root, loaded.name, scheme)
    _say(f"no calibration at {folder}: calibrating {loaded.name} ({scheme}) first", quiet)
    calibration = CalibrationSettings(scheme=scheme, seed=settings.seed)
    text = calibration_text()
    tokens = token_samples(
        loaded.tokenizer, text, calibration.samples, calibration.seq_len, calibration.seed
    )
    samples = layer_kl_samples(loaded.tokenizer, text, calibration, loaded.model.config)
    result = calibrate(
        loaded.model,
        tokens,
        calibration,
        model_name=loaded.name,
        layer_samples=samples,
        progress=not quiet,
    )
    paths = write_outputs(result, folder)
    meta = result.metadata
    cluster = build_search_space(
        result.table,
        model=loaded.name,
        num_layers=int(meta["num_layers"]),
        scheme=scheme,
        layout=meta,
        max_size=settings.max_size,
        metadata={"sensitivity": str(paths["sensitivity"])},
    )
    path = cluster.space.save(folder / "space.yaml")
    _say(f"wrote {paths['sensitivity']} and {path} ({len(cluster.space.groups)} groups)", quiet)
    return folder
