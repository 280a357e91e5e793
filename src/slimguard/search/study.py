"""Running the search: the Optuna study, its storage, the trials, local workers and live progress.

The study lives in Optuna storage, so it outlives the process that made it:

- by default a SQLite file, ``DIR/study.db``; ``--storage`` takes any RDB URL (``postgresql://...``, for
  workers on many machines, see ``docs/OPTIMIZE.md``) or ``journal:FILE`` (Optuna's journal file);
- a study that already exists under ``--study-name`` is resumed: ``--trials N`` is the number of finished
  trials the study should hold, so a rerun after Ctrl-C (or on another machine) runs only what is left,
  and several processes on one storage share the work;
- the study records what it searches (model, data, budget, objectives, seed, space); resuming it with other
  settings is refused, so one study never mixes two searches.

Each trial draws a pipeline from the space (:mod:`slimguard.search.space`), measures it on validation data
(:mod:`slimguard.search.objectives`) and returns the objectives, all minimized. The budget is a constraint
(``val_accuracy_drop_points - budget <= 0``) that the sampler (multi-objective TPE or NSGA-II) respects.
Optuna's own pruners do not work with several objectives, so hopeless trials are pruned here with the
intermediate validation scores, at two points: during the last step that can recover accuracy, after each
epoch of its training, a trial that cannot reach the budget in its remaining epochs stops
(:func:`slimguard.search.objectives.hopeless_curve`; this is what makes long fine-tuning affordable in the
space); once that step has run, a trial whose validation drop exceeds the budget stops before the artifact
and speed measurements.

A sampler may draw a pipeline the study has already measured (the space is discrete in its steps and their
choices, and with few trials TPE returns to what paid). Such a *repeat* is not measured again: the earlier
trial's results are replayed into it (so the sampler still learns from them), it carries ``repeat_of``, it is
left out of the front, and it does not count against ``--trials``, which counts distinct pipelines measured.
When :data:`REPEAT_LIMIT` draws in a row are repeats, the space is taken as exhausted: the search stops early
and says so.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimguard.core.errors import ConfigError, UserError
from slimguard.search.localmoves import REPEAT, LocalMoves, record
from slimguard.search.objectives import (
    OBJECTIVES,
    TARGETS,
    Evaluator,
    Hopeless,
    NotDeployable,
    Robustness,
    cosine_budget_points,
)
from slimguard.search.space import (
    DEFAULT_SEARCH,
    NONE,
    RECOVERING_STAGES,
    STAGES,
    Proxies,
    SearchSpace,
    build_space,
)
from slimguard.search.warmstart import TRIAL_OPTIONS, warm_start

SAMPLERS = ("tpe", "nsga2")
STORAGE_ATTEMPTS = 5
"""Tries at opening an RDB storage (processes that start together race to create its tables)."""
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
REPEAT_LIMIT = 12
"""Repeats in a row (in one process) after which the space counts as exhausted and the search stops."""
REPLAYED = ("val_accuracy", "val_accuracy_drop_points", "bytes", "size_ratio", "speed_ratio", "speed_ci95",
            "time_ratio", "intermediate", "train_curve", "speed_verdict", "target", "val_robust_accuracy",
            "val_robust_error", "val_cosine_mean", "val_cosine_min", "pruned_at_step", "pruned_at_epoch",
            "not_deployable", "error")
"""The measurements a repeat copies from the trial it repeats."""
ORT_UNSUPPORTED_DEFAULTS = ("weight-only",)
"""Default quantization steps left out of the space with ``--target ort``: their low-bit layers have no ONNX
Runtime kernel (:data:`slimguard.runtime.onnx.UNEXPORTABLE`). A ``search:`` block naming one keeps it; such
trials are then stopped as not deployable."""
EMBEDDING_SEARCH: dict[str, Any] = {
    "structured": [NONE],
    "train": [NONE],
    "quantize": [NONE, "int8-dynamic", "ort-int8", "half", "weight-sharing"],
}
"""The default stages of an embedder search (a user's ``search:`` block overrides them stage by stage): the
steps that need labels (``finetune``, ``distill``), calibration tensors (``int8-static``) or accuracy
sensitivity (channel pruning by group) are left out; ``ort-int8`` (the shipped ``minilm-fast`` recipe's step)
is added."""


class StudyMismatch(ConfigError):
    """The study under that name searches something else."""


@dataclasses.dataclass
class Settings:
    """One search, as the CLI or a caller asks for it.

    Args:
        model: the model source (``zoo:digits32-resnet``, a ``.slim``, ...).
        data: the data set (trials score its ``val`` split; the ``test`` split is scored once at the end).
        out: the output folder (``pareto.json``, ``best.yaml``, ``model.slim``, ``report.html``, ``trials/``,
            and by default the study's SQLite file).
        budget: the allowed validation accuracy drop, in points (a constraint of every trial). For embedding
            data it is set from ``min_cosine`` when the data is loaded (:meth:`for_task`).
        min_cosine: embedding data only: the least mean cosine to the original's embeddings on the validation
            texts (the constraint; ``budget`` becomes ``(1 - min_cosine) x 100`` cosine points).
        given: the names of the options above the caller set on purpose (``budget``, ``min_cosine``), so that
            one that does not apply to the data's task is refused rather than ignored.
        objectives: what to minimize, most important first: ``size`` (file bytes), ``latency`` (paired time
            ratio on ``target``), ``accuracy`` (accuracy drop), ``robustness`` (error under PGD on
            ``max_examples`` validation examples).
        trials: finished trials the study should hold.
        seed: seeds the data split, the model, every pipeline and the sampler.
        storage: Optuna storage URL, or ``journal:FILE`` (default: ``sqlite:///OUT/study.db``).
        study_name: the study's name in the storage.
        search: a ``search:`` block restricting the space (see :mod:`slimguard.search.space`).
        sampler: ``tpe`` (multi-objective TPE with constraints) or ``nsga2`` (NSGA-II with constraints).
        workers: local worker processes (1: run in this process).
        prune: stop hopeless trials early (see the module docstring).
        speed_budget_s: about how long each trial's paired speed comparison may take.
        threads: torch threads pinned while timing.
        track: log every trial to TensorBoard (when installed) and MLflow (when installed and
            ``MLFLOW_TRACKING_URI`` is set).
        target: ``torch`` or ``ort``: the runtime candidates are scored and timed on (see
            :class:`slimguard.search.objectives.Evaluator`).
        warm_start: when the study is created, queue the shipped recipes of the data's task that the space can
            express as its first trials (see :mod:`slimguard.search.warmstart`); they count against ``trials``.
        local_moves: after the warm-start trials, and then every few finished trials, queue extensions of the
            feasible Pareto points by one more stage (see :mod:`slimguard.search.localmoves`); they count
            against ``trials`` (at most half of them).
        robust_eps, robust_steps, max_examples: the PGD attack of the ``robustness`` objective (L-inf radius in
            raw input units, steps, validation examples attacked).
    """

    model: str
    data: str
    out: Path
    budget: float = 1.0
    objectives: tuple[str, ...] = ("size", "latency")
    trials: int = 20
    seed: int = 0
    storage: str | None = None
    study_name: str = "slimguard"
    search: dict[str, Any] = dataclasses.field(default_factory=dict)
    sampler: str = "tpe"
    workers: int = 1
    prune: bool = True
    speed_budget_s: float = 1.0
    threads: int | None = 1
    track: bool = True
    target: str = "torch"
    warm_start: bool = True
    local_moves: bool = True
    robust_eps: float = 0.1
    robust_steps: int = 10
    max_examples: int = 128
    min_cosine: float = 0.99
    given: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.objectives = tuple(self.objectives)
        if not self.objectives:
            raise ConfigError("--objectives: give at least one of " + ", ".join(OBJECTIVES))
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ConfigError(f"--objectives: {name!r} is not allowed; allowed: {', '.join(OBJECTIVES)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"--objectives: {','.join(self.objectives)} names one twice; name each once")
        if not 0 <= self.budget <= 100:
            raise ConfigError(f"--budget: {self.budget!r} is out of range; allowed: [0, 100] accuracy points")
        for key, value in (("trials", self.trials), ("workers", self.workers)):
            if value < 1:
                raise ConfigError(f"--{key}: {value!r}; use 1 or more")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: {self.sampler!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
        if not self.study_name:
            raise ConfigError("--study-name: give a non-empty name")
        if not self.speed_budget_s > 0:
            raise ConfigError(f"--speed-budget: {self.speed_budget_s!r}; use a positive number of seconds")
        if self.target not in TARGETS:
            raise ConfigError(f"--target: {self.target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        self.robustness_spec().validate()
        if not 0 < self.min_cosine <= 1:
            raise ConfigError(f"--min-cosine: {self.min_cosine!r} is out of range; allowed: (0, 1], e.g. 0.99")

    def for_task(self, task: str) -> None:
        """Set the budget from ``min_cosine`` for embedding data (classification keeps ``budget``)."""
        if task == "embedding":
            if "budget" in self.given:
                raise ConfigError("--budget: an accuracy drop applies to classification data, and this data set "
                                  "is embedding data; give --min-cosine (default 0.99) instead")
            self.budget = cosine_budget_points(self.min_cosine)
        elif "min_cosine" in self.given:
            raise ConfigError(f"--min-cosine: applies to embedding data, and this data set is {task} data; "
                              "give --budget (accuracy points) instead")

    def robustness_spec(self) -> Robustness:
        """How the robustness objective is measured (whether or not it is one of the objectives)."""
        return Robustness(eps=self.robust_eps, steps=self.robust_steps, max_examples=self.max_examples)

    def search_block(self, task: str = "classification") -> dict[str, Any]:
        """The ``search:`` block the space is built from: the user's, over :data:`EMBEDDING_SEARCH` for
        embedding data, and with ``--target ort`` a default quantize stage without the steps ONNX Runtime
        cannot run (:data:`ORT_UNSUPPORTED_DEFAULTS`)."""
        block = {**(EMBEDDING_SEARCH if task == "embedding" else {}), **self.search}
        if self.target == "ort" and "quantize" not in block:
            block["quantize"] = [s for s in DEFAULT_SEARCH["quantize"] if s not in ORT_UNSUPPORTED_DEFAULTS]
        return block

    @property
    def storage_url(self) -> str:
        """The storage as given, or the default SQLite file in the output folder."""
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def identity(self, space: SearchSpace) -> dict[str, Any]:
        """What a study searches; a resumed study must match it."""
        out = {"model": self.model, "data": self.data, "budget": self.budget, "objectives": list(self.objectives),
               "seed": self.seed, "space": space.to_dict()}
        if self.target != "torch":  # absent for torch, so studies made before targets existed still resume
            out["target"] = self.target
        if "robustness" in self.objectives:
            out["robustness"] = dataclasses.asdict(self.robustness_spec())
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["objectives"] = list(self.objectives)
        return d


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: ``journal:FILE`` (a journal file, safe for several local processes) or
    an RDB URL (``sqlite:///FILE``, ``postgresql://...``; SQLite waits up to 60 s for a lock)."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url.removeprefix("journal:")
        if not path:
            raise ConfigError("--storage: journal: needs a file, e.g. journal:out/study.log")
        return JournalStorage(JournalFileBackend(path))
    scheme = url.partition("://")[0]
    if not scheme or "://" not in url:
        raise ConfigError(f"--storage: {url!r} is not a database URL; use sqlite:///FILE, "
                          "postgresql://USER@HOST/DB or journal:FILE")
    kwargs: dict[str, Any] = {}
    if scheme.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    try:
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60,
                                                      grace_period=180)
            except Exception as exc:  # two processes creating the tables of a new database at once: one loses
                if attempt + 1 == STORAGE_ATTEMPTS or type(exc).__name__ not in ("IntegrityError",
                                                                                 "OperationalError"):
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(f"--storage: the driver for {scheme} is not installed ({exc.name}); "
                          f"pip install it (for PostgreSQL: psycopg2-binary)") from None
    except Exception as exc:  # sqlalchemy errors: a bad URL, a database that cannot be reached
        raise ConfigError(f"--storage: cannot open {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                          ) from None


CONSTRAINT = "val_accuracy_drop_over_budget"
"""The trial's constraint: validation accuracy drop minus the budget, in points (feasible when <= 0)."""
NOT_DEPLOYABLE_CONSTRAINT = 100.0
"""The constraint recorded for a pipeline the target runtime cannot run (as if it lost every point)."""


def _has_trial_constraints() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")  # Optuna 5; older releases take constraints_func


def _constraints(trial: Any) -> list[float]:
    return [float(trial.user_attrs.get(CONSTRAINT, 0.0))]


def set_constraint(trial: Any, value: float) -> None:
    """Record the budget constraint where the sampler reads it (the trial's constraints, or a user attribute
    that :func:`_constraints` hands to older samplers)."""
    trial.set_user_attr(CONSTRAINT, value)
    if _has_trial_constraints():
        trial.set_constraint(CONSTRAINT, value)


def make_sampler(settings: Settings, worker: int = 0) -> Any:
    """The sampler: multi-objective TPE or NSGA-II, both with the budget as a constraint, seeded per worker
    (so two workers do not propose the same pipelines)."""
    import optuna

    seed = settings.seed + 1000 * worker
    constraints: dict[str, Any] = {} if _has_trial_constraints() else {"constraints_func": _constraints}
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, settings.trials // 3)),
                                             **constraints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, settings.trials // 3)),
                                          multivariate=True, **constraints)


def open_study(settings: Settings, space: SearchSpace, worker: int = 0) -> Any:
    """Create the study, or load it when it exists (checking that it searches the same thing)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(settings.storage_url)
    study = optuna.create_study(storage=storage, study_name=settings.study_name, load_if_exists=True,
                                directions=["minimize"] * len(settings.objectives),
                                sampler=make_sampler(settings, worker))
    want = settings.identity(space)
    have = study.user_attrs.get("slimguard")
    if have is None:
        study.set_user_attr("slimguard", want)
    elif have != want:
        diff = next(k for k in want if have.get(k) != want[k])
        raise StudyMismatch(f"study {settings.study_name!r} in {settings.storage_url} was made with another {diff} "
                            f"({have.get(diff)!r}); rerun with those settings to resume it, or pass a new "
                            "--study-name")
    return study


def proxies_for(study: Any, evaluator: Evaluator, space: SearchSpace, *, progress: bool = True) -> Proxies:
    """The cheap proxies, computed once per study and stored in it (workers and reruns reuse them): which
    channel ratio each layer group tolerates alone within the budget (sensitivity on validation data), and
    the first and last weight layers."""
    stored = study.user_attrs.get("proxies")
    if stored is not None:
        return Proxies.from_dict(stored)
    import torch.nn as nn

    from slimguard.prune.sensitivity import ratios_from_sensitivity, sensitivity

    tolerated: dict[str, float] = {}
    if space.groups and "channel" in space.stages.get("structured", ()) and not evaluator.embedding:
        result = sensitivity(evaluator.model, evaluator.data, method="channel", sparsities=(0.25, 0.5, 0.75),
                             max_examples=256, progress=progress)
        tolerated = ratios_from_sensitivity(result, max_drop=evaluator.budget / 100)
    layers = [n for n, m in evaluator.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    ends = tuple(dict.fromkeys([layers[0], layers[-1]])) if layers else ()
    proxies = Proxies(tolerated, ends)
    study.set_user_attr("proxies", proxies.to_dict())
    return proxies


def trial_artifact(out: Path, number: int) -> Path:
    """Where trial ``number`` keeps its artifact."""
    return out / "trials" / f"trial-{number:04d}.slim"


def make_objective(settings: Settings, space: SearchSpace, evaluator: Evaluator, proxies: Proxies
                   ) -> Callable[[Any], list[float]]:
    """The function Optuna calls per trial: draw a pipeline, measure it, record everything in the trial."""
    import optuna

    recovering = {s.name for s in STAGES if s.name in RECOVERING_STAGES}
    worker = f"{socket.gethostname()}:{os.getpid()}"
    single = len(settings.objectives) == 1

    def objective(trial: Any) -> list[float]:
        steps = space.suggest(trial, proxies, trial.user_attrs.get(TRIAL_OPTIONS))
        recorded = [{s.config_name: s.to_dict()["_data"]} for s in steps]
        trial.set_user_attr("steps", recorded)
        trial.set_user_attr("worker", worker)
        twin = measured_twin(trial.study, recorded, trial.number)
        if twin is not None:
            return replay(trial, twin)
        stage_of = _stage_names(trial.params, space)
        judge_after = -1  # judge from the last step that can recover accuracy (without one: the last step)
        if settings.prune and stage_of:
            judge_after = max((i for i, name in enumerate(stage_of) if name in recovering), default=len(stage_of) - 1)
        def report(step: int, drop: float) -> None:
            if single:  # Optuna keeps intermediate values of single-objective studies only (dashboard curves)
                trial.report(drop, step)

        try:
            result = evaluator.run(steps, trial_artifact(settings.out, trial.number), judge_after=judge_after,
                                   report=report)
        except Hopeless as exc:
            trial.set_user_attr("pruned_at_step", exc.step)
            if exc.epoch is not None:
                trial.set_user_attr("pruned_at_epoch", exc.epoch)
            trial.set_user_attr("train_curve", exc.curve)
            trial.set_user_attr("val_accuracy_drop_points", exc.drop)
            set_constraint(trial, exc.drop - settings.budget)
            raise optuna.TrialPruned(str(exc)) from None
        except NotDeployable as exc:  # infeasible on the target: the sampler learns to avoid such pipelines
            trial.set_user_attr("not_deployable", str(exc)[:300])
            set_constraint(trial, NOT_DEPLOYABLE_CONSTRAINT)
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:  # the trial fails (Optuna records it); say why in the trial
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        for key in ("val_accuracy", "val_accuracy_drop_points", "bytes", "size_ratio", "speed_ratio", "speed_ci95",
                    "time_ratio", "intermediate", "train_curve"):
            trial.set_user_attr(key, result[key])
        trial.set_user_attr("speed_verdict", result["speed"]["verdict"])
        trial.set_user_attr("target", result["target"])
        if "val_robust_accuracy" in result:
            trial.set_user_attr("val_robust_accuracy", result["val_robust_accuracy"])
            trial.set_user_attr("val_robust_error", result["val_robust_error"])
        for key in ("val_cosine_mean", "val_cosine_min"):
            if key in result:
                trial.set_user_attr(key, result[key])
        set_constraint(trial, result["val_accuracy_drop_points"] - settings.budget)
        return [float(result[OBJECTIVES[name][0]]) for name in settings.objectives]

    return objective


def _canonical(steps: Any) -> str:
    return json.dumps(steps, sort_keys=True, default=str)


def measured_twin(study: Any, steps: list[dict[str, Any]], number: int) -> Any | None:
    """The earliest finished trial of ``study`` (not itself a repeat) whose pipeline is ``steps``, or None."""
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    want = _canonical(steps)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.number != number and REPEAT not in t.user_attrs and "steps" in t.user_attrs \
                and _canonical(t.user_attrs["steps"]) == want:
            return t
    return None


def replay(trial: Any, twin: Any) -> list[float]:
    """Finish ``trial`` as the repeat of ``twin``: copy its measurements and constraint, and end the same way
    (its objective values, or pruned when it was pruned or failed)."""
    import optuna

    trial.set_user_attr(REPEAT, twin.number)
    for key in REPLAYED:
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    set_constraint(trial, float(twin.user_attrs.get(CONSTRAINT, NOT_DEPLOYABLE_CONSTRAINT)))
    if twin.state == optuna.trial.TrialState.COMPLETE and twin.values is not None:
        return list(twin.values)
    raise optuna.TrialPruned(f"the same pipeline as trial {twin.number}, which was {twin.state.name.lower()}")


def is_repeat(trial: Any) -> bool:
    """Whether a trial replayed an earlier one (see the module docstring)."""
    return REPEAT in trial.user_attrs


def _stage_names(params: dict[str, Any], space: SearchSpace) -> list[str]:
    """The stage of each step of a trial's pipeline, in order."""
    return [s.name for s in STAGES if params.get(s.name, space.stages.get(s.name, ("none",))[0]) != "none"]


def finished(study: Any) -> int:
    """Trials that completed, were pruned, or failed, repeats left out (each a distinct pipeline measured)."""
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    return sum(not is_repeat(t) for t in study.get_trials(deepcopy=False, states=states))


class Enough:
    """An Optuna callback that stops this process's trials once the study holds ``trials`` measured pipelines,
    or after :data:`REPEAT_LIMIT` repeats in a row (then ``exhausted`` is set and the study records it)."""

    def __init__(self, trials: int) -> None:
        self.trials, self.in_a_row, self.exhausted = trials, 0, False

    def __call__(self, study: Any, trial: Any) -> None:
        self.in_a_row = self.in_a_row + 1 if is_repeat(trial) else 0
        if self.in_a_row >= REPEAT_LIMIT:
            self.exhausted = True
            study.set_user_attr("exhausted", {"after_trial": trial.number, "repeats_in_a_row": self.in_a_row})
            study.stop()
        elif finished(study) >= self.trials:
            study.stop()


def run_trials(settings: Settings, study: Any, objective: Callable[[Any], list[float]],
               callbacks: Sequence[Callable[[Any, Any], None]] = ()) -> None:
    """Run trials in this process until the study holds ``settings.trials`` measured pipelines (shared with
    every other process on the same study), or the sampler only repeats measured ones."""
    left = settings.trials - finished(study)
    if left <= 0:
        return
    enough = Enough(settings.trials)
    # each measured pipeline may be preceded by a run of repeats shorter than the limit
    study.optimize(objective, n_trials=left * REPEAT_LIMIT, catch=(Exception,), callbacks=[enough, *callbacks])
    if enough.exhausted and finished(study) < settings.trials:
        warnings.warn(f"the sampler drew {REPEAT_LIMIT} measured pipelines in a row: the space looks exhausted "
                      f"after {finished(study)} distinct pipelines; widen it (a search: block, --space FILE) for more",
                      stacklevel=2)


def worker_main(settings_dict: dict[str, Any], worker: int) -> None:
    """Entry point of one local worker process (``--workers K``): open the study and run trials."""
    import torch

    from slimguard.ui import set_quiet

    set_quiet(True)
    torch.set_num_threads(1)
    settings = Settings(**{**settings_dict, "out": Path(settings_dict["out"]), "workers": 1})
    try:
        session = Session.start(settings, worker=worker, progress=False)
        run_trials(settings, session.study, session.objective, session.callbacks())
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent says how to resume
        return


@dataclasses.dataclass
class Session:
    """Everything one process needs to run trials of a study."""

    settings: Settings
    space: SearchSpace
    evaluator: Evaluator
    study: Any
    proxies: Proxies
    objective: Callable[[Any], list[float]]
    warm_plan: dict[str, Any] | None = None
    """The warm-start plan this process made (``None`` when the study already existed)."""

    @classmethod
    def start(cls, settings: Settings, *, worker: int = 0, progress: bool = True) -> Session:
        """Load the data and the model, build the space, open (or resume) the study, compute or reuse the
        proxies."""
        import torch

        from slimguard import data as sgdata
        from slimguard.models import sources

        torch.manual_seed(settings.seed)
        data = sgdata.load(settings.data, seed=settings.seed)
        settings.for_task(data.task)
        space = build_space(settings.search_block(data.task))
        model = sources.load_model(settings.model, seed=settings.seed, progress=progress)
        robustness = settings.robustness_spec() if "robustness" in settings.objectives else None
        evaluator = Evaluator(model, data, settings.budget, seed=settings.seed,
                              speed_budget_s=settings.speed_budget_s, threads=settings.threads,
                              target=settings.target, robustness=robustness)
        study = open_study(settings, space, worker)
        proxies = proxies_for(study, evaluator, space, progress=progress)
        made = warm_start(study, space, proxies, task=data.task, trials=settings.trials, enabled=settings.warm_start)
        record(study, enabled=settings.local_moves, trials=settings.trials)
        objective = make_objective(settings, space, evaluator, proxies)
        return cls(settings, space, evaluator, study, proxies, objective, made)

    def callbacks(self) -> list[Callable[[Any, Any], None]]:
        """What runs after each finished trial: the local moves (:mod:`slimguard.search.localmoves`), then
        the trackers."""
        moves = LocalMoves(self.space, self.proxies, budget=self.settings.budget, trials=self.settings.trials,
                           enabled=self.settings.local_moves)
        return [moves, *self.tracker_callbacks()]

    def tracker_callbacks(self) -> list[Callable[[Any, Any], None]]:
        from slimguard.search.tracking import trackers

        return trackers(self.settings.out, self.settings.study_name) if self.settings.track else []


def run_workers(settings: Settings, session: Session, on_poll: Callable[[], None], poll_s: float = 1.0) -> None:
    """Start ``settings.workers`` local processes on the study and wait for them, calling ``on_poll``
    between checks; Ctrl-C stops them (their running trials are marked failed, the study stays resumable)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(settings.to_dict(), i + 1), daemon=False)
             for i in range(settings.workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            on_poll()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    on_poll()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise WorkerFailed(f"{len(bad)} of {len(procs)} workers exited with errors (codes {bad}); the study keeps "
                           f"what they finished; rerun the same command to resume")


class WorkerFailed(UserError):
    """A local worker process failed."""
