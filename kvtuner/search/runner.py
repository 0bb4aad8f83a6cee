"""Run a search end to end: prepare, open the study, seed it, run trials (in N processes), export.

`--trials N` is the study's total of completed trials, exactly, however many workers share it:
running the same command again after a kill continues where the study stopped. With `--workers N`
the parent seeds the study, starts N processes that each load the model and pull trials from the
shared storage, shows progress from the storage, and exports when they are done. Workers on other
machines join by running the same command with the same `--storage` URL. A worker that dies loses
nothing: its trial is failed (at once when it ran on this machine, else by heartbeat) and its config
run again by another worker; the parent reports one line when workers fail or the database is lost.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from kvtuner import defaults
from kvtuner.errors import KVTunerError
from kvtuner.search.export import ExportResult, export_study
from kvtuner.search.faults import reap_dead_local_workers
from kvtuner.search.objectives import (
    AccuracyObjective,
    HeldoutObjective,
    Objective,
    ProxyObjective,
)
from kvtuner.search.optuna_backend import CappedNSGAIISampler, run_optuna
from kvtuner.search.progress import SearchProgress
from kvtuner.search.pymoo_backend import run_pymoo
from kvtuner.search.scoring import Scorer
from kvtuner.search.settings import PreparedSearch, SearchSettings, load_for_search, prepare
from kvtuner.search.study import (
    completed_by_key,
    completed_trials,
    enqueue_seeds,
    open_study,
    storage_error_types,
    storage_errors,
)


@dataclass(frozen=True)
class SearchOutcome:
    """What a search run did and where its outputs are."""

    study_name: str
    storage: str
    objective: str
    backend: str
    trials: int
    new_trials: int
    seconds: float
    groups: int
    space_size: int
    export: ExportResult


def run_search(
    settings: SearchSettings, *, loaded: Any = None, quiet: bool = False
) -> SearchOutcome:
    """Search until the study holds `settings.trials` completed trials, then export; see module doc."""
    started = time.perf_counter()
    # our bar reports trials; Optuna's warnings (a lost database: SQL, retries) would bury our one line
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with storage_errors(settings.storage or "the study's storage"):
        prep = prepare(settings, loaded=loaded, quiet=quiet)
    # the model loads (and the reference is computed) before the study is written and the bar starts
    scorer = make_scorer(prep, quiet) if settings.workers == 1 else None
    with storage_errors(prep.storage_url):
        study = _open(prep, index=0)
        before = len(completed_trials(study))
        if settings.backend == "optuna":
            enqueue_seeds(study, prep.problem, prep.seeds, prep.seed_kinds)
        progress = SearchProgress(
            settings.trials, settings.caps, settings.objective, done=before, quiet=quiet
        )
        progress.refresh(completed_trials(study))
        warning = None
        try:
            if scorer is not None:
                search_trials(prep, study, scorer, index=0, on_trial=progress.refresh)
            else:
                warning = _run_processes(prep, study, progress)
        finally:
            progress.close()
        if warning is not None:
            print(f"kvtuner: warning: {warning}", file=sys.stderr)
        rescore_study(prep, study, quiet)
        export = export_study(study, prep.out_dir, settings.caps, found_by=settings.command or None)
        after = len(completed_trials(study))
    return SearchOutcome(
        study_name=prep.study_name,
        storage=prep.where,
        objective=settings.objective,
        backend=settings.backend,
        trials=after,
        new_trials=after - before,
        seconds=time.perf_counter() - started,
        groups=len(prep.space.groups),
        space_size=prep.space.size,
        export=export,
    )


def make_scorer(prep: PreparedSearch, quiet: bool = False) -> Scorer:
    """The objective of `prep` behind the once-per-config scorer (loads the model unless proxy)."""
    scorer = Scorer(
        prep.problem,
        build_objective(prep, quiet),
        prep.model_name,
        prep.shape,
        prep.settings.budget_context,
    )
    evaluator = getattr(scorer.objective, "evaluator", None)
    if evaluator is not None:
        evaluator.reference()
    return scorer


def search_trials(
    prep: PreparedSearch,
    study: optuna.Study,
    scorer: Scorer,
    *,
    index: int = 0,
    on_trial: Callable[[list[FrozenTrial]], None] | None = None,
) -> None:
    """Run this process's share of trials on `study` with the chosen backend."""
    settings = prep.settings
    if settings.backend == "optuna":
        run_optuna(study, scorer, settings.trials, on_trial)
        return
    _evaluate_seeds(study, scorer, prep, on_trial)
    run_pymoo(
        study,
        scorer,
        settings.trials,
        population=settings.population,
        seeds=prep.seeds,
        seed=_sampler_seed(settings, index),
        on_trial=on_trial,
    )


