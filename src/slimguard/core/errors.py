"""One error hierarchy.

Every error a user can cause (a bad path, a wrong recipe key, data that does not fit the model, a
corrupted artifact) derives from :class:`UserError`. The CLI prints those as one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlimguardError(Exception):
    """Base of every error slimguard raises on purpose."""


class UserError(SlimguardError):
    """A problem the user can fix. ``str(err)`` is one line naming the problem and the way out."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config or recipe value is wrong: names the key, the value and what is allowed."""


class DataError(UserError, ValueError):
    """Data that is missing, malformed, or does not fit the model."""


class ModelError(UserError):
    """A model source that cannot be found or built, or a model a transform cannot handle."""


class ArtifactError(UserError):
    """An artifact that is truncated, corrupted, tampered with, or from a newer format."""


class OutputError(UserError):
    """An output path that cannot be used: a file where a folder belongs (or the reverse), or not writable."""


class NotFittedError(UserError, RuntimeError):
    """An object (detector, contract, observer) used before ``fit``."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a friendly :class:`MissingExtraError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"{module!r} is not installed; install it with: pip install 'slimguard[{extra}]'"
        ) from exc
