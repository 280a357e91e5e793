"""Shared CLI pieces: user-error handling, output modes (table, ``--json``, ``--quiet``), and the options
every command that loads a model takes to load ``.slim`` artifacts safely (``--trust-code``,
``--require-signature``, ``--key-env``) with :func:`load_policy` and :func:`load_source`."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from slimguard.core.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from slimguard.artifact import LoadPolicy

P = ParamSpec("P")
R = TypeVar("R")

JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (no tables, no progress).")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; errors still print.")
TRUST_CODE_OPT = typer.Option(
    None, "--trust-code", metavar="FILE.py",
    help="Rebuild a .slim whose model comes from a Python factory from this file (its sha256 must match the "
         "one recorded in the artifact); such artifacts are refused without it.")
REQUIRE_SIGNATURE_OPT = typer.Option(
    False, "--require-signature", help="Refuse a .slim that carries no valid signature.")
KEY_ENV_OPT = typer.Option(
    None, "--key-env", metavar="VAR",
    help="Environment variable holding the signing key(s) a .slim must be signed with, comma-separated "
         "(default: SLIMGUARD_SIGNING_KEY). Once a key is set, unsigned files are refused.")


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn UserError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def load_policy(trust_code: Path | None, require_signature: bool, key_env: str | None) -> LoadPolicy:
    """The :class:`~slimguard.artifact.LoadPolicy` of the shared loading options; ConfigError when
    ``--key-env`` names a variable that is unset or holds no key."""
    from slimguard.artifact import LoadPolicy, parse_keys

    keys = None
    if key_env is not None:
        keys = tuple(parse_keys(os.environ.get(key_env, "")))
        if not keys:
            raise ConfigError(f"--key-env {key_env}: the environment variable {key_env} is unset or empty; "
                              "export it with the key(s), comma-separated")
    return LoadPolicy(trust_code=str(trust_code) if trust_code is not None else None, key=keys,
                      require_signature=require_signature)


def load_source(source: str, policy: LoadPolicy, *, progress: bool, seed: int = 0) -> nn.Module:
    """Load a model source (``zoo:``, ``python:``, ``hf:``, ``minilm`` or a ``.slim`` under ``policy``)."""
    from slimguard.models.sources import load_model

    return load_model(source, seed=seed, progress=progress, policy=policy)


def set_output(json_out: bool, quiet: bool) -> None:
    from slimguard.ui import set_quiet

    set_quiet(json_out or quiet)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(fmt(v) for v in r))
    Console().print(table)


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"
