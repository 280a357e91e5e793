"""Out-of-distribution detectors with ``fit(train)`` / ``score(x)``, threshold calibration, and metrics.

Convention: ``score(x)`` is an **OOD score**, higher = more likely out of distribution. ``calibrate``
picks the threshold on in-distribution validation data so that a target share of it (TPR, default 95%)
is accepted; ``predict(x)`` is then ``score(x) > threshold``.

| name            | score                                                       | paper                         |
|-----------------|-------------------------------------------------------------|-------------------------------|
| ``msp``         | ``-max softmax``                                            | Hendrycks & Gimpel, ICLR 2017 |
| ``max-logit``   | ``-max logit``                                              | Hendrycks et al., ICML 2022   |
| ``energy``      | ``-T logsumexp(logits / T)``                                | Liu et al., NeurIPS 2020      |
| ``odin``        | ``-max softmax(f(x~) / T)``, ``x~`` = input nudged by eps   | Liang et al., ICLR 2018       |
| ``mahalanobis`` | min over classes of the feature Mahalanobis distance        | Lee et al., NeurIPS 2018      |
| ``knn``         | distance to the k-th nearest L2-normalised train feature    | Sun et al., ICML 2022         |

Features (Mahalanobis, KNN) are the input of the last linear layer by default (the penultimate
features), or the output of a named layer (spatial dimensions are averaged). Mahalanobis keeps only
running sums (``D`` class means and one ``D x D`` covariance), never the features themselves.

Each detector's options are a config (:class:`DetectorConfig` and its subclasses ``EnergyConfig``,
``ODINConfig``, ``MahalanobisConfig``, ``KNNConfig``), given as an object or as keywords.

Example:
    >>> det = make_detector("energy", model, temperature=2.0).fit(data.train).calibrate(data.val)
    >>> det.predict(x)                     # bool (N,)
    >>> auroc(det.score(data.test.x), det.score(ood.test.x))
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, check_ranges
from slimguard.core.errors import ConfigError, DataError, ModelError, NotFittedError
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import eval_mode

DETECTORS: Registry[type[Detector]] = Registry("OOD detector")


def register_detector(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector available under ``name`` to :func:`make_detector` and the CLI."""

    def deco(cls: type[Detector]) -> type[Detector]:
        cls.name = name
        return DETECTORS.register(name, cls)

    return deco


def detector_names() -> list[str]:
    return DETECTORS.names()


def make_detector(name: str, model: nn.Module, **options: Any) -> Detector:
    """Build a registered detector by name (``msp``, ``max-logit``, ``energy``, ``odin``, ``mahalanobis``,
    ``knn``); ``options`` are its config's (an unknown key is named with the allowed ones)."""
    return DETECTORS.get(name)(model, **options)


