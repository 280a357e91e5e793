"""Shared CLI pieces: one declaration of the options every command shares, user-error handling, output
modes (table, ``--json``, ``--quiet``), and loading models and their data under the artifact policy.

A command is a module-level function whose first parameter is a :class:`Session`, collected by its
module's :class:`Commands`; registering it (:func:`command`) adds the shared options (``--trust-code``,
``--require-signature``, ``--key-env`` for commands that load models; ``--json`` and ``--quiet`` for all),
so a command declares only its own options::

    commands = Commands()
    register = commands.register                      # what the CLI calls for each module


    @commands.add()
    def evaluate(s: Session, model: str = MODEL_ARG, data: str | None = DATA_OPT) -> None:
        m = s.load(model)                             # .slim files under --trust-code / --key-env / ...
        bundle, name = resolve_data(m, data)          # --data, else the data set the model records
        s.emit(run(m, bundle), lambda: ...)           # JSON with --json; tables unless --quiet
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from slimguard.core.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from slimguard.artifact import LoadPolicy
    from slimguard.data.core import DataBundle

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

# ---- the options every command shares, declared once ------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (no tables, no progress).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors still print.")]
TrustCodeOpt = Annotated[Path | None, typer.Option(
    "--trust-code", metavar="FILE.py",
    help="Rebuild a .slim whose model comes from a Python factory from this file (its sha256 must match the "
         "one recorded in the artifact); such artifacts are refused without it.")]
RequireSignatureOpt = Annotated[bool, typer.Option(
    "--require-signature", help="Refuse a .slim that carries no valid signature.")]
KeyEnvOpt = Annotated[str | None, typer.Option(
    "--key-env", metavar="VAR",
    help="Environment variable holding the signing key(s) a .slim must be signed with, comma-separated "
         "(default: SLIMGUARD_SIGNING_KEY). Once a key is set, unsigned files are refused.")]

_KW = inspect.Parameter.KEYWORD_ONLY
_LOAD_PARAMS = [inspect.Parameter("trust_code", _KW, default=None, annotation=TrustCodeOpt),
                inspect.Parameter("require_signature", _KW, default=False, annotation=RequireSignatureOpt),
                inspect.Parameter("key_env", _KW, default=None, annotation=KeyEnvOpt)]
_OUTPUT_PARAMS = [inspect.Parameter("json_out", _KW, default=False, annotation=JsonOpt),
                  inspect.Parameter("quiet", _KW, default=False, annotation=QuietOpt)]

# ---- arguments and options several commands take ----------------------------------------------------------
MODEL_ARG = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory, hf:DIR, minilm.")
DATA_OPT = typer.Option(None, help="Data set (default: the model's own).")


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


@dataclasses.dataclass
class Session:
    """What one command run was asked for by the shared options: the output mode and the loading policy."""

    json_out: bool = False
    quiet: bool = False
    trust_code: Path | None = None
    require_signature: bool = False
    key_env: str | None = None

    @property
    def show(self) -> bool:
        """Progress bars and tables wanted (neither ``--json`` nor ``--quiet``)."""
        return not (self.json_out or self.quiet)

    @functools.cached_property
    def policy(self) -> LoadPolicy:
        """The :class:`~slimguard.artifact.LoadPolicy` of ``--trust-code/--require-signature/--key-env``
        (checked when first used, so each command checks it where it starts loading)."""
        return load_policy(self.trust_code, self.require_signature, self.key_env)

    def load(self, source: str, *, seed: int = 0) -> nn.Module:
        """Load a model source (``zoo:``, ``python:``, ``hf:``, ``minilm`` or a ``.slim`` under the policy)."""
        return load_source(source, self.policy, progress=self.show, seed=seed)

    def emit(self, result: Any, show: Callable[[], object] | None = None) -> None:
        """Print ``result`` as JSON with ``--json``; otherwise, unless ``--quiet``, call ``show`` (tables)."""
        if self.json_out:
            print_json(result)
        elif not self.quiet and show is not None:
            show()


class Commands:
    """The commands of one ``cli/*_commands.py`` module.

    ``@commands.add()`` collects a command ``fn(session, **own_options)`` defined at module level;
    ``commands.register(app)``, the module's ``register``, adds them all to the app with :func:`command`::

        commands = Commands()
        register = commands.register

        @commands.add()
        def evaluate(s: Session, model: str = MODEL_ARG) -> None: ...
    """

    def __init__(self) -> None:
        self._added: list[tuple[Callable[..., Any], bool]] = []

    def add(self, *, loads_models: bool = True) -> Callable[[F], F]:
        """Collect a command; ``loads_models`` gives it the artifact policy options (see :func:`command`)."""

        def collect(fn: F) -> F:
            self._added.append((fn, loads_models))
            return fn

        return collect

    def register(self, app: typer.Typer) -> None:
        for fn, loads_models in self._added:
            command(app, loads_models=loads_models)(fn)


def command(app: typer.Typer, *, loads_models: bool = True) -> Callable[[F], F]:
    """Register ``fn(session, **own_options)`` as a command of ``app``.

    The command gets the shared options after its own (``--trust-code``, ``--require-signature`` and
    ``--key-env`` when ``loads_models``; ``--json`` and ``--quiet`` always), user errors as one line with
    exit code 2 (:func:`handle_errors`), and the output mode set before its body runs.
    """

    def register(fn: F) -> F:
        shared = [*(_LOAD_PARAMS if loads_models else []), *_OUTPUT_PARAMS]
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]  # the first is the Session

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            session = Session(**{p.name: kwargs.pop(p.name) for p in shared})
            set_output(session.json_out, session.quiet)
            return fn(session, **kwargs)

        params = [*own, *shared]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what typer reads
        run.__annotations__ = {p.name: p.annotation for p in params}
        app.command()(handle_errors(run))
        return fn

    return register


def resolve_data(model: nn.Module, data: str | None, *, text_default: str | None = None, seed: int = 0,
                 role: str = "model") -> tuple[DataBundle, str]:
    """The data set named by ``--data``, else the one ``model`` records (else ``text_default`` for an
    embedder), loaded; returns ``(bundle, name)``. DataError when there is none (pass ``--data``)."""
    from slimguard import data as sgdata
    from slimguard.models.spec import maybe_info

    mi = maybe_info(model)
    name = data or (mi.data.get("name") if mi is not None else None)
    if not name and mi is not None and mi.task == "embedding":
        name = text_default
    if not name:
        raise DataError(f"this {role} records no data set; pass --data")
    return sgdata.load(name, seed=seed), name


def check_outputs(**paths: Path | None) -> None:
    """Refuse unusable output files before any work: ``check_outputs(out=out)`` checks ``--out``."""
    from slimguard.core.outputs import check_output_file

    for option, path in paths.items():
        if path is not None:
            check_output_file(path, "--" + option.replace("_", "-"))


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
