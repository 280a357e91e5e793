"""Shared CLI pieces: one declaration of the options every command shares, user-error handling, output
modes (table, ``--json``, ``--quiet``), and loading models and their data under the artifact policy.

A command is a module-level function whose first parameter is a :class:`Session`, collected by its
module's :class:`Commands`; registering it (:func:`command`) adds the shared options (``--trust-code``,
``--require-signature``, ``--key-env`` for commands that load models; ``--json`` and ``--quiet`` for all),
so a command declares only its own options. Commands registered with ``distributed=True`` (those that train,
calibrate or score in parallel) run data-parallel under ``torchrun`` (see :func:`command`)::

    commands = Commands()
    register = commands.register                      # what the CLI calls for each module


    @commands.add()
    def evaluate(s: Session, model: str = MODEL_ARG, data: str | None = DATA_OPT) -> None:
        m = s.load(model)                             # .slim files under --trust-code / --key-env / ...
        bundle, name = resolve_data(m, data)          # --data, else the data set the model records
        s.emit(run(m, bundle), lambda: ...)           # JSON with --json; tables unless --quiet
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
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

WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", metavar="FILE.safetensors", help="Weights for a python:FILE.py:factory model (safetensors).")]
InputShapeOpt = Annotated[str | None, typer.Option(
    "--input-shape", metavar="C,H,W",
    help="Shape of one example, no batch (e.g. 1,32,32), for models that record none.")]
TaskOpt = Annotated[str | None, typer.Option(
    "--task", help="hf:DIR models: sequence-classification, image-classification, causal-lm or embedding "
                   "(default: from config.json architectures).")]

_KW = inspect.Parameter.KEYWORD_ONLY
_LOAD_PARAMS = [inspect.Parameter("trust_code", _KW, default=None, annotation=TrustCodeOpt),
                inspect.Parameter("require_signature", _KW, default=False, annotation=RequireSignatureOpt),
                inspect.Parameter("key_env", _KW, default=None, annotation=KeyEnvOpt)]
_MODEL_PARAMS = [inspect.Parameter("weights", _KW, default=None, annotation=WeightsOpt),
                 inspect.Parameter("input_shape", _KW, default=None, annotation=InputShapeOpt),
                 inspect.Parameter("task", _KW, default=None, annotation=TaskOpt)]
_OUTPUT_PARAMS = [inspect.Parameter("json_out", _KW, default=False, annotation=JsonOpt),
                  inspect.Parameter("quiet", _KW, default=False, annotation=QuietOpt)]

# ---- arguments and options several commands take ----------------------------------------------------------
MODEL_ARG = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory, hf:DIR, minilm.")
DATA_OPT = typer.Option(None, help="Data set (default: the model's own).")
THREADS_OPT = typer.Option(1, min=0, help="Torch threads, pinned while timing (0: torch's default count).")


def model_options(weights: Path | None, input_shape: str | None, task: str | None) -> dict[str, Any]:
    """The keyword arguments of :func:`slimguard.models.sources.load_model` for ``--weights``,
    ``--input-shape`` and ``--task``."""
    from slimguard.models.sources import parse_shape

    return {"weights": None if weights is None else str(weights),
            "input_shape": None if input_shape is None else parse_shape(input_shape), "task": task}


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
    weights: Path | None = None
    input_shape: str | None = None
    task: str | None = None

    @property
    def show(self) -> bool:
        """Progress bars and tables wanted (neither ``--json`` nor ``--quiet``)."""
        return not (self.json_out or self.quiet)

    @property
    def main(self) -> bool:
        """This process writes outputs: always, except on ranks other than 0 of a data-parallel run."""
        from slimguard.train.distributed import is_main

        return is_main()

    @functools.cached_property
    def policy(self) -> LoadPolicy:
        """The :class:`~slimguard.artifact.LoadPolicy` of ``--trust-code/--require-signature/--key-env``
        (checked when first used, so each command checks it where it starts loading)."""
        return load_policy(self.trust_code, self.require_signature, self.key_env)

    @property
    def model_options(self) -> dict[str, Any]:
        """:func:`model_options` of ``--weights``, ``--input-shape`` and ``--task`` (what :meth:`load` and
        ``compress`` pass on to the model source)."""
        return model_options(self.weights, self.input_shape, self.task)

    def load(self, source: str, *, seed: int = 0, main_model: bool = True) -> nn.Module:
        """Load a model source (``zoo:``, ``python:``, ``hf:``, ``minilm`` or a ``.slim`` under the policy);
        the command's main model takes ``--weights``, ``--input-shape`` and ``--task`` (a reference given
        with ``--against``, ``main_model=False``, does not)."""
        options = self.model_options if main_model else {}
        return load_source(source, self.policy, progress=self.show, seed=seed, **options)

    def wrote(self, *paths: Path | str) -> None:
        """Say where the outputs went, one ``wrote PATH`` line each (not with ``--json`` or ``--quiet``, and
        only on the process that writes)."""
        if self.show and self.main:
            for path in paths:
                typer.echo(f"wrote {path}")

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
        self._added: list[tuple[Callable[..., Any], bool, bool, bool]] = []

    def add(self, *, loads_models: bool = True, user_models: bool = False,
            distributed: bool = False) -> Callable[[F], F]:
        """Collect a command; ``loads_models`` gives it the artifact policy options, ``user_models`` the options
        of a user's model source (``--weights``, ``--input-shape``, ``--task``), ``distributed`` lets it run
        data-parallel under ``torchrun`` (see :func:`command`)."""

        def collect(fn: F) -> F:
            self._added.append((fn, loads_models, user_models, distributed))
            return fn

        return collect

    def register(self, app: typer.Typer) -> None:
        for fn, loads_models, user_models, distributed in self._added:
            command(app, loads_models=loads_models, user_models=user_models, distributed=distributed)(fn)


def command(app: typer.Typer, *, loads_models: bool = True, user_models: bool = False,
            distributed: bool = False) -> Callable[[F], F]:
    """Register ``fn(session, **own_options)`` as a command of ``app``.

    The command gets the shared options after its own (``--trust-code``, ``--require-signature`` and
    ``--key-env`` when ``loads_models``; ``--weights``, ``--input-shape`` and ``--task`` when ``user_models``,
    applied by :meth:`Session.load`; ``--json`` and ``--quiet`` always), user errors as one line with
    exit code 2 (:func:`handle_errors`), and the output mode set before its body runs.

    Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` set), a ``distributed``
    command runs inside the process group (:func:`slimguard.train.distributed.process_group`: gloo on CPU,
    NCCL on CUDA), torn down when it ends; ranks other than 0 print nothing (:attr:`Session.main` says
    whether to write outputs), and a failure on any rank is reported once, by the first rank that failed,
    as one line (the launcher then stops the others). Other commands refuse to run on several ranks.
    """

    def register(fn: F) -> F:
        shared = [*(_LOAD_PARAMS if loads_models else []), *(_MODEL_PARAMS if user_models else []),
                  *_OUTPUT_PARAMS]
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]  # the first is the Session

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            session = Session(**{p.name: kwargs.pop(p.name) for p in shared})
            set_output(session.json_out, session.quiet)
            if not _launched_data_parallel():
                return fn(session, **kwargs)
            if not distributed:
                return _refuse_data_parallel(fn.__name__)
            return _run_data_parallel(fn, session, kwargs)

        params = [*own, *shared]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what typer reads
        run.__annotations__ = {p.name: p.annotation for p in params}
        app.command()(handle_errors(run))
        return fn

    return register


def _launched_data_parallel() -> bool:
    from slimguard.train.distributed import launch_env

    env = launch_env()
    return env is not None and env.world_size > 1


def _refuse_data_parallel(name: str) -> None:
    """A command that cannot run on several ranks: rank 0 says so (one line), every rank exits 2."""
    if os.environ.get("RANK") == "0":
        typer.echo(f"error: `slimguard {name.replace('_', '-')}` does not run data-parallel; run it as one "
                   "process, without torchrun", err=True)
    raise typer.Exit(code=ConfigError.exit_code)


def _run_data_parallel(fn: Callable[..., Any], session: Session, kwargs: dict[str, Any]) -> Any:
    """Run a command inside the ``torchrun`` process group (see :func:`command`)."""
    from slimguard.train import distributed

    with distributed.process_group():
        if not distributed.is_main():
            session.json_out, session.quiet = False, True
            set_output(False, True)
        try:
            return fn(session, **kwargs)
        except (typer.Exit, typer.Abort):  # the command's own exit (same on every rank)
            raise
        except BaseException as exc:
            first = distributed.claim_failure()
            if isinstance(exc, UserError):
                if first:
                    typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(code=exc.exit_code) from None
            if first:  # not a user error: the rank and the exception's first line
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                typer.echo(f"error: rank {distributed.rank()} of {distributed.world_size()} failed: "
                           f"{type(exc).__name__}" + (f": {detail}" if detail else ""), err=True)
            raise typer.Exit(code=130 if isinstance(exc, KeyboardInterrupt) else 1) from None


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


def check_out_dir(out: Path | None, *names: str) -> Path | None:
    """Refuse an unusable ``--out`` folder before any work: it must be a folder (created if missing) that
    can be written, and none of the fixed file ``names`` it will hold may be a folder. Returns ``out``.

    Example:
        >>> check_out_dir(Path("runs/train"), "model.slim")   # then save(model, out / "model.slim")
    """
    if out is None:
        return None
    from slimguard.core.outputs import check_output_dir, check_output_file

    check_output_dir(out, "--out")
    for name in names:
        check_output_file(out / name, "--out")
    return out


@contextlib.contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """Write a command's files into a hidden temporary folder inside ``out``; they take their names in ``out``
    (``os.replace``, so each appears whole) only when the block ends without error. On an error nothing is
    left behind: the temporary folder is removed, and so is ``out`` when this created it (and it is empty).

    For writers that are not atomic themselves or whose result is checked after writing (an ONNX export
    verified on ONNX Runtime)::

        with staged_outputs(out) as stage:
            path = export_onnx(model, x, stage / "model.onnx")
            check(path)                                   # raises: out is left as it was
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".slimguard-stage-", dir=out))
    ok = False
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, out / item.name)
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok and created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty


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


def load_source(source: str, policy: LoadPolicy, *, progress: bool, seed: int = 0, **options: Any) -> nn.Module:
    """Load a model source (``zoo:``, ``python:``, ``hf:``, ``minilm`` or a ``.slim`` under ``policy``)."""
    from slimguard.models.sources import load_model

    return load_model(source, seed=seed, progress=progress, policy=policy, **options)


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
