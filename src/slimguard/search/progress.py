"""The live table of a running search: trials done, the best so far within the budget, the last trials, ETA.

:class:`LiveTable` reads the study itself (so with ``--workers K`` it shows every worker's trials, and a
resumed study starts from what it already holds); it draws on stderr with rich and does nothing when
quiet. The numbers come from :func:`summary`, which tests can check without a terminal.
"""

from __future__ import annotations

import time
from typing import Any

from slimguard.search.localmoves import REPEAT
from slimguard.ui import is_quiet

LAST_ROWS = 6


def summary(study: Any, *, trials: int, budget: float, started: float, done_at_start: int,
            now: float | None = None) -> dict[str, Any]:
    """Counts and bests of ``study``: ``done`` (finished trials, repeats left out), ``repeats`` (draws of a
    pipeline already measured, replayed), ``total``, ``complete``, ``pruned``,
    ``failed``, ``feasible``, ``best_size_ratio`` and ``best_speed_ratio`` (within the budget; None until
    one is), ``eta_s`` (from this run's pace; None before its first trial) and ``last`` (the newest trials)."""
    import optuna

    states = optuna.trial.TrialState
    all_trials = study.get_trials(deepcopy=False)
    ended = [t for t in all_trials if t.state in (states.COMPLETE, states.PRUNED, states.FAIL)]
    done = [t for t in ended if REPEAT not in t.user_attrs]
    feasible = [t for t in done if t.state == states.COMPLETE and "size_ratio" in t.user_attrs
                and t.user_attrs.get("val_accuracy_drop_points", float("inf")) <= budget + 1e-9
                and t.user_attrs.get("steps")]
    elapsed = (time.monotonic() if now is None else now) - started
    ran = len(done) - done_at_start
    left = max(0, trials - len(done))
    return {
        "done": len(done), "total": trials,
        "complete": sum(t.state == states.COMPLETE for t in done),
        "pruned": sum(t.state == states.PRUNED for t in done),
        "failed": sum(t.state == states.FAIL for t in done),
        "repeats": len(ended) - len(done),
        "feasible": len(feasible),
        "best_size_ratio": min((t.user_attrs["size_ratio"] for t in feasible), default=None),
        "best_speed_ratio": max((t.user_attrs["speed_ratio"] for t in feasible), default=None),
        "eta_s": elapsed / ran * left if ran > 0 else None,
        "elapsed_s": elapsed,
        "last": [_row(t) for t in done[-LAST_ROWS:]],
    }


def _row(t: Any) -> list[str]:
    a = t.user_attrs
    steps = " > ".join(next(iter(s)) for s in a.get("steps", [])) or "(none)"
    drop = a.get("val_accuracy_drop_points")
    return [str(t.number), t.state.name.lower(), steps, "-" if drop is None else f"{drop:.2f}",
            f"{a['size_ratio']:.3f}" if "size_ratio" in a else "-",
            f"{a['speed_ratio']:.2f}x" if "speed_ratio" in a else "-"]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class LiveTable:
    """A rich ``Live`` table on stderr, refreshed by :meth:`update` (an Optuna callback works too)."""

    def __init__(self, study: Any, *, trials: int, budget: float, enabled: bool = True) -> None:
        self.study = study
        self.trials = trials
        self.budget = budget
        self.enabled = enabled and not is_quiet()
        self.started = time.monotonic()
        self.done_at_start = len([t for t in study.get_trials(deepcopy=False)
                                  if t.state.is_finished() and REPEAT not in t.user_attrs])
        self._live: Any = None

    def __enter__(self) -> LiveTable:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(stderr=True), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def __call__(self, study: Any = None, trial: Any = None) -> None:
        self.update()

    def update(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Any:
        from rich.table import Table

        s = summary(self.study, trials=self.trials, budget=self.budget, started=self.started,
                    done_at_start=self.done_at_start)
        best_size = "-" if s["best_size_ratio"] is None else f"{s['best_size_ratio']:.3f}"
        best_speed = "-" if s["best_speed_ratio"] is None else f"{s['best_speed_ratio']:.2f}x"
        table = Table(title=(f"optimize: {s['done']}/{s['total']} trials ({s['pruned']} pruned, {s['failed']} failed, "
                             f"{s['repeats']} repeats not rerun),"
                             f" {s['feasible']} within {self.budget:g} pts; best size {best_size}, best speed "
                             f"{best_speed}; elapsed {_clock(s['elapsed_s'])}, ETA {_clock(s['eta_s'])}"))
        for col in ("trial", "state", "steps", "val drop (pts)", "size ratio", "speed"):
            table.add_column(col, justify="left" if col in ("state", "steps") else "right")
        for row in s["last"]:
            table.add_row(*row)
        return table