def _inputs(data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y) from a Split, a tensor, or an (x, y) tuple."""
    if isinstance(data, tuple):
        x, y = data
    elif torch.is_tensor(data):
        x, y = data, None
    elif hasattr(data, "x"):
        x, y = data.x, getattr(data, "y", None)
    else:
        raise DataError(f"expected a Split, a tensor or an (x, y) tuple, got {type(data).__name__}")
    if not torch.is_tensor(x) or len(x) == 0:
        raise DataError("OOD detectors need a non-empty tensor of inputs")
    return x, y


@dataclasses.dataclass
class DetectorConfig(Config):
    """Options every detector has (MSP and max logit have no others).

    Args:
        batch_size: scoring batch size (default 256).
    """

    batch_size: int = 256

    def validate(self) -> None:
        check_range("batch_size", self.batch_size, 1)


class Detector(abc.ABC):
    """Base class. Subclasses set ``config_class`` and implement ``_fit(x, y)`` (optional) and ``_score(x)``
    for one batch.

    Args:
        model: the classifier; its mode and ``requires_grad`` are restored after every call.
        config: the detector's config (:class:`DetectorConfig` or a subclass), or its options as keywords:
            ``Energy(model, temperature=2.0)`` is ``Energy(model, EnergyConfig(temperature=2.0))``.
    """

    name = "detector"
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, model: nn.Module, config: DetectorConfig | None = None, **options: Any) -> None:
        self.config = self.config_class.build(config, options, where=self.name)
        self.model = model
        self.threshold: float | None = None
        self.tpr: float | None = None
        self.fitted = False

    def fit(self, train: Any) -> Detector:
        """Fit on in-distribution training data (a Split, a tensor, or ``(x, y)``). Returns self."""
        x, y = _inputs(train)
        with eval_mode(self.model, requires_grad=False):
            self._fit(x, y)
        self.fitted = True
        return self

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:  # noqa: B027 (optional hook)
        """Default: nothing to learn (output-based scores)."""

    @abc.abstractmethod
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores of one batch."""

    def score(self, x: Any) -> torch.Tensor:
        """OOD scores ``(N,)``, higher = more likely out of distribution."""
        if not self.fitted:
            raise NotFittedError(f"{self.name} detector is not fitted; call .fit(train) first")
        x, _ = _inputs(x)
        with eval_mode(self.model, requires_grad=False):
            bs = self.config.batch_size
            return torch.cat([self._score(x[i : i + bs]).detach().float() for i in range(0, len(x), bs)])

    def calibrate(self, val: Any, tpr: float = 0.95) -> Detector:
        """Choose the threshold that accepts ``tpr`` of in-distribution ``val`` (default 95%)."""
        check_range("tpr", tpr, 0.0, 1.0, low_inclusive=False)
        s = self.score(val)
        self.threshold = threshold_at_tpr(s, tpr)
        self.tpr = tpr
        return self

    def predict(self, x: Any) -> torch.Tensor:
        """Boolean ``(N,)``: True where the input is flagged as OOD."""
        if self.threshold is None:
            raise NotFittedError(f"{self.name} detector has no threshold; call .calibrate(val) after .fit(train)")
        return self.score(x) > self.threshold

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "tpr": self.tpr}


# ---- output-based detectors --------------------------------------------------------------------------------
class LogitDetector(Detector):
    """A detector whose score depends on the logits alone: one forward per batch, and a caller that has the
    logits already (the :class:`~slimguard.guard.Guard`) scores them with :meth:`score_logits`."""

    @abc.abstractmethod
    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits already computed (no second forward)."""

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_logits(self.model(x))


@register_detector("msp")
class MSP(LogitDetector):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017): score ``-max_c softmax(f(x))_c``."""

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -F.softmax(logits.detach().float(), dim=-1).amax(-1)


@register_detector("max-logit")
class MaxLogit(LogitDetector):
    """Maximum logit (Hendrycks et al., 2022): score ``-max_c f(x)_c``."""

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.detach().float().amax(-1)


@dataclasses.dataclass
class EnergyConfig(DetectorConfig):
    """Options of :class:`Energy`.

    Args:
        temperature: T, > 0 (default 1).
    """

    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_range("temperature", self.temperature, 0.0, low_inclusive=False)


@register_detector("energy")
class Energy(LogitDetector):
    """Energy score (Liu et al., 2020): ``-T * logsumexp(f(x) / T)`` (options: :class:`EnergyConfig`)."""

    config_class = EnergyConfig
    config: EnergyConfig

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.config.temperature
        return -t * torch.logsumexp(logits.detach().float() / t, dim=-1)


@dataclasses.dataclass
class ODINConfig(DetectorConfig):
    """Options of :class:`ODIN`.

    Args:
        temperature: T, > 0 (default 1000).
        epsilon: step size in raw input units, >= 0 (default 0.002 for inputs in [0, 1]).
    """

    temperature: float = 1000.0
    epsilon: float = 0.002

    def validate(self) -> None:
        super().validate()
        check_range("temperature", self.temperature, 0.0, low_inclusive=False)
        check_range("epsilon", self.epsilon, 0.0)


@register_detector("odin")
class ODIN(Detector):
    """ODIN (Liang et al., 2018): temperature scaling plus a small input step that raises the max
    softmax; in-distribution inputs gain more than OOD ones. Score ``-max softmax(f(x~) / T)``
    (options: :class:`ODINConfig`).
    """

    config_class = ODINConfig
    config: ODINConfig

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        t, epsilon = self.config.temperature, self.config.epsilon
        if epsilon > 0:
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                loss = -F.log_softmax(self.model(xg).float() / t, dim=-1).amax(-1).sum()
                (grad,) = torch.autograd.grad(loss, xg)
            x = (xg - epsilon * grad.sign()).detach()
        with torch.no_grad():
            return -F.softmax(self.model(x).float() / t, dim=-1).amax(-1)


