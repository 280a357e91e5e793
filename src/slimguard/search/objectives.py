"""Measuring a candidate pipeline: validation accuracy, file bytes and paired speed, never estimates.

:class:`Evaluator` holds what every trial shares (the data, the model as loaded, its validation accuracy
and file size). :meth:`Evaluator.run` applies a pipeline to a copy of the model with the one step runner
(:func:`slimguard.transforms.run_step`), saves the artifact, reloads it and measures the reloaded model:

- ``val_accuracy_drop_points``: (baseline - candidate) validation accuracy x 100;
- ``size_ratio``: the candidate's ``.slim`` bytes / the original's (below 1: smaller);
- ``speed_ratio``: the original's time / the candidate's (above 1: faster), from paired, interleaved rounds
  (:func:`slimguard.runtime.measure.compare_speed`) with its 95% interval.

Training steps (``finetune``, and ``distill`` from the original model) are run with an epoch hook, so a trial
is also judged *while* it trains: :func:`hopeless_curve` stops a long fine-tuning that cannot reach the budget
in its remaining epochs (validation scores only).

The test split is never touched here; :func:`test_scores` scores a finished point on it, once, at the end.

Embedding data (an embedder, e.g. ``zoo:minilm`` on ``docs-text``) is scored by *fidelity* instead of accuracy:
the task's metric is the mean cosine similarity of the candidate's embeddings to the original's on the split's
texts (the original's embeddings are computed once), and the "drop in points" every other part of the search
reads (the constraint, pruning, the front's columns) is ``(1 - mean cosine) x 100``: cosine points below the
original's 1. A ``--min-cosine`` of 0.99 is a budget of 1 such point (:func:`cosine_budget_points`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.artifact import slim as artifact
from slimguard.core.config import Config
from slimguard.core.errors import DataError
from slimguard.core.registry import verb_of
from slimguard.core.torch_utils import accuracy, eval_mode
from slimguard.data.core import DataBundle, Split
from slimguard.evaluate import timing_inputs
from slimguard.runtime.measure import MEASURE_THREADS, compare_speed
from slimguard.transforms import run_step

OBJECTIVES = {
    "size": ("size_ratio", "minimize"),
    "latency": ("time_ratio", "minimize"),
    "accuracy": ("val_accuracy_drop_points", "minimize"),
    "robustness": ("val_robust_error", "minimize"),
}
"""Objective name -> (the measured key it minimizes, direction). ``time_ratio`` is 1 / ``speed_ratio``;
``val_robust_error`` is 1 - the PGD robust accuracy (:class:`Robustness`)."""

EMBEDDING_TARGETS = ("torch",)
"""Runtimes an embedder search can time candidates on: ONNX Runtime steps (``ort-int8``) run inside the artifact's
own embedder there, so the paired comparison sees them; a whole-model ONNX export of a text model is not made."""

TARGETS = ("torch", "ort")
"""Runtimes a search can time (and score) candidates on: PyTorch, or ONNX Runtime after slimguard's export."""

SPEED_ROUNDS = 7
SPEED_CALLS = 10
SPEED_BATCH = 64
EMBED_TIMING_BATCH = 32
"""Texts per timed call of an embedder (the validation texts, repeated when there are fewer)."""


RULE_MIN_EPOCHS = 3
"""Epochs a training step runs before :func:`hopeless_curve` may judge it (the first epochs of a pruned model
recover fastest; a rate taken from them alone would be noise or hope)."""
RATE_WINDOW = 2
"""Epochs over which the recent recovery rate is averaged."""


def cosine_budget_points(min_cosine: float) -> float:
    """The budget, in the search's points, of a minimum mean cosine to the original (``0.99`` -> ``1.0``).

    Example:
        >>> cosine_budget_points(0.99)
        1.0
    """
    return round((1.0 - min_cosine) * 100, 10)


