"""Logging every finished trial to TensorBoard and, when it is set up, to MLflow.

- TensorBoard (when the ``tensorboard`` package is installed: ``pip install slimguard[tune]``): the
  scalars ``val/accuracy_drop_points``, ``size/ratio``, ``speed/ratio`` and ``size/bytes`` per trial
  number, and one hparams record per completed trial (its parameters and those metrics), under
  ``OUT/tensorboard``. Open with ``tensorboard --logdir OUT/tensorboard``.
- MLflow (when ``mlflow`` is installed and ``MLFLOW_TRACKING_URI`` is set): one run per trial in the
  experiment named after the study, with the same parameters and metrics.

Neither needs the network to log; both are skipped quietly only when not installed or not configured,
and :func:`tracking_status` says which ones are on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS = {"val/accuracy_drop_points": "val_accuracy_drop_points", "size/ratio": "size_ratio",
           "speed/ratio": "speed_ratio", "size/bytes": "bytes", "val/robust_accuracy": "val_robust_accuracy"}
"""Logged metric name -> the trial's user attribute."""


def tracking_status() -> dict[str, bool]:
    """Which trackers would log: ``tensorboard`` (installed) and ``mlflow`` (installed, URI set)."""
    return {"tensorboard": importlib.util.find_spec("tensorboard") is not None,
            "mlflow": importlib.util.find_spec("mlflow") is not None and bool(os.environ.get("MLFLOW_TRACKING_URI"))}


def _metrics(trial: Any) -> dict[str, float]:
    out = {}
    for name, key in METRICS.items():
        value = trial.user_attrs.get(key)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _hparams(trial: Any) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in trial.params.items()}


def tensorboard_callback(logdir: str) -> Callable[[Any, Any], None]:
    """An Optuna callback writing each finished trial's scalars (and, when it completed, its hparams)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=logdir)

    def log(study: Any, trial: Any) -> None:
        metrics = _metrics(trial)
        for name, value in metrics.items():
            writer.add_scalar(name, value, trial.number)
        writer.add_scalar("trial/state", float(trial.state.value), trial.number)
        if trial.values is not None and metrics:
            writer.add_hparams(_hparams(trial), {f"hparam/{k}": v for k, v in metrics.items()},
                               run_name=f"trial-{trial.number:04d}")
        writer.flush()

    return log


def mlflow_callback(experiment: str) -> Callable[[Any, Any], None]:
    """An Optuna callback logging each finished trial as an MLflow run (tracking URI from the environment)."""
    import mlflow

    mlflow.set_experiment(experiment)

    def log(study: Any, trial: Any) -> None:
        with mlflow.start_run(run_name=f"trial-{trial.number:04d}"):
            mlflow.log_params(_hparams(trial))
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in _metrics(trial).items()})
            mlflow.set_tag("state", trial.state.name)

    return log


def trackers(out_dir: Path, study_name: str) -> list[Callable[[Any, Any], None]]:
    """The callbacks of the trackers that are on (see :func:`tracking_status`): TensorBoard under
    ``out_dir/tensorboard``, MLflow in the experiment ``study_name``."""
    status = tracking_status()
    out = []
    if status["tensorboard"]:
        out.append(tensorboard_callback(str(out_dir / "tensorboard")))
    if status["mlflow"]:
        out.append(mlflow_callback(study_name))
    return out
