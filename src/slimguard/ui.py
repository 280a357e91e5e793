"""Console output: rich progress bars with ETA, silenced by ``--quiet`` / ``--json`` or ``set_quiet``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

_QUIET = os.environ.get("SLIMGUARD_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def _rank() -> int:
    """This process's rank in an initialised ``torch.distributed`` group (0 when there is none); looked up
    without importing torch.distributed, so a plain run pays nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


class _NullTask:
    def advance(self, n: float = 1, **fields: Any) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


class _Task:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._p = progress
        self._id = task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._p.update(self._id, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        self._p.update(self._id, **fields)


@contextlib.contextmanager
def progress(total: float, description: str, enabled: bool = True) -> Iterator[_Task | _NullTask]:
    """A progress bar with ETA on stderr; a no-op when quiet or disabled."""
    if _QUIET or not enabled or _rank() != 0:  # in a data-parallel run only rank 0 shows progress
        yield _NullTask()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    with bar:
        yield _Task(bar, bar.add_task(description, total=total, info=""))
