"""Out-of-distribution detectors with ``fit(train)`` / ``score(x)``, threshold calibration, and metrics.

Convention: ``score(x)`` is an **OOD score**, higher = more likely out of distribution. ``calibrate``
picks the threshold on in-distribution validation data so that a target share of it (TPR, default 95%)
is accepted; ``predict(x)`` is then ``score(x) > threshold``.

| name          | score                                                       | paper                         |
|---------------|-------------------------------------------------------------|-------------------------------|
| ``msp``       | ``-max softmax``                                            | Hendrycks & Gimpel, ICLR 2017 |
| ``max-logit`` | ``-max logit``                                              | Hendrycks et al., ICML 2022   |
| ``energy``    | ``-T logsumexp(logits / T)``                                | Liu et al., NeurIPS 2020      |
| ``odin``      | ``-max softmax(f(x~) / T)``, ``x~`` = input nudged by eps   | Liang et al., ICLR 2018       |
| ``mahalanobis`` | min over classes of the Mahalanobis distance of features, shared covariance | Lee et al., NeurIPS 2018 |
| ``knn``       | distance to the k-th nearest L2-normalised train feature    | Sun et al., ICML 2022         |

Features (Mahalanobis, KNN) are the input of the last linear layer by default (the penultimate
features), or the output of a named layer (spatial dimensions are averaged). Mahalanobis keeps only
running sums (``D`` class means and one ``D x D`` covariance), never the features themselves.

Example:
    >>> det = make_detector("energy", model).fit(data.train).calibrate(data.val)
    >>> det.predict(x)                     # bool (N,)
    >>> auroc(det.score(data.test.x), det.score(ood.test.x))
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import check_range
from slimguard.core.errors import ConfigError, DataError, ModelError, NotFittedError

_DETECTORS: dict[str, type[Detector]] = {}


def register_detector(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector available to :func:`make_detector` and the CLI."""

    def deco(cls: type[Detector]) -> type[Detector]:
        if name in _DETECTORS and _DETECTORS[name] is not cls:
            raise ValueError(f"detector {name!r} is already registered")
        cls.name = name
        _DETECTORS[name] = cls
        return cls

    return deco


def detector_names() -> list[str]:
    return sorted(_DETECTORS)


def make_detector(name: str, model: nn.Module, **options: Any) -> Detector:
    """Build a registered detector by name (``msp``, ``max-logit``, ``energy``, ``odin``, ``mahalanobis``, ``knn``)."""
    if name not in _DETECTORS:
        raise ConfigError(f"detector: {name!r} is not known; allowed: {', '.join(detector_names())}")
    return _DETECTORS[name](model, **options)


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


