"""Default backend: Optuna's NSGA-II with the bit cap as a constraint (`trial.set_constraint`).

`CappedNSGAIISampler` proposes only configs inside the cap where it can: it redraws an NSGA-II
child (crossover, then random mutation of the dropped groups) a few times until one is under the
cap and not yet evaluated, and repairs the last draw otherwise. Every group's choice is made in
`sample_relative`, so the first generation is drawn inside the cap too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import NSGAIISampler
from optuna.trial import FrozenTrial

from kvtuner.precision import PrecisionPair, parse_pair
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.search.scoring import Scorer
from kvtuner.search.study import completed_by_key, completed_trials, live_keys
from kvtuner.search.trial_loop import TrialLoop


class CappedNSGAIISampler(NSGAIISampler):
    """NSGA-II whose children move locally and are redrawn or repaired until they fit `problem.cap`.

    Crossover is Optuna's (uniform, between two tournament-selected parents). Mutation is ours:
    each group moves to a neighbouring candidate (one step up or down in bits) with probability
    1 / groups, since a jump from KV8 to KV2 is rarely an improvement.
    """

    def __init__(
        self, problem: SearchProblem, *, tries: int = 20, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(seed=seed, mutation_prob=0.0, **kwargs)
        self.problem = problem
        self.tries = tries
        self._draw = random.Random(seed)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {
            name: CategoricalDistribution([p.name for p in cands])
            for name, cands in zip(self.problem.names, self.problem.candidates)
        }

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:  # an enqueued seed: joins a generation as it is
            self.get_trial_generation(study, trial)
            return {}
        variable = {name: d for name, d in search_space.items() if not d.single()}
        # configs done, running in another worker or queued are not proposed again
        seen = set(completed_by_key(study)) | live_keys(study, self.problem)
        choices = None
        for _ in range(self.tries):
            child = super().sample_relative(study, trial, variable) if variable else {}
            if child:
                choices = self._mutate(
                    tuple(self._value(child, name) for name in self.problem.names)
                )
            else:  # first generation: a random config
                choices = self.problem.random(self._draw)
            if self.problem.feasible(choices) and self.problem.key(choices) not in seen:
                return self.problem.params(choices)
        return self.problem.params(self.problem.repair(choices, self._draw))

    def _value(self, child: dict[str, Any], name: str) -> PrecisionPair:
        if name in child:
            return parse_pair(child[name])
        return self.problem.candidates[self.problem.names.index(name)][
            0
        ]  # a single-candidate group

    def _mutate(self, choices: Choices) -> Choices:
        rate = 1.0 / len(choices)
        out = list(choices)
        for g, (cands, pair) in enumerate(zip(self.problem.candidates, choices)):
            if len(cands) > 1 and self._draw.random() < rate:
                i = cands.index(pair) + self._draw.choice((-1, 1))
                out[g] = cands[min(max(i, 0), len(cands) - 1)]
        return tuple(out)


def run_optuna(
    study: optuna.Study,
    scorer: Scorer,
    total_trials: int,
    on_trial: Callable[[list[FrozenTrial]], None] | None = None,
) -> None:
    """Run trials on `study` (its sampler set by the caller) until it holds `total_trials` completed
    ones, also when other workers share it (see `TrialLoop`)."""
    problem = scorer.problem
    choices_of: dict[int, Choices] = {}

    def suggest(trial: optuna.Trial) -> str:
        choices = tuple(
            parse_pair(trial.suggest_categorical(name, [p.name for p in cands]))
            for name, cands in zip(problem.names, problem.candidates)
        )
        choices_of[trial.number] = choices
        return problem.key(choices)

    def evaluate(trial: optuna.Trial) -> list[float]:
        score = scorer.score(study, choices_of.pop(trial.number))
        for key, value in score.user_attrs.items():
            trial.set_user_attr(key, value)
        if score.duplicate_of is not None:
            trial.set_user_attr("duplicate_of", score.duplicate_of)
        trial.set_constraint("bits", score.constraint)
        return [score.values[0], score.values[1]]

    def key_of(params: dict[str, Any]) -> str | None:
        if not all(name in params for name in problem.names):
            return None
        return problem.key(problem.from_params(params))

    def report() -> None:
        if on_trial is not None:
            on_trial(completed_trials(study))

    TrialLoop(study, total_trials, suggest, evaluate, key_of, on_change=report).run()