def build_objective(prep: PreparedSearch, quiet: bool = False) -> Objective:
    """The objective of `prep.settings` (loads the model unless the objective is `proxy`)."""
    settings = prep.settings
    if settings.objective == "proxy":
        return ProxyObjective.from_table(prep.sensitivity)
    if prep.loaded is None:
        prep.loaded = load_for_search(settings, quiet)
    model, tokenizer = prep.loaded.model, prep.loaded.tokenizer
    if settings.objective == "accuracy":
        from kvtuner.evaluate import load_tasks

        return AccuracyObjective(
            model, tokenizer, load_tasks(settings.tasks), settings.max_new_tokens
        )
    evaluator = search_evaluator(prep, skip=defaults.LAYER_KL_SAMPLES, count=settings.samples)
    return HeldoutObjective(evaluator, settings.objective)  # kl or ppl


def search_evaluator(prep: PreparedSearch, *, skip: int, count: int, quiet: bool = True) -> Any:
    """An Evaluator on calibration-side windows `skip .. skip + count - 1` (never the held-out
    text, which judges the search's results; the single-layer KL used windows 0..15)."""
    from kvtuner.data import calibration_text, calibration_windows
    from kvtuner.evaluate import Evaluator

    settings = prep.settings
    if prep.loaded is None:
        prep.loaded = load_for_search(settings, quiet)
    protocol = settings.protocol(prep.context)
    windows = calibration_windows(
        prep.loaded.tokenizer,
        calibration_text(settings.text),
        protocol.context,
        skip=skip,
        count=count,
        seed=settings.seed,
        extra=max(protocol.continuation, defaults.SEARCH_CONTINUATION),
    )
    samples = windows[:, : protocol.seq_len]
    return Evaluator(prep.loaded.model, samples, protocol, progress=not quiet)


def rescore_study(prep: PreparedSearch, study: optuna.Study, quiet: bool = False) -> None:
    """Re-score the best candidates of each cap on `--rescore-samples` more windows (kl only)."""
    from kvtuner.search.problem import parse_layers_key
    from kvtuner.search.rescore import rescore

    settings = prep.settings
    if settings.objective != "kl" or not settings.rescore_samples or not settings.rescore_top:
        return
    evaluator = search_evaluator(
        prep,
        skip=defaults.LAYER_KL_SAMPLES + settings.samples,
        count=settings.rescore_samples,
        quiet=quiet,
    )
    fields = prep.space.layout_fields

    def evaluate(key: str) -> list[float]:
        from kvtuner.config import PrecisionConfig

        config = PrecisionConfig(layers=tuple(parse_layers_key(key)), **fields)
        return list(evaluator.evaluate(config).per_sample_kl)

    anchors = {}
    if prep.losses is not None:
        from kvtuner.search.seeding import knapsack_at

        for cap in settings.caps:
            choices = knapsack_at(prep.problem, prep.losses, cap)
            if choices is not None:
                anchors[cap] = prep.problem.key(choices)
    rescore(study, evaluate, settings.caps, settings.rescore_top, anchors=anchors,
            progress=not quiet)  # fmt: skip


def _open(prep: PreparedSearch, index: int) -> optuna.Study:
    settings = prep.settings
    sampler = CappedNSGAIISampler(
        prep.problem, population_size=settings.population, seed=_sampler_seed(settings, index)
    )
    study = open_study(prep.storage, prep.study_name, prep.signature, sampler, where=prep.where)
    if "layout" not in study.user_attrs:
        study.set_user_attr("layout", prep.space.layout_fields)
        study.set_user_attr("groups", [list(g.layers) for g in prep.space.groups])
        study.set_user_attr("command", settings.command or "kvtuner search")
    return study


