"""``Guard``: contract -> model (optionally protected or cascaded) -> OOD detector -> monitor, in process.

Example:
    >>> guard = Guard.build(model, sg.data.load("digits"), detector="mahalanobis", protect=("range",))
    >>> result = guard(x, ids=["a", "b"])          # raises ContractViolation for bad inputs
    >>> result.pred, result.ood, guard.status()["state"]
    >>> text = guard.prometheus()
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import eval_mode
from slimguard.guard.contract import Contract, ContractViolation, basic_check
from slimguard.guard.monitor import Monitor, MonitorConfig
from slimguard.guard.ood import Detector, make_detector
from slimguard.guard.protect import RangeRestriction, WeightChecksums


@dataclasses.dataclass
class GuardResult:
    """What a guarded call returns.

    Shape:
        ``logits``/``probs`` ``(N, C)``; ``pred``, ``confidence``, ``ood``, ``ood_score`` ``(N,)``.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    pred: torch.Tensor
    confidence: torch.Tensor
    ood: torch.Tensor | None
    ood_score: torch.Tensor | None
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"pred": self.pred.tolist(), "confidence": self.confidence.tolist(),
                "probs": self.probs.tolist(),
                "ood": None if self.ood is None else self.ood.tolist(),
                "ood_score": None if self.ood_score is None else self.ood_score.tolist(),
                "latency_ms": self.latency_ms}


# protections Guard.build attaches, by name: ``fn(model, data, artifact) -> protection``
ProtectionBuilder = Callable[[nn.Module, Any, "str | os.PathLike[str] | None"], Any]
PROTECTIONS: Registry[ProtectionBuilder] = Registry("protection")


@PROTECTIONS.register("range")
def _range_restriction(model: nn.Module, data: Any, artifact: str | os.PathLike[str] | None) -> RangeRestriction:
    return RangeRestriction().profile(model, data.train.x)


@PROTECTIONS.register("checksums")
def _checksums(model: nn.Module, data: Any, artifact: str | os.PathLike[str] | None) -> WeightChecksums:
    if artifact is not None:
        return WeightChecksums.from_artifact(artifact)
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return WeightChecksums.from_model(model, source=good)


def _rows(x: Any) -> int:
    """How many inputs a rejected call held, for the monitor's count (1 when it has no batch dimension,
    such as a 0-d tensor or a scalar)."""
    try:
        return max(1, len(x))
    except TypeError:
        return 1


class Guard:
    """Guards a classifier in process: every input is checked, scored for OOD, and monitored.

    Args:
        model: the classifier (a compressed model, or a :class:`~slimguard.guard.protect.Cascade`).
        contract: input :class:`Contract`; without one, only the basic checks run (a tensor, at least
            one example, finite values).
        detector: a fitted and calibrated OOD detector (its ``predict`` gives the flags).
        monitor: a :class:`Monitor` with a reference.
        protect: protections to attach to ``model`` (:class:`RangeRestriction`,
            :class:`WeightChecksums`); they stay attached until :meth:`close`.
    """

    def __init__(self, model: nn.Module, contract: Contract | None = None, detector: Detector | None = None,
                 monitor: Monitor | None = None, protect: Sequence[Any] = ()) -> None:
        self.model, self.contract, self.detector, self.monitor = model, contract, detector, monitor
        self.protect = list(protect)
        if detector is not None and detector.threshold is None:
            raise ConfigError("detector: it has no threshold; call .fit(train).calibrate(val) before guarding")
        for p in self.protect:
            p.attach(model)

    @classmethod
    def build(cls, model: nn.Module, data: Any, detector: str | None = "mahalanobis",
              protect: Sequence[str] = ("range",), tpr: float = 0.95, margin: float = 0.05,
              monitor_config: MonitorConfig | None = None, detector_options: dict[str, Any] | None = None,
              artifact: str | os.PathLike[str] | None = None) -> Guard:
        """A guard set up from a :class:`~slimguard.data.DataBundle`: contract inferred from ``train``,
        detector (a name from :data:`~slimguard.guard.ood.DETECTORS`, with ``detector_options`` for its
        config) fitted on ``train`` and calibrated on ``val`` at ``tpr``, monitor reference from ``val``,
        and the named protections (:data:`PROTECTIONS`: ``range``: range restriction profiled on
        ``train``; ``checksums``: weight checksums verified before every call and repaired from
        ``artifact``, the model's ``.slim`` file, or else from a copy of its state taken now)."""
        builders = [PROTECTIONS.get(p) for p in ((protect,) if isinstance(protect, str) else protect)]
        contract = Contract.infer(data.train, margin=margin)
        det = None
        if detector is not None:
            det = make_detector(detector, model, **(detector_options or {})).fit(data.train).calibrate(data.val, tpr)
        monitor = Monitor.from_model(model, data.val, monitor_config)
        prots = [build(model, data, artifact) for build in builders]
        return cls(model, contract, det, monitor, prots)

    def check(self, x: Any) -> list[dict[str, Any]]:
        """Violations of ``x`` as dicts (empty when it may be passed to the model)."""
        v = self.contract.check(x) if self.contract is not None else basic_check(x)
        return [e.to_dict() for e in v]

    @torch.no_grad()
    def __call__(self, x: Any, ids: list[Any] | None = None) -> GuardResult:
        """Check, predict, score and record ``x`` ``(N, *input_shape)``.

        Raises:
            ContractViolation: the input breaks the contract (nothing reaches the model).
        """
        t0 = time.perf_counter()
        violations = self.contract.check(x) if self.contract is not None else basic_check(x)
        if violations:
            if self.monitor is not None:
                self.monitor.record_rejected(_rows(x))
            raise ContractViolation(violations)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        with eval_mode(self.model):
            logits = self.model(x)
        return self.decide(x, logits, t0, ids)

    def decide(self, x: Any, logits: torch.Tensor, t0: float, ids: list[Any] | None = None) -> GuardResult:
        """The rest of a guarded call once the model gave ``logits`` on ``x`` (a batch already checked):
        softmax -> OOD score -> monitor. ``t0`` is the call's start (``time.perf_counter()``), for its latency."""
        probs = F.softmax(logits.float(), dim=-1)
        conf, pred = probs.max(-1)
        ood = score = None
        if self.detector is not None:
            score_logits = getattr(self.detector, "score_logits", None)
            score = score_logits(logits) if score_logits is not None else self.detector.score(x)
            threshold = self.detector.threshold
            assert threshold is not None  # __init__ refuses an uncalibrated detector
            ood = score > threshold
        latency = (time.perf_counter() - t0) * 1e3
        if self.monitor is not None:
            self.monitor.observe(probs, ood, latency, ids)
        return GuardResult(logits, probs, pred, conf, ood, score, latency)

    def add_labels(self, ids: list[Any], labels: Any) -> int:
        """Labels that arrived after the predictions (for the monitor's error rate)."""
        return self.monitor.add_labels(ids, labels) if self.monitor is not None else 0

    def status(self) -> dict[str, Any]:
        return self.monitor.status() if self.monitor is not None else {"state": "ok", "reasons": [], "metrics": {}}

    def prometheus(self, labels: dict[str, str] | None = None) -> str:
        return self.monitor.prometheus(labels=labels) if self.monitor is not None else ""

    def close(self) -> None:
        """Detach every protection from the model."""
        for p in self.protect:
            p.detach()

