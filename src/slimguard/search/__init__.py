"""Accuracy-aware automatic optimization: a multi-objective search across techniques (``slimguard optimize``).

The search space is built from the registered steps' configs (:mod:`slimguard.search.space`), each
candidate pipeline runs through the same step runner as recipes and is measured on validation data only
(:mod:`slimguard.search.objectives`: accuracy drop against a budget in points, file bytes, paired speed
ratio on the target runtime, PyTorch or ONNX Runtime, and optionally the error under a PGD attack), Optuna
drives the search with the budget as a constraint and keeps the study in storage that outlives the process
(:mod:`slimguard.search.study`), and the end of the search scores the Pareto front on the test split once
and writes ``pareto.json``, ``best.yaml``, ``model.slim`` and ``report.html`` (:mod:`slimguard.search.outputs`).

Example:
    >>> from slimguard.search import Settings, optimize
    >>> result = optimize(Settings(model="zoo:digits-mlp", data="digits", out="out/opt", budget=1.0,
    ...                            objectives=("size", "latency"), trials=20))
    >>> result["chosen_point"]["size_ratio"], result["chosen_point"]["test_accuracy_drop_points"]
"""

from __future__ import annotations

import sys
from typing import Any

from slimguard.core.outputs import check_output_dir, check_output_file
from slimguard.search.outputs import OUTPUT_FILES, finalize
from slimguard.search.progress import LiveTable
from slimguard.search.space import DEFAULT_SEARCH, STAGES, SearchSpace, build_space, read_search_file
from slimguard.search.study import Session, Settings, run_trials, run_workers
from slimguard.search.warmstart import describe
from slimguard.ui import is_quiet

__all__ = ["DEFAULT_SEARCH", "STAGES", "SearchSpace", "Session", "Settings", "build_space", "optimize",
           "read_search_file"]


def optimize(settings: Settings, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a search and write its outputs to ``settings.out``.

    The output folder is checked before any work. The study is opened (or resumed) in its storage, the cheap
    proxies run once, then trials run until the study holds ``settings.trials`` finished ones, in this
    process or in ``settings.workers`` local worker processes. A new study first runs the shipped recipes the
    space can express (``settings.warm_start``; :mod:`slimguard.search.warmstart`), and the search then extends
    its best points by one more stage (``settings.local_moves``; :mod:`slimguard.search.localmoves`). Ctrl-C
    leaves the study resumable: the same call (or command) continues it.

    Returns:
        ``pareto.json``'s object (see :mod:`slimguard.search.outputs`) plus ``chosen_point`` and ``files``.

    Raises:
        ConfigError: bad settings or search space, or a study under that name that searches something else.
        NothingFeasible: no trial met the budget on validation.
    """
    out = check_output_dir(settings.out)
    for name in OUTPUT_FILES:
        check_output_file(out / name)
    out.mkdir(parents=True, exist_ok=True)
    session = Session.start(settings, progress=progress)
    if progress and session.warm_plan is not None and not is_quiet():  # once: when the study is created
        for line in describe(session.warm_plan):
            print(line, file=sys.stderr)
    with LiveTable(session.study, trials=settings.trials, budget=settings.budget, enabled=progress) as live:
        if settings.workers == 1:
            run_trials(settings, session.study, session.objective, [live, *session.callbacks()])
        else:
            run_workers(settings, session, live.update)
    return finalize(session)
