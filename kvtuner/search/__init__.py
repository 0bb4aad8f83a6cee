"""Multi-objective search of layer-wise precision: (quality loss, budget bits), bits capped.

    from kvtuner.search import SearchSettings, run_search
    outcome = run_search(SearchSettings(model="gemma-3-270m", caps=(4.5,), trials=150))
    outcome.export.choices[0].path          # searched_configs/gemma-3-270m/per-token/kvtuner_c4.5.yaml

Modules: problem (variables and bits), seeding (uniform, knapsack and greedy first trials),
objectives, scoring (evaluate once per config), optuna_backend / pymoo_backend, trial_loop (exact
trial counts with many workers), faults (dead workers), study (storage, resume), settings (checks
before anything runs), runner (processes), rescore (the best candidates on more samples), export
(front, plot, YAML per cap). Names are imported on first use, so `kvtuner export` does not load
the model stack (transformers, pymoo) to read a study.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_CAPS": "kvtuner.search.export",
    "ExportResult": "kvtuner.search.export",
    "export_study": "kvtuner.search.export",
    "SearchProblem": "kvtuner.search.problem",
    "layers_key": "kvtuner.search.problem",
    "parse_layers_key": "kvtuner.search.problem",
    "SearchOutcome": "kvtuner.search.runner",
    "run_search": "kvtuner.search.runner",
    "BACKENDS": "kvtuner.search.settings",
    "SearchSettings": "kvtuner.search.settings",
    "prepare": "kvtuner.search.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvtuner.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
