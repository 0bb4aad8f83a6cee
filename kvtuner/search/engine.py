"""NSGA-II over what a serving engine can express (`kvtuner search --target`): joint KL against bits.

A trial picks one engine setting (`setting`: vLLM's dtype, a llama.cpp K/V pair, LMDeploy's
policy, ModelOpt's mixed map) and, where the engine allows a per-layer choice (vLLM's skipped
layers, ModelOpt's per-layer formats), one candidate per layer (`l<i>`, an index into the
setting's candidates). Its objectives: the joint KL of `EngineKVCache` on calibration samples, and
the effective bits of engine storage; a plan over the largest cap is infeasible (Optuna's
constraints). The knapsack's plans seed a new study (when the target was calibrated). The study
lives in Optuna storage: started again with the same storage and name, it continues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from kvtuner.memory import engine_effective_bits
from kvtuner.plan import EnginePlan
from kvtuner.targets import Choice, usable_families

SETTING = "setting"


@dataclass(frozen=True)
class EngineSpace:
    """The settings of one target a model can take, and the per-layer candidates of each."""

    target: str
    families: dict[str, tuple[Choice, ...]]
    num_layers: int
    head_dim: int
    windows: tuple[int | None, ...]
    context: int

    @classmethod
    def of(
        cls,
        target: str,
        num_layers: int,
        head_dim: int,
        windows: Sequence[int | None],
        context: int,
    ) -> EngineSpace:
        return cls(
            target, usable_families(target, head_dim), num_layers, head_dim, tuple(windows), context
        )

    @property
    def per_layer(self) -> int:
        """Candidates per layer (the same in every setting of a target); 1: no per-layer choice."""
        return max(len(c) for c in self.families.values())

    def plan(self, setting: str, indices: Sequence[int]) -> EnginePlan:
        candidates = self.families[setting]
        layers = tuple(candidates[min(i, len(candidates) - 1)] for i in indices)
        return EnginePlan(self.target, setting, layers)

    def params(self, plan: EnginePlan) -> dict[str, Any]:
        """The trial parameters that give `plan` (for seeding)."""
        candidates = self.families[plan.family]
        params: dict[str, Any] = {SETTING: plan.family}
        if self.per_layer > 1:
            params.update({f"l{i}": candidates.index(c) for i, c in enumerate(plan.layers)})
        return params

    def suggest(self, trial: optuna.Trial) -> EnginePlan:
        setting = trial.suggest_categorical(SETTING, list(self.families))
        if self.per_layer == 1:
            return self.plan(setting, [0] * self.num_layers)
        choices = list(range(self.per_layer))
        indices = [trial.suggest_categorical(f"l{i}", choices) for i in range(self.num_layers)]
        return self.plan(setting, indices)

    def bits(self, plan: EnginePlan) -> float:
        return engine_effective_bits(plan.layers, self.head_dim, self.windows, self.context)


def plan_key(plan: EnginePlan) -> str:
    return " ".join(c.label for c in plan.layers)


def run_engine_search(
    space: EngineSpace,
    score: Callable[[EnginePlan], float],
    *,
    max_bits: float,
    trials: int,
    population: int,
    storage: Any,
    study_name: str,
    seeds: Sequence[EnginePlan] = (),
    seed: int = 0,
    progress: bool = True,
) -> optuna.Study:
    """Run (or continue) the study until it holds `trials` finished trials; `score(plan)` is the
    joint KL. A plan scored before (same per-layer choices) is not scored again."""
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        study.set_user_attr("target", space.target)
        study.set_user_attr("kvtuner_engine_study", 1)
        for plan in seeds:
            study.enqueue_trial(space.params(plan), skip_if_exists=True)
    known = {t.user_attrs["key"]: t.values for t in done if "key" in t.user_attrs}

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        plan = space.suggest(trial)
        key, bits = plan_key(plan), space.bits(plan)
        trial.set_user_attr("key", key)
        trial.set_user_attr("bits", bits)
        trial.set_constraint("bits", bits - max_bits)
        if key not in known:
            known[key] = (score(plan), bits)
        return known[key][0], bits

    remaining = trials - len(done)
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress)
    return study


def best_per_cap(
    study: optuna.Study, space: EngineSpace, caps: Sequence[float]
) -> dict[float, tuple[EnginePlan, float, float] | None]:
    """Per cap, the finished trial of least KL within it: (plan, KL, bits), or None."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[float, tuple[EnginePlan, float, float] | None] = {}
    for cap in caps:
        fits = [t for t in done if t.values[1] <= cap + 1e-9]
        if not fits:
            out[cap] = None
            continue
        best = min(fits, key=lambda t: (t.values[0], t.values[1]))
        setting = best.params[SETTING]
        indices = [best.params.get(f"l{i}", 0) for i in range(space.num_layers)]
        out[cap] = (space.plan(setting, indices), best.values[0], best.values[1])
    return out
