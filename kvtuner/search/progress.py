"""Progress bar of a search (stderr): completed trials, and the best feasible loss under each cap."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm


def best_under_caps(
    trials: Sequence[FrozenTrial], caps: Sequence[float]
) -> dict[float, FrozenTrial]:
    """For each cap, the completed trial with the lowest loss whose equivalent bits are under it."""
    best: dict[float, FrozenTrial] = {}
    for trial in trials:
        if trial.values is None:
            continue
        loss, bits = trial.values
        for cap in caps:
            if bits <= cap + 1e-9 and (cap not in best or loss < best[cap].values[0]):
                best[cap] = trial
    return best


class SearchProgress:
    """A tqdm bar over the total trial count; `refresh(trials)` moves it and shows `c3.5 0.412` per cap."""

    def __init__(
        self,
        total: int,
        caps: Sequence[float],
        objective: str,
        *,
        done: int = 0,
        quiet: bool = False,
    ) -> None:
        self.caps = sorted(caps)
        self.objective = objective
        # `initial` keeps the rate of a resumed search about this run's trials only
        self.bar = tqdm(
            total=total,
            initial=min(done, total),
            desc=f"search ({objective})",
            unit="trial",
            file=sys.stderr,
            disable=quiet,
        )

    def refresh(self, completed: Sequence[FrozenTrial]) -> None:
        self.bar.n = min(len(completed), self.bar.total)
        best = best_under_caps(completed, self.caps)
        postfix = " ".join(
            f"c{cap:g} {best[cap].values[0]:.4g}" for cap in self.caps if cap in best
        )
        self.bar.set_postfix_str(
            f"best {self.objective}: {postfix}" if postfix else "no feasible trial yet"
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
