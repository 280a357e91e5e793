"""Measuring a candidate pipeline: validation accuracy, file bytes and paired speed, never estimates.

:class:`Evaluator` holds what every trial shares (the data, the model as loaded, its validation accuracy
and file size). :meth:`Evaluator.run` applies a pipeline to a copy of the model with the one step runner
(:func:`slimguard.transforms.run_step`), saves the artifact, reloads it and measures the reloaded model:

- ``val_accuracy_drop_points``: (baseline - candidate) validation accuracy x 100;
- ``size_ratio``: the candidate's ``.slim`` bytes / the original's (below 1: smaller);
- ``speed_ratio``: the original's time / the candidate's (above 1: faster), from paired, interleaved rounds
  (:func:`slimguard.runtime.measure.compare_speed`) with its 95% interval.

The test split is never touched here; :func:`test_scores` scores a finished point on it, once, at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.artifact import slim as artifact
from slimguard.core.config import Config
from slimguard.core.errors import DataError
from slimguard.core.torch_utils import accuracy
from slimguard.data.core import DataBundle, Split
from slimguard.evaluate import timing_inputs
from slimguard.runtime.measure import MEASURE_THREADS, compare_speed
from slimguard.transforms import run_step

OBJECTIVES = {
    "size": ("size_ratio", "minimize"),
    "latency": ("time_ratio", "minimize"),
    "accuracy": ("val_accuracy_drop_points", "minimize"),
}
"""Objective name -> (the measured key it minimizes, direction). ``time_ratio`` is 1 / ``speed_ratio``."""

SPEED_ROUNDS = 7
SPEED_CALLS = 10
SPEED_BATCH = 64


class Hopeless(Exception):
    """A trial's validation accuracy after its last recovering step misses the budget: stop it early."""

    def __init__(self, step: int, drop: float) -> None:
        super().__init__(f"accuracy drop {drop:.2f} points after step {step}")
        self.step = step
        self.drop = drop


@dataclasses.dataclass
class Evaluator:
    """What every trial of one search shares, and how a trial is measured.

    Args:
        model: the model as loaded (never changed; each trial works on a deep copy).
        data: the data bundle; trials score ``data.val`` only.
        budget: the allowed validation accuracy drop, in points.
        seed: torch's seed before each pipeline (the same pipeline gives the same model).
        speed_budget_s: about how long each paired speed comparison may take, in seconds.
        threads: torch threads pinned while timing (default 1).
    """

    model: nn.Module
    data: DataBundle
    budget: float
    seed: int = 0
    speed_budget_s: float = 1.0
    threads: int | None = MEASURE_THREADS
    base_test_accuracy: float | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.data.task != "classification":
            raise DataError(f"optimize scores classification data by accuracy; {self.data.name!r} is "
                            f"{self.data.task} data; search embedding models with a recipe and `compress` instead")
        if len(self.data.val) == 0:
            raise DataError(f"data {self.data.name!r} has an empty validation split; optimize selects on it")
        self.base_val_accuracy = score(self.model, self.data.val)
        self.base_bytes = artifact.file_size(self.model)
        self.inputs = timing_inputs(self.data.val, min(SPEED_BATCH, len(self.data.val)))

    def build(self, steps: list[Config], *, after_step: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
        """A copy of the model with ``steps`` applied in order (seeded; the original is the teacher and
        reference of steps that need one). ``after_step(i, model)`` runs after each step."""
        torch.manual_seed(self.seed)
        model = copy.deepcopy(self.model)
        for i, step in enumerate(steps):
            run_step(model, step, self.data, progress=False, original=self.model)
            if after_step is not None:
                after_step(i, model)
        return model

    def run(self, steps: list[Config], artifact_path: Path, *, judge_after: int = -1,
            report: Callable[[int, float], None] | None = None) -> dict[str, Any]:
        """Apply ``steps``, save the artifact to ``artifact_path``, reload it and measure it on validation.

        Args:
            judge_after: index of the last step that can recover accuracy (-1: none); from that step on, a
                validation drop above the budget raises :class:`Hopeless` before the costly measurements.
            report: called with ``(step index, validation drop in points)`` after each step.

        Returns:
            ``val_accuracy``, ``val_accuracy_drop_points``, ``bytes``, ``size_ratio``, ``speed_ratio``,
            ``speed_ci95``, ``speed`` (the comparison's full record), ``time_ratio`` and ``intermediate``
            (the drop after each step).
        """
        intermediate: list[float] = []

        def after_step(i: int, model: nn.Module) -> None:
            drop = (self.base_val_accuracy - score(model, self.data.val)) * 100
            intermediate.append(drop)
            if report is not None:
                report(i, drop)
            if i >= judge_after >= 0 and drop > self.budget + 1e-9:
                raise Hopeless(i, drop)

        model = self.build(steps, after_step=after_step)
        artifact_path.parent.mkdir(parents=True, exist_ok=True)
        pending = artifact_path.with_name(f".{artifact_path.name}.{os.getpid()}.pending")
        artifact.save(model, pending)
        try:
            reloaded = artifact.load(pending, trust_code=artifact.code_file(model))
            nbytes = pending.stat().st_size
            os.replace(pending, artifact_path)
        finally:
            pending.unlink(missing_ok=True)
        val = score(reloaded, self.data.val)
        comparison = compare_speed({"baseline": self.model, "candidate": reloaded}, self.inputs, baseline="baseline",
                                   rounds=SPEED_ROUNDS, calls_per_round=SPEED_CALLS, budget_s=self.speed_budget_s,
                                   threads=self.threads, seed=self.seed)
        speed = comparison.to_dict("candidate")
        speed.pop("per_round", None)
        return {"val_accuracy": val, "val_accuracy_drop_points": (self.base_val_accuracy - val) * 100,
                "bytes": nbytes, "size_ratio": nbytes / self.base_bytes, "speed_ratio": speed["ratio"],
                "speed_ci95": list(speed["ci95"]), "time_ratio": 1.0 / speed["ratio"], "speed": speed,
                "intermediate": intermediate}


def score(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (nothing else is measured)."""
    x, y = split.tensors
    return accuracy(model, x, y)


def test_scores(evaluator: Evaluator, model: nn.Module) -> dict[str, float]:
    """The test accuracy of a finished point and its drop in points against the original's test accuracy
    (the test split's only use: once per Pareto point, after the search)."""
    if evaluator.base_test_accuracy is None:
        evaluator.base_test_accuracy = score(evaluator.model, evaluator.data.test)
    acc = score(model, evaluator.data.test)
    return {"test_accuracy": acc, "test_accuracy_drop_points": (evaluator.base_test_accuracy - acc) * 100,
            "test_n": len(evaluator.data.test)}