def _sampler_seed(settings: SearchSettings, index: int) -> int:
    """`--seed` for a lone local run (reproducible); mixed with host and process where others may share the study."""
    if settings.workers == 1 and settings.storage is None:
        return settings.seed
    text = f"{settings.seed}|{index}|{socket.gethostname()}|{os.getpid()}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _evaluate_seeds(
    study: optuna.Study,
    scorer: Scorer,
    prep: PreparedSearch,
    on_trial: Callable[[list[FrozenTrial]], None] | None,
) -> None:
    """pymoo has no trial queue: record the seeds as trials first, so the front always holds them."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    problem = prep.problem
    distributions = {
        n: CategoricalDistribution([p.name for p in c])
        for n, c in zip(problem.names, problem.candidates)
    }
    for choices, kind in zip(prep.seeds, prep.seed_kinds):
        if (
            problem.key(choices) in completed_by_key(study)
            or len(completed_trials(study)) >= prep.settings.trials
        ):
            continue
        score = scorer.score(study, choices)
        attrs = {**score.user_attrs, "seed": kind, "backend": "pymoo"}
        study.add_trial(
            create_trial(
                params=problem.params(choices),
                distributions=distributions,
                values=score.values,
                user_attrs=attrs,
                constraints={"bits": score.constraint},
            )
        )
        if on_trial is not None:
            on_trial(completed_trials(study))


def _run_processes(
    prep: PreparedSearch, study: optuna.Study, progress: SearchProgress
) -> str | None:
    """Start `--workers` processes on the study, show progress, and report their faults in one line.

    A worker that dies has its running trial failed at once, so the others run its config again;
    when the study still reaches its total, that is a warning (returned), not an error.
    """
    settings = prep.settings
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    context = multiprocessing.get_context("spawn")
    # workers send their one-line errors through a pipe instead of printing them (a pipe holds no
    # lock that a killed worker could leave behind)
    pipes = [context.Pipe(duplex=False) for _ in range(settings.workers)]
    processes = [
        context.Process(target=worker_main, args=(settings, i, threads, send))
        for i, (_, send) in enumerate(pipes)
    ]
    for process, (_, send) in zip(processes, pipes):
        process.start()
        send.close()  # the worker holds its own copy
    lost: BaseException | None = None
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(1.0)
            if lost is not None:
                continue  # the database is away: the workers will stop on their own
            try:
                if any(p.exitcode not in (None, 0) for p in processes):
                    reap_dead_local_workers(study)
                progress.refresh(completed_trials(study))
            except storage_error_types() as exc:
                lost = exc
    finally:
        for process in processes:
            process.join()
    messages = [m for m in (_message(receive) for receive, _ in pipes) if m is not None]
    if messages:
        more = f" ({len(messages)} of {len(processes)} workers)" if len(messages) > 1 else ""
        raise KVTunerError(messages[0] + more)
    if lost is not None:
        raise lost
    reap_dead_local_workers(study)
    done = len(completed_trials(study))
    progress.refresh(completed_trials(study))
    died = [(i, p.exitcode) for i, p in enumerate(processes) if p.exitcode != 0]
    if not died:
        return None
    codes = ", ".join(f"worker {i} {_exit_reason(code)}" for i, code in died)
    if done >= settings.trials:
        again = "its running trial was" if len(died) == 1 else "their running trials were"
        return f"{codes}; {again} run again by the other workers"
    raise KVTunerError(
        f"{len(died)} of {len(processes)} workers failed ({codes}); the study holds {done} of "
        f"{settings.trials} trials: run the same command again to continue"
    )


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited with {code}"


def _message(receive: Any) -> str | None:
    """The error a worker sent, or None (it sent nothing; a pipe closed empty reads as EOF)."""
    try:
        return receive.recv() if receive.poll() else None
    except (EOFError, OSError):
        return None


def worker_main(settings: SearchSettings, index: int, threads: int, errors: Any = None) -> None:
    """Entry point of a worker process: load the model, pull trials from the shared study, exit.

    A user error goes to `errors` (the sending end of a pipe the parent reads) when given, else
    to stderr; exit 2.
    """
    import threading

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore: a killed worker would leave it behind
    # ("leaked semaphore" at the parent's exit); a quiet worker needs no lock across processes
    tqdm.set_lock(threading.RLock())
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with storage_errors(settings.storage or "the study's storage"):
            prep = prepare(settings, quiet=True, calibrate=False)
            study = _open(prep, index)
            search_trials(prep, study, make_scorer(prep, quiet=True), index=index)
    except KVTunerError as exc:
        if errors is None:
            print(f"kvtuner: error: worker {index}: {exc}", file=sys.stderr)
        else:
            errors.send(f"worker {index}: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