# ---- feature-based detectors --------------------------------------------------------------------------------
def _last_linear(model: nn.Module) -> str:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features") and n):
            name = n
    if name is None:
        raise ModelError("no linear layer found for penultimate features; pass layer='MODULE_NAME'")
    return name


class _Features:
    """Captures features at a layer: the *input* of the last linear layer (default) or a named module's
    output. ``(N, C, ...)`` outputs are averaged over spatial dimensions to ``(N, C)``."""

    def __init__(self, model: nn.Module, layer: str | None) -> None:
        mods = dict(model.named_modules())
        if layer is not None and layer not in mods:
            raise ConfigError(f"layer: {layer!r} is not a module of the model; e.g. {', '.join(list(mods)[1:6])}")
        self.model = model
        self.layer = layer or _last_linear(model)
        self.use_input = layer is None
        self.module = mods[self.layer]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        got: list[torch.Tensor] = []
        if self.use_input:
            h = self.module.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
        else:
            h = self.module.register_forward_hook(lambda _m, _a, out: got.append(out))
        try:
            logits = self.model(x)
        finally:
            h.remove()
        f = got[-1].float()
        if f.dim() > 2:
            f = f.flatten(2).mean(-1)
        return f.flatten(1), logits


@dataclasses.dataclass
class FeatureDetectorConfig(DetectorConfig):
    """Options every feature-based detector has.

    Args:
        layer: module whose output is used (default None: the input of the last linear layer).
    """

    layer: str | None = None


class FeatureDetector(Detector):
    """A detector that scores the features of one layer (``config.layer``), read by ``self.features``."""

    config_class = FeatureDetectorConfig
    config: FeatureDetectorConfig

    def __init__(self, model: nn.Module, config: FeatureDetectorConfig | None = None, **options: Any) -> None:
        super().__init__(model, config, **options)
        self.features = _Features(model, self.config.layer)


@dataclasses.dataclass
class MahalanobisConfig(FeatureDetectorConfig):
    """Options of :class:`Mahalanobis` (and ``layer``, see :class:`FeatureDetectorConfig`).

    Args:
        shrinkage: added to the covariance diagonal, relative to its mean variance, >= 0 (default 1e-3).
    """

    shrinkage: float = 1e-3

    def validate(self) -> None:
        super().validate()
        check_range("shrinkage", self.shrinkage, 0.0)


@register_detector("mahalanobis")
class Mahalanobis(FeatureDetector):
    """Class-conditional Gaussians with a shared covariance on a feature layer (Lee et al., 2018).

    Score: ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)``. Fitting streams batches and keeps only per-class
    sums and one ``D x D`` scatter matrix (memory ``O(C*D + D^2)``, independent of the data size).
    Options: :class:`MahalanobisConfig`.
    """

    config_class = MahalanobisConfig
    config: MahalanobisConfig
    means: torch.Tensor | None = None  # (C, D) class means, set by fit
    precision: torch.Tensor | None = None  # (D, D) shared inverse covariance, set by fit

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        sums: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        outer: torch.Tensor | None = None
        bs = self.config.batch_size
        for i in range(0, len(x), bs):
            f, logits = self.features(x[i : i + bs])
            f = f.double()
            yb = y[i : i + bs] if y is not None else logits.argmax(-1)
            k = logits.shape[-1]
            if sums is None or counts is None or outer is None:  # first batch: all three are set together
                sums = torch.zeros(k, f.shape[1], dtype=torch.float64)
                counts = torch.zeros(k, dtype=torch.float64)
                outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
            sums.index_add_(0, yb, f)
            counts.index_add_(0, yb, torch.ones(len(yb), dtype=torch.float64))
            outer += f.T @ f
        assert sums is not None and counts is not None and outer is not None
        present = counts > 0
        means = sums[present] / counts[present, None]
        n = counts.sum()
        # shared within-class covariance: E[f f^T] - sum_c n_c mu_c mu_c^T / n
        cov = (outer - (means * counts[present, None]).T @ means) / n
        shrink = self.config.shrinkage
        cov += torch.eye(len(cov), dtype=cov.dtype) * shrink * cov.diagonal().mean().clamp_min(1e-12)
        self.means = means.float()
        self.precision = torch.linalg.pinv(cov, hermitian=True).float()

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.means is not None and self.precision is not None
        f, _ = self.features(x)
        d = f[:, None, :] - self.means[None]  # (N, C, D)
        m = torch.einsum("ncd,de,nce->nc", d, self.precision, d)
        return m.amin(-1)


