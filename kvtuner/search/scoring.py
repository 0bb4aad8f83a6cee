"""Score one assignment for either backend: look it up among completed trials, else evaluate it.

Values are `[loss, budget bits]` (both minimized: effective bits at the budget's context by
default, or equivalent bits); the constraint is `bits - cap` (feasible when <= 0). User attributes
keep the per-layer assignment (`layers`, the dedupe key), equivalent and effective bits and the
objective's metrics, so export needs nothing but the study.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import optuna

from kvtuner import defaults
from kvtuner.config import PrecisionConfig
from kvtuner.search.objectives import Objective
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.search.study import completed_by_key

EFFECTIVE_BITS_CONTEXT = defaults.BUDGET_CONTEXT  # tokens at which effective bits are reported
COPIED_ATTRS = ("layers", "equivalent_bits", "effective_bits", "metrics")


@dataclass(frozen=True)
class Score:
    values: list[float]
    constraint: float
    user_attrs: dict[str, Any]
    duplicate_of: int | None = None


@dataclass
class Scorer:
    """Turns group choices into a config, and the config into values via `objective` (once per config)."""

    problem: SearchProblem
    objective: Objective
    model: str
    shape: Any  # kvtuner.memory.ModelShape
    context: int = EFFECTIVE_BITS_CONTEXT  # tokens at which effective bits are counted

    def config(self, choices: Choices) -> PrecisionConfig:
        """The PrecisionConfig of group choices, in the space's layout."""
        return PrecisionConfig(
            layers=tuple(self.problem.layers(choices)),
            model=self.model,
            **self.problem.space.layout_fields,
        )

    def score(self, study: optuna.Study, choices: Choices) -> Score:
        """Stored values when this assignment was already completed in `study`, else a fresh evaluation."""
        key = self.problem.key(choices)
        bits = self.problem.bits(choices)
        known = completed_by_key(study).get(key)
        if known is not None:
            attrs = {k: known.user_attrs[k] for k in COPIED_ATTRS if k in known.user_attrs}
            return Score(list(known.values), bits - self.problem.cap, attrs, known.number)
        config = self.config(choices)
        measurement = self.objective(config)
        attrs = {
            "layers": key,
            "worker": f"{socket.gethostname()}:{os.getpid()}",  # which process evaluated it
            "equivalent_bits": config.equivalent_bits,
            "effective_bits": config.effective_bits(self.shape, self.context),
            "metrics": measurement.metrics,
        }
        return Score([float(measurement.loss), bits], bits - self.problem.cap, attrs)
