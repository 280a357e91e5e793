"""The ``slimguard`` command line: a thin layer over the Python API.

Every command lives in its own module here and defines ``register(app)``; they are discovered at
start-up. User errors, usage errors included, print one line and exit with code 2 (:func:`main`). As an
entry point, the CLI imports the plugin index (:mod:`slimguard.plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence

import typer
import typer.main

try:  # recent typer carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

from slimguard import plugins as _plugins  # noqa: F401  (the CLI is an entry point: every plugin registers)

# click 8.2+ shows the help for `slimguard` alone by raising this usage error; older click exits instead
_NO_ARGS: type[Exception] | tuple[()] = getattr(click_errors, "NoArgsIsHelpError", ())


def _version(value: bool) -> None:
    if value:
        from slimguard._version import __version__

        typer.echo(f"slimguard {__version__}")
        raise typer.Exit()


def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Make trained PyTorch models smaller and faster, and keep them trustworthy once deployed."""


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="slimguard",
        help="Make trained PyTorch models smaller and faster, and keep them trustworthy once deployed.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain click help: flags show no <bool> placeholder, options one per line
    )
    app.callback()(_main_options)
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and exit with its status.

    Every user error ends the same way: one line ``error: ...`` on stderr and exit code 2. That holds for
    the commands' own errors (:class:`~slimguard.core.errors.UserError`, see ``cli.common``) and for usage
    errors click finds while parsing (a missing argument or option, an unknown option, a value that is not
    a number), which would otherwise print a usage box. ``--help`` and ``--version`` exit 0; no command at
    all prints the help and exits 2; Ctrl-C exits 130.
    """
    warnings.formatwarning = _one_line_warning  # a warning reaches a command-line user as one line
    command = typer.main.get_command(build_app())
    try:
        code = command.main(args=None if argv is None else list(argv), prog_name="slimguard",
                            standalone_mode=False)
    except click_errors.UsageError as exc:  # also BadParameter, NoSuchOption, MissingParameter
        if isinstance(exc, _NO_ARGS) and exc.ctx is not None:  # `slimguard` alone: the help, as click prints it
            typer.echo(exc.ctx.get_help())
        else:
            typer.echo(f"error: {_one_line(exc.format_message())}{_help_hint(exc.ctx)}", err=True)
        code = 2
    except click_errors.ClickException as exc:  # e.g. a file option that cannot be opened
        typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
        code = 2
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C, or end of input at a prompt
        typer.echo("interrupted", err=True)
        code = 130
    # without standalone mode, click returns the command's exit code (typer.Exit) or its return value (None)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {_one_line(str(message))}\n"


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _help_hint(ctx: object) -> str:
    """`` (see slimguard COMMAND --help)`` for the command whose options were wrong."""
    path = getattr(ctx, "command_path", None)
    return f" (see {path} --help)" if path else ""