class Hopeless(Exception):
    """A trial's validation accuracy misses the budget after its last recovering step, or will miss it by the
    end of that step's training (``epoch`` set): stop it early."""

    def __init__(self, step: int, drop: float, epoch: int | None = None, curve: list[float] | None = None) -> None:
        where = f"step {step}" if epoch is None else f"epoch {epoch + 1} of step {step}"
        super().__init__(f"accuracy drop {drop:.2f} points after {where}")
        self.step = step
        self.drop = drop
        self.epoch = epoch
        self.curve = list(curve or [])


def hopeless_curve(drops: list[float], epochs: int, budget: float) -> bool:
    """Whether a training run whose validation drop (points) after each epoch so far is ``drops`` cannot end
    within ``budget`` points in its ``epochs`` epochs.

    It is hopeless when, after at least :data:`RULE_MIN_EPOCHS` epochs, the best drop so far is over the budget
    and even improving in every remaining epoch at the recent rate (the mean gain per epoch over the last
    :data:`RATE_WINDOW` epochs, measured on the best drop so far) would leave it over the budget. The rate is
    generous: the cosine schedule makes later epochs gain less, not more. The last epoch is never judged
    here (the step's end is judged by the budget itself).

    Example:
        >>> hopeless_curve([40.0, 30.0, 29.5, 29.0], epochs=12, budget=1.0)  # 0.5 points/epoch * 8 left < 28
        True
        >>> hopeless_curve([24.0, 2.0, 1.8], epochs=12, budget=1.0)
        False
    """
    done = len(drops)
    if done < RULE_MIN_EPOCHS or done >= epochs:
        return False
    best = [min(drops[: i + 1]) for i in range(done)]
    if best[-1] <= budget + 1e-9:
        return False
    window = min(RATE_WINDOW, done - 1)
    rate = max(0.0, (best[-1 - window] - best[-1]) / window)
    return best[-1] - rate * (epochs - done) > budget + 1e-9


def _training_epochs(step: Config) -> int | None:
    """The epochs of a training step this module can watch epoch by epoch (``finetune``, and ``distill`` from
    the original model), else None (the step runs through the step runner unwatched)."""
    from slimguard.distill.core import DistillConfig
    from slimguard.train.loop import FinetuneConfig

    if isinstance(step, FinetuneConfig):
        return step.epochs
    if isinstance(step, DistillConfig) and not step.teacher:
        return step.finetune.epochs
    return None


def _epoch_of(on_epoch: Callable[[int, int, int, nn.Module], None], step: int, epochs: int, model: nn.Module,
              epoch: int) -> None:
    on_epoch(step, epoch, epochs, model)


def _train_watched(model: nn.Module, step: Config, data: DataBundle, original: nn.Module,
                   on_epoch: Callable[[nn.Module, int], None]) -> None:
    """Run a training step with ``on_epoch(model, epoch)`` after each epoch, as the step runner would run it
    (same handler function, same arguments, the step recorded in the model's history); the step handlers take
    no callbacks, so the training functions are called here directly."""
    from slimguard.distill.core import DistillConfig, distill
    from slimguard.models.spec import record
    from slimguard.train.loop import Callback, finetune

    class Watch(Callback):
        def on_epoch_end(self, model: nn.Module, epoch: int, val_score: float | None) -> None:
            on_epoch(model, epoch)

    if isinstance(step, DistillConfig):
        distill(original, model, data, step, progress=False, callbacks=[Watch()])
    else:
        finetune(model, data, step, progress=False, callbacks=[Watch()])  # type: ignore[arg-type]
    record(model, {"verb": verb_of(step), "config": step.to_dict()})


class NotDeployable(Exception):
    """The candidate cannot run on the target runtime (its layers do not export to ONNX): stop the trial."""


