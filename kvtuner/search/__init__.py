"""Multi-objective search of layer-wise precision: (quality loss, equivalent bits), bits capped.

    from kvtuner.search import SearchSettings, run_search
    outcome = run_search(SearchSettings(model="gemma-3-270m", caps=(3.5,), trials=150))
    outcome.export.choices[0].path          # searched_configs/gemma-3-270m/per-token/kvtuner_c3.5.yaml

Modules: problem (variables and bits), seeding (uniform and greedy first trials), objectives,
scoring (evaluate once per config), optuna_backend / pymoo_backend, study (storage, resume),
settings (checks before anything runs), runner (processes), export (front, plot, YAML per cap).
"""

from kvtuner.search.export import DEFAULT_CAPS, ExportResult, export_study
from kvtuner.search.problem import SearchProblem, layers_key, parse_layers_key
from kvtuner.search.runner import SearchOutcome, run_search
from kvtuner.search.settings import BACKENDS, SearchSettings, prepare

__all__ = [
    "BACKENDS",
    "DEFAULT_CAPS",
    "ExportResult",
    "SearchOutcome",
    "SearchProblem",
    "SearchSettings",
    "export_study",
    "layers_key",
    "parse_layers_key",
    "prepare",
    "run_search",
]
