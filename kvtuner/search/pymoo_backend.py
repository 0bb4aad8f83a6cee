"""Second backend: pymoo's NSGA2 on integer variables (index into each group's candidates).

Same objective, constraint and output as the Optuna backend: every new evaluation is recorded in
the same Optuna study (`study.add_trial`), so resume, export and dedupe are shared. On resume the
first population is rebuilt from the study (its best ranked trials), topped up with the seeds.
Candidates are ordered by bits, so SBX and polynomial mutation on the indices move along bits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, create_trial
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.problems.static import StaticProblem

from kvtuner.pareto import pareto_fronts
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.search.scoring import Scorer
from kvtuner.search.study import completed_by_key, completed_trials

STALL_GENERATIONS = (
    25  # generations in a row without a new config: the reachable space is exhausted
)


class CapRepair(Repair):
    """Round to indices, then lower groups until the config fits the cap (SearchProblem.repair)."""

    def __init__(self, problem: SearchProblem, draw: random.Random) -> None:
        super().__init__()
        self.problem = problem
        self.draw = draw

    def _do(self, pm_problem: Problem, X: np.ndarray, **kwargs) -> np.ndarray:
        X = np.clip(np.round(X), pm_problem.xl, pm_problem.xu).astype(int)
        for row in range(len(X)):
            choices = self.problem.from_indices(X[row])
            if not self.problem.feasible(choices):
                X[row] = self.problem.indices(self.problem.repair(choices, self.draw))
        return X


def initial_population(
    study: optuna.Study,
    problem: SearchProblem,
    seeds: Sequence[Choices],
    size: int,
    draw: random.Random,
) -> np.ndarray:
    """Best ranked completed trials (non-dominated fronts in turn), the seeds, then random draws inside the cap."""
    rows: list[Choices] = []
    done = [
        t
        for t in completed_trials(study)
        if t.values is not None
        and t.values[1] <= problem.cap + 1e-9
        and all(n in t.params for n in problem.names)
    ]
    for front in pareto_fronts(np.array([t.values for t in done]).reshape(-1, 2)):
        rows += [problem.from_params(done[i].params) for i in front]
        if len(rows) >= size:
            break
    rows = list(dict.fromkeys(rows))[:size]
    for seed in seeds:
        if len(rows) < size and seed not in rows and problem.feasible(seed):
            rows.append(seed)
    for _ in range(50 * size):
        if len(rows) >= size:
            break
        draw_ = problem.repair(problem.random(draw), draw)
        if draw_ not in rows:
            rows.append(draw_)
    return np.array([problem.indices(c) for c in rows], dtype=int)


def run_pymoo(
    study: optuna.Study,
    scorer: Scorer,
    total_trials: int,
    *,
    population: int,
    seeds: Sequence[Choices],
    seed: int = 0,
    on_trial: Callable[[list[FrozenTrial]], None] | None = None,
) -> None:
    """Run NSGA2 generations, recording each new evaluation in `study`, until `total_trials` are completed."""
    problem = scorer.problem
    draw = random.Random(seed)
    upper = np.array([len(c) - 1 for c in problem.candidates])
    pm_problem = Problem(
        n_var=len(upper), n_obj=2, n_ieq_constr=1, xl=np.zeros_like(upper), xu=upper, vtype=int
    )
    algorithm = NSGA2(
        pop_size=population,
        sampling=initial_population(study, problem, seeds, population, draw),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        repair=CapRepair(problem, draw),
        eliminate_duplicates=True,
    )
    algorithm.setup(pm_problem, termination=NoTermination(), seed=seed, verbose=False)
    distributions = {
        name: CategoricalDistribution([p.name for p in cands])
        for name, cands in zip(problem.names, problem.candidates)
    }
    stalled = 0
    while len(completed_trials(study)) < total_trials and stalled < STALL_GENERATIONS:
        offspring = algorithm.ask()
        F, G, added = [], [], 0
        for x in offspring.get("X"):
            choices = problem.from_indices(np.round(x).astype(int))
            is_new = problem.key(choices) not in completed_by_key(study)
            if is_new and len(completed_trials(study)) >= total_trials:
                return
            score = scorer.score(study, choices)
            if score.duplicate_of is None:
                study.add_trial(
                    create_trial(
                        params=problem.params(choices),
                        distributions=distributions,
                        values=score.values,
                        user_attrs={**score.user_attrs, "backend": "pymoo"},
                        constraints={"bits": score.constraint},
                    )
                )
                added += 1
                if on_trial is not None:
                    on_trial(completed_trials(study))
            F.append(score.values)
            G.append([score.constraint])
        Evaluator().eval(StaticProblem(pm_problem, F=np.array(F), G=np.array(G)), offspring)
        algorithm.tell(infills=offspring)
        stalled = 0 if added else stalled + 1