@dataclasses.dataclass(frozen=True)
class Robustness:
    """How the robustness objective is measured: L-inf PGD (:class:`slimguard.robust.PGD`, random start,
    seeded) of radius ``eps`` (raw input units) and ``steps`` steps on the first ``max_examples`` validation
    examples. Quantized candidates are attacked through their fake-quant twin and the examples transferred
    (:func:`slimguard.robust.attack_accuracy`). The objective is the error under attack, 1 - robust accuracy."""

    eps: float = 0.1
    steps: int = 10
    max_examples: int = 128

    def validate(self) -> None:
        from slimguard.core.errors import ConfigError

        if not 0 < self.eps < float("inf"):
            raise ConfigError(f"--robust-eps: {self.eps!r}; use a positive radius in input units (e.g. 0.1)")
        if self.steps < 1:
            raise ConfigError(f"--robust-steps: {self.steps!r}; use 1 or more")
        if self.max_examples < 1:
            raise ConfigError(f"--max-examples: {self.max_examples!r}; use 1 or more")

    def accuracy(self, model: nn.Module, split: Split, seed: int) -> float:
        """Robust accuracy of ``model`` on the first ``max_examples`` examples of ``split``."""
        from slimguard.robust import PGD, attack_accuracy

        x, y = split.tensors
        n = min(self.max_examples, len(y))
        attack = PGD(eps=self.eps, steps=self.steps, seed=seed)
        return float(attack_accuracy(model, attack, x[:n], y[:n], bounds=split.meta.bounds())["accuracy"])


