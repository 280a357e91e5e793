"""The ``slimguard`` command line: a thin layer over the Python API.

Every command lives in its own module here and defines ``register(app)``; they are discovered at
start-up. User errors print one line and exit with code 2. As an entry point, the CLI imports the plugin
index (:mod:`slimguard.plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from slimguard import plugins as _plugins  # noqa: F401  (the CLI is an entry point: every plugin registers)


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


def main() -> None:
    build_app()()