class _Eval:
    """Context manager: eval mode, no requires_grad on parameters; both restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was = self.model.training
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.grads:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)
        for p, g in self.grads:
            p.requires_grad_(g)


class Detector(abc.ABC):
    """Base class. Subclasses implement ``_fit(x, y)`` (optional) and ``_score(x)`` for one batch.

    Args:
        model: the classifier; its mode and ``requires_grad`` are restored after every call.
        batch_size: scoring batch size (default 256).
    """

    name = "detector"

    def __init__(self, model: nn.Module, batch_size: int = 256) -> None:
        check_range("batch_size", batch_size, 1)
        self.model = model
        self.batch_size = batch_size
        self.threshold: float | None = None
        self.tpr: float | None = None
        self.fitted = False

    def fit(self, train: Any) -> Detector:
        """Fit on in-distribution training data (a Split, a tensor, or ``(x, y)``). Returns self."""
        x, y = _inputs(train)
        with _Eval(self.model):
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
        with _Eval(self.model):
            return torch.cat([self._score(x[i : i + self.batch_size]).detach().float()
                              for i in range(0, len(x), self.batch_size)])

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
@register_detector("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017): score ``-max_c softmax(f(x))_c``."""

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits already computed (no second forward)."""
        return -F.softmax(logits.detach().float(), dim=-1).amax(-1)

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_logits(self.model(x))


@register_detector("max-logit")
class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., 2022): score ``-max_c f(x)_c``."""

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits already computed (no second forward)."""
        return -logits.detach().float().amax(-1)

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_logits(self.model(x))


@register_detector("energy")
class Energy(Detector):
    """Energy score (Liu et al., 2020): ``-T * logsumexp(f(x) / T)``.

    Args:
        temperature: T (default 1).
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, batch_size: int = 256) -> None:
        super().__init__(model, batch_size)
        check_range("temperature", temperature, 0.0, low_inclusive=False)
        self.temperature = temperature

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits already computed (no second forward)."""
        t = self.temperature
        return -t * torch.logsumexp(logits.detach().float() / t, dim=-1)

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_logits(self.model(x))


@register_detector("odin")
class ODIN(Detector):
    """ODIN (Liang et al., 2018): temperature scaling plus a small input step that raises the max
    softmax; in-distribution inputs gain more than OOD ones. Score ``-max softmax(f(x~) / T)``.

    Args:
        temperature: T (default 1000).
        epsilon: step size in raw input units (default 0.002 for inputs in [0, 1]).
    """

    def __init__(self, model: nn.Module, temperature: float = 1000.0, epsilon: float = 0.002,
                 batch_size: int = 256) -> None:
        super().__init__(model, batch_size)
        check_range("temperature", temperature, 0.0, low_inclusive=False)
        check_range("epsilon", epsilon, 0.0)
        self.temperature, self.epsilon = temperature, epsilon

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if self.epsilon > 0:
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                loss = -F.log_softmax(self.model(xg).float() / t, dim=-1).amax(-1).sum()
                (grad,) = torch.autograd.grad(loss, xg)
            x = (xg - self.epsilon * grad.sign()).detach()
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


@register_detector("mahalanobis")
class Mahalanobis(Detector):
    """Class-conditional Gaussians with a shared covariance on a feature layer (Lee et al., 2018).

    Score: ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)``. Fitting streams batches and keeps only per-class
    sums and one ``D x D`` scatter matrix (memory ``O(C*D + D^2)``, independent of the data size).

    Args:
        layer: module whose output is used (default: input of the last linear layer).
        shrinkage: added to the covariance diagonal, relative to its mean variance (default 1e-3).
    """

    def __init__(self, model: nn.Module, layer: str | None = None, shrinkage: float = 1e-3,
                 batch_size: int = 256) -> None:
        super().__init__(model, batch_size)
        check_range("shrinkage", shrinkage, 0.0)
        self.features = _Features(model, layer)
        self.shrinkage = shrinkage
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        sums: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        outer: torch.Tensor | None = None
        for i in range(0, len(x), self.batch_size):
            f, logits = self.features(x[i : i + self.batch_size])
            f = f.double()
            yb = y[i : i + self.batch_size] if y is not None else logits.argmax(-1)
            k = logits.shape[-1]
            if sums is None:
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
        cov += torch.eye(len(cov), dtype=cov.dtype) * self.shrinkage * cov.diagonal().mean().clamp_min(1e-12)
        self.means = means.float()
        self.precision = torch.linalg.pinv(cov, hermitian=True).float()

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.means is not None and self.precision is not None
        f, _ = self.features(x)
        d = f[:, None, :] - self.means[None]  # (N, C, D)
        m = torch.einsum("ncd,de,nce->nc", d, self.precision, d)
        return m.amin(-1)


@register_detector("knn")
class KNN(Detector):
    """Deep nearest neighbours (Sun et al., 2022): distance to the k-th nearest L2-normalised train
    feature. Keeps the normalised train features ``(N_train, D)`` (optionally a seeded subsample).

    Args:
        k: neighbour rank (default 10).
        layer: feature layer (default: input of the last linear layer).
        max_bank: keep at most this many train features (default 20000).
    """

    def __init__(self, model: nn.Module, k: int = 10, layer: str | None = None, max_bank: int = 20000,
                 batch_size: int = 256) -> None:
        super().__init__(model, batch_size)
        check_range("k", k, 1)
        check_range("max_bank", max_bank, 1)
        self.k, self.max_bank = k, max_bank
        self.features = _Features(model, layer)
        self.bank: torch.Tensor | None = None

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if len(x) > self.max_bank:
            g = torch.Generator().manual_seed(0)
            x = x[torch.randperm(len(x), generator=g)[: self.max_bank]]
        feats = [F.normalize(self.features(x[i : i + self.batch_size])[0], dim=-1)
                 for i in range(0, len(x), self.batch_size)]
        self.bank = torch.cat(feats)
        if len(self.bank) < self.k:
            raise DataError(f"knn: k={self.k} but only {len(self.bank)} training examples; lower k")

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bank is not None
        f = F.normalize(self.features(x)[0], dim=-1)
        d = torch.cdist(f, self.bank)
        return d.topk(self.k, dim=-1, largest=False).values[:, -1]


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
        row: dict[str, Any] = {"threshold": det.threshold}
        for oname, odata in ood.items():
            s_ood = det.score(odata)
            row[oname] = {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, tpr),
                          "ood_flagged": float((s_ood > det.threshold).double().mean()),
                          "id_flagged": float((s_id > det.threshold).double().mean())}
        out[name] = row
    return out