@dataclasses.dataclass
class Evaluator:
    """What every trial of one search shares, and how a trial is measured.

    Args:
        model: the model as loaded (never changed; each trial works on a deep copy).
        data: the data bundle; trials score ``data.val`` only.
        budget: the allowed validation accuracy drop, in points.
        seed: torch's seed before each pipeline (the same pipeline gives the same model).
        speed_budget_s: about how long each paired speed comparison may take, in seconds.
        threads: torch threads pinned while timing, and ONNX Runtime's intra-op threads (default 1).
        target: ``torch`` (default) or ``ort``: the runtime candidates are scored and timed on. With ``ort``
            the original and every candidate (the artifact as reloaded) are exported with
            :func:`slimguard.runtime.onnx.export_onnx` and run in ONNX Runtime sessions with ``threads``
            threads; accuracy and the paired speed ratio are those of the sessions.
        robustness: measure the robustness objective this way (None: not measured).
    """

    model: nn.Module
    data: DataBundle
    budget: float
    seed: int = 0
    speed_budget_s: float = 1.0
    threads: int | None = MEASURE_THREADS
    target: str = "torch"
    robustness: Robustness | None = None
    base_test_accuracy: float | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        from slimguard.core.errors import ConfigError

        if self.data.task not in ("classification", "embedding"):
            raise DataError(f"optimize scores classification data by accuracy and embedding data by cosine; "
                            f"{self.data.name!r} is {self.data.task} data; give a data set of one of those tasks")
        if len(self.data.val) == 0:
            raise DataError(f"data {self.data.name!r} has an empty validation split; optimize selects on it")
        if self.target not in TARGETS:
            raise ConfigError(f"--target: {self.target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        self.embedding = self.data.task == "embedding"
        self._references: dict[str, torch.Tensor] = {}
        if self.embedding:
            if self.target not in EMBEDDING_TARGETS:
                raise ConfigError(f"--target: {self.target!r} is not allowed for an embedder; allowed: "
                                  f"{', '.join(EMBEDDING_TARGETS)} (ort-int8 steps run ONNX Runtime inside it)")
            if self.robustness is not None:
                raise ConfigError("--objectives: robustness needs classification data; drop it for an embedder")
            self.inputs = timing_inputs(self.data.val, min(EMBED_TIMING_BATCH, len(self.data.val)),
                                        reference=self.model)
        else:
            self.inputs = timing_inputs(self.data.val, min(SPEED_BATCH, len(self.data.val)))
        self.base_model = self.deployed(self.model)
        self.base_val_accuracy = self.score(self.base_model, self.data.val)
        self.base_bytes = artifact.file_size(self.model)
        self.base_robust_accuracy = (None if self.robustness is None
                                     else self.robustness.accuracy(self.model, self.data.val, self.seed))

    def score(self, model: nn.Module, split: Split) -> float:
        """The task's metric on ``split``: top-1 accuracy, or for embedding data the mean cosine to the
        original's embeddings (:func:`fidelity`)."""
        return self.fidelity(model, split)["cosine_mean"] if self.embedding else score(model, split)

    def fidelity(self, model: nn.Module, split: Split) -> dict[str, float]:
        """Mean and min cosine of ``model``'s embeddings to the original's on ``split``'s texts (the original's
        are computed once per split and kept)."""
        if split.name not in self._references:
            self._references[split.name] = embeddings(self.model, self.model, list(split.x))
        cos = torch.nn.functional.cosine_similarity(embeddings(model, self.model, list(split.x)),
                                                    self._references[split.name], dim=-1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    def deployed(self, model: nn.Module) -> nn.Module:
        """``model`` as it runs on the target: itself (``torch``), or an ONNX Runtime session of its export
        (``ort``; the ``.onnx`` file is written to a temporary folder and removed once the session holds it).

        Raises:
            NotDeployable: a layer of ``model`` does not export to ONNX.
        """
        if self.target == "torch":
            return model
        import tempfile

        from slimguard.core.errors import ModelError
        from slimguard.runtime.onnx import OrtModel, export_onnx

        with tempfile.TemporaryDirectory(prefix="slimguard-opt-") as tmp:
            try:
                path = export_onnx(model, self.data.val.x[:1], Path(tmp) / "model.onnx", progress=False)
            except ModelError as exc:
                raise NotDeployable(str(exc)) from None
            return OrtModel(path, num_threads=self.threads or None, keep_optimized=False)

    def build(self, steps: list[Config], *, after_step: Callable[[int, nn.Module], None] | None = None,
              on_epoch: Callable[[int, int, int, nn.Module], None] | None = None) -> nn.Module:
        """A copy of the model with ``steps`` applied in order (seeded; the original is the teacher and
        reference of steps that need one). ``after_step(i, model)`` runs after each step;
        ``on_epoch(i, epoch, epochs, model)`` after each epoch of a watched training step (the model is the
        same either way)."""
        torch.manual_seed(self.seed)
        model = copy.deepcopy(self.model)
        for i, step in enumerate(steps):
            epochs = _training_epochs(step) if on_epoch is not None else None
            if on_epoch is not None and epochs is not None:
                _train_watched(model, step, self.data, self.model, functools.partial(_epoch_of, on_epoch, i, epochs))
            else:
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
            ``speed_ci95``, ``speed`` (the comparison's full record), ``time_ratio``, ``intermediate``
            (the drop after each step) and ``train_curve`` (the drop after each epoch of the last recovering
            step, when it is a watched training step; else empty).

        Raises:
            Hopeless: the drop after step ``judge_after`` (or any later step) is over the budget, or an epoch
                of step ``judge_after``'s training shows it cannot end within it (:func:`hopeless_curve`).
        """
        intermediate: list[float] = []
        curve: list[float] = []

        def on_epoch(i: int, epoch: int, epochs: int, model: nn.Module) -> None:
            if i != judge_after:
                return
            curve.append((self.base_val_accuracy - self.score(model, self.data.val)) * 100)
            if hopeless_curve(curve, epochs, self.budget):
                raise Hopeless(i, min(curve), epoch=epoch, curve=curve)

        def after_step(i: int, model: nn.Module) -> None:
            drop = (self.base_val_accuracy - self.score(model, self.data.val)) * 100
            intermediate.append(drop)
            if report is not None:
                report(i, drop)
            if i >= judge_after >= 0 and drop > self.budget + 1e-9:
                raise Hopeless(i, drop, curve=curve)

        model = self.build(steps, after_step=after_step, on_epoch=on_epoch if judge_after >= 0 else None)
        if self.target == "ort":
            from slimguard.runtime.onnx import unexportable_layers

            refused = unexportable_layers(model)
            if refused:  # before the artifact and the timing
                name, why = next(iter(refused.items()))
                raise NotDeployable(f"{len(refused)} layer(s) do not export to ONNX, e.g. {name}: {why}")
        artifact_path.parent.mkdir(parents=True, exist_ok=True)
        pending = artifact_path.with_name(f".{artifact_path.name}.{os.getpid()}.pending")
        artifact.save(model, pending)
        try:
            reloaded = artifact.load(pending, trust_code=artifact.code_file(model))
            nbytes = pending.stat().st_size
            os.replace(pending, artifact_path)
        finally:
            pending.unlink(missing_ok=True)
        candidate = self.deployed(reloaded)
        cosines = self.fidelity(candidate, self.data.val) if self.embedding else {}
        val = cosines["cosine_mean"] if self.embedding else score(candidate, self.data.val)
        comparison = compare_speed({"baseline": self.base_model, "candidate": candidate}, self.inputs,
                                   baseline="baseline", rounds=SPEED_ROUNDS, calls_per_round=SPEED_CALLS,
                                   budget_s=self.speed_budget_s, threads=self.threads, seed=self.seed)
        speed = comparison.to_dict("candidate")
        speed.pop("per_round", None)
        out = {"val_accuracy": val, "val_accuracy_drop_points": (self.base_val_accuracy - val) * 100,
               "bytes": nbytes, "size_ratio": nbytes / self.base_bytes, "speed_ratio": speed["ratio"],
               "speed_ci95": list(speed["ci95"]), "time_ratio": 1.0 / speed["ratio"], "speed": speed,
               "intermediate": intermediate, "train_curve": curve, "target": self.target}
        if self.embedding:
            out.update(val_cosine_mean=cosines["cosine_mean"], val_cosine_min=cosines["cosine_min"])
        if self.robustness is not None:
            robust = self.robustness.accuracy(reloaded, self.data.val, self.seed)
            out.update(val_robust_accuracy=robust, val_robust_error=1.0 - robust)
        return out


def score(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (nothing else is measured)."""
    x, y = split.tensors
    return accuracy(model, x, y)


@torch.no_grad()
def embeddings(model: nn.Module, original: nn.Module, texts: list[str], batch_size: int = 32,
               max_length: int = 128) -> torch.Tensor:
    """``(N, D)`` float embeddings of ``texts`` by ``model``, tokenized by ``original`` (a compressed embedder
    keeps its original's tokenizer), ``batch_size`` texts at a time."""
    tokenize = original.tokenize
    with eval_mode(model):
        return torch.cat([model(**tokenize(texts[i : i + batch_size], max_length)).float()  # type: ignore[operator]
                          for i in range(0, len(texts), batch_size)])


def test_scores(evaluator: Evaluator, model: nn.Module) -> dict[str, float]:
    """The test accuracy of a finished point and its drop in points against the original's test accuracy, both
    on the target runtime (the test split's only use: once per Pareto point, after the search). For an
    embedder: ``test_cosine_mean``/``test_cosine_min`` to the original's test embeddings, ``test_accuracy`` the
    mean cosine and the drop ``(1 - mean cosine) x 100``."""
    if evaluator.embedding:
        cos = evaluator.fidelity(evaluator.deployed(model), evaluator.data.test)
        evaluator.base_test_accuracy = 1.0
        return {"test_accuracy": cos["cosine_mean"], "test_accuracy_drop_points": (1.0 - cos["cosine_mean"]) * 100,
                "test_cosine_mean": cos["cosine_mean"], "test_cosine_min": cos["cosine_min"],
                "test_n": len(evaluator.data.test)}
    if evaluator.base_test_accuracy is None:
        evaluator.base_test_accuracy = score(evaluator.base_model, evaluator.data.test)
    acc = score(evaluator.deployed(model), evaluator.data.test)
    return {"test_accuracy": acc, "test_accuracy_drop_points": (evaluator.base_test_accuracy - acc) * 100,
            "test_n": len(evaluator.data.test)}
