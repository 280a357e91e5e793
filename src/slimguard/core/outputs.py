"""Where results go: output locations checked before any work starts, and atomic writers.

Every file slimguard writes goes through a temporary file in the destination folder and an
``os.replace``, so a reader sees either the old file or the new one, never half of one. ``mkstemp``
creates its file with mode 0600; :func:`set_default_mode` gives it the mode an ordinary ``open`` would
(``0o666`` less the process umask) before the rename, so saved artifacts and reports are as readable
as any other file the user creates.

:func:`check_output_dir` and :func:`check_output_file` look at an output path before a long run: a
file where a folder is expected, a folder where a file is expected, or a place that cannot be written
is refused at once with an :class:`~slimguard.core.errors.OutputError` (one line, exit code 2).

Example:
    >>> out = check_output_dir("runs/demo")            # before any work
    >>> write_json_atomic(out / "metrics.json", {"accuracy": 0.97})
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from slimguard.core.errors import OutputError


# ---- permissions -----------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def set_default_mode(path: str | os.PathLike[str]) -> None:
    """Give a temporary file (``mkstemp`` makes them 0600) the mode of a normally created file."""
    os.chmod(path, default_mode())


# ---- atomic writers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` (mode as
    :func:`default_mode`), on any error it is removed and ``path`` is untouched. The folder is created.

    Args:
        path: the destination file.
        binary: yield a binary handle (default: UTF-8 text).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        set_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_write(path, binary=True) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (unknown types as ``str``) atomically; return the path."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    return Path(path)


# ---- output checks ---------------------------------------------------------------------------------------
def _nearest_existing(p: Path) -> Path:
    for candidate in (p, *p.parents):
        if candidate.exists():
            return candidate
    return Path(p.anchor or ".")


def _check_creatable(p: Path, what: str, shown: str) -> None:
    """The nearest existing folder on the way to ``p`` must be a writable folder."""
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise OutputError(f"{what} {shown}: {base} is a file, not a folder; choose a path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {shown}: cannot write in {base} (permission denied); "
                          "choose a writable location")


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Refuse an output folder that cannot be used, before any work; return it as a Path.

    Refused: ``path`` is an existing file, a file stands where one of its parent folders should be,
    or the folder (or the nearest existing parent, when it is still to be created) is not writable.

    Raises:
        OutputError: one line naming the path, the problem and the way out.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; give a folder path (created if missing)")
    _check_creatable(p, what, str(path))
    return p


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Refuse an output file that cannot be written, before any work; return it as a Path.

    Refused: ``path`` is an existing folder or other non-regular file, a file stands where one of its
    parent folders should be, or the folder it goes in (or the nearest existing parent) is not writable.
    An existing regular file is fine: it is replaced atomically.

    Raises:
        OutputError: one line naming the path, the problem and the way out.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {path} is a folder; give the path of a file to write")
    if p.exists() and not p.is_file():
        raise OutputError(f"{what} {path} exists and is not a regular file; choose another path")
    _check_creatable(p.parent, what, str(path))
    return p
