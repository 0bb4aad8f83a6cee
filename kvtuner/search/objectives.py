"""Quality objectives of the search, each a small callable: config -> Measurement (loss to minimize).

- `kl` (default): mean KL(full precision || quantized) on held-out samples (`kvtuner.evaluate`).
- `ppl`: perplexity with the same protocol.
- `accuracy`: 1 - exact-match accuracy on a GSM8K-style JSONL (the paper's objective).
- `proxy`: sum over layers of the calibrated e_o of each layer's pair: free, no model run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from kvtuner.config import PrecisionConfig
from kvtuner.errors import ConfigError
from kvtuner.evaluate import Evaluator, Task, accuracy
from kvtuner.precision import PrecisionPair

OBJECTIVES: tuple[str, ...] = ("kl", "ppl", "accuracy", "proxy")


@dataclass(frozen=True)
class Measurement:
    """What one evaluation gives: the loss the search minimizes and metrics kept with the trial."""

    loss: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Objective(Protocol):
    name: str

    def __call__(self, config: PrecisionConfig) -> Measurement: ...


@dataclass
class HeldoutObjective:
    """`kl` or `ppl` of the config's cache on the evaluator's held-out samples."""

    evaluator: Evaluator
    name: str = "kl"

    def __call__(self, config: PrecisionConfig) -> Measurement:
        result = self.evaluator.evaluate(config)
        return Measurement(getattr(result, self.name), _eval_metrics(result))


@dataclass
class AccuracyObjective:
    model: Any
    tokenizer: Any
    tasks: Sequence[Task]
    max_new_tokens: int = 256
    name: str = "accuracy"

    def __call__(self, config: PrecisionConfig) -> Measurement:
        result = accuracy(
            self.model, self.tokenizer, config, self.tasks, max_new_tokens=self.max_new_tokens
        )
        metrics = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total}
        return Measurement(1.0 - result.accuracy, metrics)


@dataclass
class ProxyObjective:
    """Sum of e_o over layers; `errors[(layer, pair)]` from the calibration's sensitivity table."""

    errors: dict[tuple[int, PrecisionPair], float]
    name: str = "proxy"

    @classmethod
    def from_table(cls, sensitivity: pd.DataFrame) -> ProxyObjective:
        return cls(
            {
                (int(r.layer), PrecisionPair(int(r.key_bits), int(r.value_bits))): float(r.e_o)
                for r in sensitivity.itertuples(index=False)
            }
        )

    def __call__(self, config: PrecisionConfig) -> Measurement:
        total = 0.0
        for layer, pair in enumerate(config.layers):
            if (layer, pair) not in self.errors:
                raise ConfigError(
                    f"sensitivity table has no e_o for layer {layer}, pair {pair.name}"
                )
            total += self.errors[(layer, pair)]
        return Measurement(total, {"proxy": total})


def _eval_metrics(result: Any) -> dict[str, Any]:
    return {
        "kl": result.kl,
        "ppl": result.ppl,
        "tokens": result.tokens,
        "per_sample_kl": [round(x, 8) for x in result.per_sample_kl],
    }