@dataclasses.dataclass
class KNNConfig(FeatureDetectorConfig):
    """Options of :class:`KNN` (and ``layer``, see :class:`FeatureDetectorConfig`).

    Args:
        k: neighbour rank, >= 1 (default 10).
        max_bank: keep at most this many train features, >= 1 (default 20000).
    """

    k: int = 10
    max_bank: int = 20000

    def validate(self) -> None:
        super().validate()
        check_ranges(self, ("k", "max_bank"), 1)


@register_detector("knn")
class KNN(FeatureDetector):
    """Deep nearest neighbours (Sun et al., 2022): distance to the k-th nearest L2-normalised train
    feature. Keeps the normalised train features ``(N_train, D)`` (optionally a seeded subsample).
    Options: :class:`KNNConfig`.
    """

    config_class = KNNConfig
    config: KNNConfig
    bank: torch.Tensor | None = None  # (N_train, D) normalised train features, set by fit

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        k, max_bank, bs = self.config.k, self.config.max_bank, self.config.batch_size
        if len(x) > max_bank:
            g = torch.Generator().manual_seed(0)
            x = x[torch.randperm(len(x), generator=g)[:max_bank]]
        feats = [F.normalize(self.features(x[i : i + bs])[0], dim=-1) for i in range(0, len(x), bs)]
        self.bank = torch.cat(feats)
        if len(self.bank) < k:
            raise DataError(f"knn: k={k} but only {len(self.bank)} training examples; lower k")

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bank is not None
        f = F.normalize(self.features(x)[0], dim=-1)
        d = torch.cdist(f, self.bank)
        return d.topk(self.config.k, dim=-1, largest=False).values[:, -1]


# ---- calibration and metrics -------------------------------------------------------------------------------
def threshold_at_tpr(id_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """The smallest threshold ``t`` with ``mean(id_scores <= t) >= tpr`` (in-distribution = positive)."""
    s = torch.as_tensor(id_scores).flatten().double().sort().values
    if len(s) == 0:
        raise DataError("cannot calibrate a threshold on an empty set of scores")
    k = max(1, math.ceil(tpr * len(s) - 1e-9))
    return float(s[k - 1])


def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """Area under the ROC curve for separating OOD (positive, higher score) from in-distribution
    data, computed as the Mann-Whitney statistic with ties counted half."""
    a = torch.as_tensor(id_scores).flatten().double()
    b = torch.as_tensor(ood_scores).flatten().double()
    if len(a) == 0 or len(b) == 0:
        raise DataError("AUROC needs in-distribution and OOD scores")
    allv = torch.cat([a, b])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    sorted_v = allv[order]
    # average ranks for ties
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    rb = ranks[len(a):].sum()
    return float((rb - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(id_scores: torch.Tensor, ood_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of OOD inputs accepted at the threshold that accepts ``tpr`` of in-distribution inputs."""
    t = threshold_at_tpr(id_scores, tpr)
    return float((torch.as_tensor(ood_scores).double() <= t).double().mean())


def evaluate_detectors(model: nn.Module, train: Any, val: Any, test: Any, ood: dict[str, Any],
                       names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None,
                       tpr: float = 0.95) -> dict[str, Any]:
    """Fit each detector on ``train``, calibrate on ``val``, and score ``test`` against each OOD set.

    Returns:
        ``{detector: {ood_name: {"auroc", "fpr95", "ood_flagged", "id_flagged"}, "threshold": t}}``
        where ``fpr95`` is the FPR at ``tpr`` TPR measured on the test split, and ``*_flagged`` the
        share flagged with the threshold calibrated on ``val``.
    """
    out: dict[str, Any] = {}
    for name in names or detector_names():
        det = make_detector(name, model, **(options or {}).get(name, {})).fit(train).calibrate(val, tpr)
        s_id = det.score(test)
        threshold = det.threshold
        assert threshold is not None  # calibrate() just set it
        row: dict[str, Any] = {"threshold": threshold}
        for oname, odata in ood.items():
            s_ood = det.score(odata)
            row[oname] = {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, tpr),
                          "ood_flagged": float((s_ood > threshold).double().mean()),
                          "id_flagged": float((s_id > threshold).double().mean())}
        out[name] = row
    return out
