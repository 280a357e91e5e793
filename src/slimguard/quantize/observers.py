"""Observers: stream over calibration data and choose quantization parameters.

An observer sees tensors one batch at a time (``observer(x)``; nothing is kept but running
statistics) and then gives ``(scale, zero_point)`` for a :class:`QScheme` via :meth:`Observer.qparams`.

| name             | range chosen from                                        | granularity              |
|------------------|----------------------------------------------------------|--------------------------|
| ``minmax``       | running min / max                                        | per tensor or per channel|
| ``moving-average``| exponential moving average of batch min / max           | per tensor or per channel|
| ``percentile``   | the 99.99th percentile of |x| (or of x at both ends)    | per tensor (histogram)   |
| ``entropy``      | the clip range minimising KL(P || Q) (TensorRT's method) | per tensor (histogram)   |
| ``mse``          | the clip range minimising the quantization MSE           | per tensor (histogram)   |

Histogram observers keep 2048 bins over a range that grows as data arrives (old counts are re-binned).

In a data-parallel run each rank observes its share of the calibration data; :func:`reduce_observers_` then
gives every rank the statistics of all of them (min / max ranges by MIN / MAX, histograms re-binned to the
common range and summed, moving averages averaged), so the ranks quantize identically.

Each observer's options are a config (:class:`ObserverConfig` and its subclasses ``MinMaxObserverConfig``,
``MovingAverageObserverConfig``, ``PercentileObserverConfig``, ``EntropyObserverConfig``, ``MSEObserverConfig``),
given as an object or as keywords: ``make_observer("percentile", percentile=99.9)`` is
``PercentileObserver(PercentileObserverConfig(percentile=99.9))``. A bad option is a ConfigError naming it.

Example:
    >>> obs = make_observer("percentile")
    >>> for xb in batches: obs(xb)
    >>> scale, zp = obs.qparams(QScheme(bits=8, symmetric=False))
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

from slimguard.core.config import Config, check_range
from slimguard.core.errors import ConfigError, NotFittedError
from slimguard.core.registry import Registry


@dataclasses.dataclass(frozen=True)
class QScheme:
    """How values map to integers.

    Args:
        bits: 2..8 (default 8).
        symmetric: zero point 0 and range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (default True), else asymmetric
            unsigned ``[0, 2^b - 1]``.
        axis: channel axis for per-channel parameters, None for per tensor (default None).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"bits: {self.bits} is not supported; allowed: 2..8")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` covering ``[lo, hi]`` (the range is widened to include 0)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if scheme.symmetric:
        scale = torch.maximum(hi, -lo) / scheme.qmax
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        zp = (scheme.qmin - torch.round(lo / scale.clamp_min(1e-12))).clamp(scheme.qmin, scheme.qmax).to(torch.int32)
    return scale.clamp_min(1e-8), zp


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Integer codes (as int32) of ``x``; ``scale``/``zero_point`` broadcast along ``scheme.axis``."""
    s, z = _bcast(scale, x, scheme.axis), _bcast(zero_point, x, scheme.axis)
    return torch.clamp(torch.round(x / s) + z, scheme.qmin, scheme.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return (q.float() - _bcast(zero_point, q, axis).float()) * _bcast(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient (identity inside the range, zero
    outside), via PyTorch's fake-quant ops (which export to ONNX QuantizeLinear/DequantizeLinear)."""
    if scheme.axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zero_point.reshape(()).int(),
                                                     scheme.qmin, scheme.qmax)
    axis = scheme.axis % x.dim()
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.int(), axis, scheme.qmin, scheme.qmax)


def _bcast(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return t.reshape(shape)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


# ---- observers ----------------------------------------------------------------------------------------
OBSERVERS: Registry[type[Observer]] = Registry("observer")
"""Observer name -> class (see the table in the module docstring); :func:`make_observer` builds from it."""


ObserverT = TypeVar("ObserverT", bound="Observer")


def register_observer(name: str) -> Callable[[type[ObserverT]], type[ObserverT]]:
    """Class decorator: make an observer available under ``name`` to :func:`make_observer`; a second
    registration of the name is refused."""

    def deco(cls: type[ObserverT]) -> type[ObserverT]:
        cls.name = name
        OBSERVERS.register(name, cls)
        return cls

    return deco


def observer_names() -> list[str]:
    return OBSERVERS.names()


def make_observer(name: str, **options: Any) -> Observer:
    """An observer by name (see the table in the module docstring) with its config's options as keywords:
    ``make_observer("percentile", percentile=99.9)``. An unknown name or option, or a bad value, is a
    ConfigError naming it and what is allowed."""
    return OBSERVERS.get(name)(**options)


@dataclasses.dataclass
class ObserverConfig(Config):
    """Options every observer has.

    Args:
        axis: channel axis for per-channel statistics; None means per tensor (default None).
    """

    axis: int | None = None


class Observer(abc.ABC):
    """Base: ``__call__(x)`` folds a batch into running statistics; ``qparams(scheme)`` gives parameters.

    An observer takes its config (``config_class``), or the config's options as keywords:
    ``PercentileObserver(percentile=99.9)`` is ``PercentileObserver(PercentileObserverConfig(percentile=99.9))``;
    ``observer.config`` holds them (see :class:`ObserverConfig`).
    """

    name: ClassVar[str] = "observer"
    config_class: ClassVar[type[ObserverConfig]] = ObserverConfig

    def __init__(self, config: ObserverConfig | None = None, **options: Any) -> None:
        self.config = self.config_class.build(config, options, where=self.name)
        self.axis = self.config.axis
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if x.numel() == 0:
            return x
        self.update(x)
        self.count += 1
        return x

    @abc.abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch (float, detached) into the statistics."""

    @abc.abstractmethod
    def value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lo, hi)`` range to cover (tensors; per channel when ``axis`` is set)."""

    def _not_fitted(self) -> NotFittedError:
        return NotFittedError(f"{type(self).__name__} has seen no data; run calibration batches through it first")

    def qparams(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise self._not_fitted()
        lo, hi = self.value_range()
        return qparams_from_range(lo, hi, scheme)

    def all_reduce_(self) -> None:
        """Replace this rank's statistics by those of every rank (see :func:`reduce_observers_`); each
        observer kind says how. Called on every rank, in the same order."""
        raise ConfigError(f"observer {self.name!r} cannot combine statistics across ranks; calibrate in one "
                          "process, or use minmax, moving-average, percentile, entropy or mse")

    def _reduce_count(self) -> None:
        from slimguard.train.distributed import all_reduce_

        self.count = int(all_reduce_(torch.tensor([self.count], dtype=torch.int64), "sum")[0])

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return x.min(), x.max()
        flat = x.transpose(0, self.axis % x.dim()).reshape(x.shape[self.axis], -1)
        return flat.min(1).values, flat.max(1).values

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


@dataclasses.dataclass
class MinMaxObserverConfig(ObserverConfig):
    """Options of :class:`MinMaxObserver`: ``axis`` (see :class:`ObserverConfig`)."""


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum (exact; sensitive to outliers).

    Options: :class:`MinMaxObserverConfig` (``axis``, default None: per tensor).
    """

    config_class = MinMaxObserverConfig
    config: MinMaxObserverConfig

    def __init__(self, config: ObserverConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise self._not_fitted()
        return self.lo, self.hi

    def _gather_range(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every rank's ``(lo, hi)`` padded for ranks that saw nothing (``+inf`` / ``-inf``), and whether this
        rank saw data; None when no rank did."""
        from slimguard.train.distributed import all_reduce_

        size = all_reduce_(torch.tensor([-1 if self.lo is None else self.lo.numel()], dtype=torch.int64), "max")
        if int(size[0]) < 0:
            return None
        shape = () if self.axis is None else (int(size[0]),)
        seen = torch.tensor(float(self.lo is not None))
        lo = self.lo.float().clone() if self.lo is not None else torch.full(shape, math.inf)
        hi = self.hi.float().clone() if self.hi is not None else torch.full(shape, -math.inf)
        return lo, hi, seen

    def all_reduce_(self) -> None:
        """The exact minimum and maximum over every rank's data (MIN / MAX all-reduce)."""
        from slimguard.train.distributed import all_reduce_

        gathered = self._gather_range()
        if gathered is None:
            return
        lo, hi, _ = gathered
        self.lo, self.hi = all_reduce_(lo, "min"), all_reduce_(hi, "max")
        self._reduce_count()


@dataclasses.dataclass
class MovingAverageObserverConfig(MinMaxObserverConfig):
    """Options of :class:`MovingAverageObserver` (besides ``axis``).

    Args:
        momentum: weight of the new batch in the moving average, in (0, 1] (default 0.1; 1 keeps only the
            last batch).
    """

    momentum: float = 0.1

    def validate(self) -> None:
        check_range("momentum", self.momentum, 0.0, 1.0, low_inclusive=False)


@register_observer("moving-average")
class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of per-batch min / max (``momentum`` weight on the new batch; QAT default).

    Options: :class:`MovingAverageObserverConfig` (``axis``, ``momentum`` default 0.1).
    """

    config_class = MovingAverageObserverConfig
    config: MovingAverageObserverConfig

    def __init__(self, config: ObserverConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.momentum = self.config.momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = (1 - m) * self.lo + m * lo
            self.hi = (1 - m) * self.hi + m * hi

    def all_reduce_(self) -> None:
        """The mean of the ranks' moving averages (over the ranks that saw data): an average of averages,
        close to, but not the same as, one process streaming every batch."""
        from slimguard.train.distributed import all_reduce_

        gathered = self._gather_range()
        if gathered is None:
            return
        lo, hi, seen = gathered
        ranks = all_reduce_(seen.clone(), "sum")
        self.lo = all_reduce_(lo.nan_to_num(0.0, 0.0, 0.0) * seen, "sum") / ranks
        self.hi = all_reduce_(hi.nan_to_num(0.0, 0.0, 0.0) * seen, "sum") / ranks
        self._reduce_count()


@dataclasses.dataclass
class HistogramObserverConfig(ObserverConfig):
    """Options of the histogram observers (per tensor only: ``axis`` must stay None).

    Args:
        bins: histogram bins, 2..65536 (default 2048).
    """

    bins: int = 2048

    def validate(self) -> None:
        if self.axis is not None:
            raise ConfigError(f"axis: {self.axis!r} is not allowed; histogram observers (percentile, entropy, mse) "
                              "are per tensor: leave axis unset, or use minmax per channel")
        check_range("bins", self.bins, 2, 1 << 16)


class HistogramObserver(Observer):
    """A streaming histogram of values (``bins`` over ``[lo, hi]``, widened and re-binned as needed);
    subclasses choose the clip range from it. Per tensor only.

    Options: :class:`HistogramObserverConfig` (``bins``, default 2048).
    """

    config_class = HistogramObserverConfig
    config: HistogramObserverConfig

    def __init__(self, config: ObserverConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.bins = self.config.bins
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.lo = self.hi = 0.0

    def update(self, x: torch.Tensor) -> None:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if self.count == 0 or lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            if new_hi - new_lo <= 0:
                new_hi = new_lo + 1e-8
            self._rebin(new_lo, new_hi)
        self.hist += torch.histc(x.double(), self.bins, self.lo, self.hi)

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        """Widen the range to ``[new_lo, new_hi]``, moving old counts to the bins of their bin centres."""
        if self.count and (new_lo, new_hi) != (self.lo, self.hi):
            width = (self.hi - self.lo) / self.bins
            centres = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
            idx = ((centres - new_lo) / (new_hi - new_lo) * self.bins).long().clamp(0, self.bins - 1)
            self.hist = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
        self.lo, self.hi = new_lo, new_hi

    def all_reduce_(self) -> None:
        """One histogram of every rank's data: each rank re-bins its counts to the common range (MIN of the
        lows, MAX of the highs), then the counts are summed."""
        from slimguard.train.distributed import all_reduce_

        seen = self.count > 0
        lo = all_reduce_(torch.tensor([self.lo if seen else math.inf], dtype=torch.float64), "min")
        hi = all_reduce_(torch.tensor([self.hi if seen else -math.inf], dtype=torch.float64), "max")
        if not math.isfinite(float(lo[0])):  # no rank saw data
            return
        if seen:
            self._rebin(float(lo[0]), float(hi[0]))
        else:
            self.lo, self.hi = float(lo[0]), float(hi[0])
        self.hist = all_reduce_(self.hist.clone(), "sum")
        self._reduce_count()

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.choose_range()
        return torch.tensor(lo), torch.tensor(hi)

    def choose_range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def _candidates(self, n: int = 64) -> list[tuple[float, float]]:
        """Clip ranges shrinking the observed range toward zero (keeping its asymmetry)."""
        return [(self.lo * f, self.hi * f) for f in torch.linspace(0.05, 1.0, n).tolist()]


@dataclasses.dataclass
class PercentileObserverConfig(HistogramObserverConfig):
    """Options of :class:`PercentileObserver` (besides ``bins``).

    Args:
        percentile: share of values kept inside the range on each side, in percent, in (50, 100]
            (default 99.99; 100 keeps the whole observed range).
    """

    percentile: float = 99.99

    def validate(self) -> None:
        super().validate()
        check_range("percentile", self.percentile, 50.0, 100.0, low_inclusive=False)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile`` of the value distribution on each side (default 99.99).

    Options: :class:`PercentileObserverConfig` (``percentile``, ``bins``).
    """

    config_class = PercentileObserverConfig
    config: PercentileObserverConfig

    def choose_range(self) -> tuple[float, float]:
        cdf = self.hist.cumsum(0) / self.hist.sum().clamp_min(1)
        edges = self._edges()
        tail = 1 - self.config.percentile / 100
        lo_i = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_i = int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=torch.float64)))
        lo = float(edges[lo_i]) if self.lo < 0 else 0.0
        return min(lo, 0.0), max(float(edges[min(hi_i + 1, self.bins)]), 0.0)


@dataclasses.dataclass
class MSEObserverConfig(HistogramObserverConfig):
    """Options of :class:`MSEObserver` (besides ``bins``).

    Args:
        scheme: the :class:`QScheme` whose error is minimised; None means 8-bit asymmetric, the scheme of
            activations (default None).
    """

    scheme: QScheme | None = None

    def validate(self) -> None:
        super().validate()
        if self.scheme is not None and not isinstance(self.scheme, QScheme):
            raise ConfigError(f"scheme: expected a QScheme (e.g. QScheme(bits=8, symmetric=False)) or None, "
                              f"got {self.scheme!r}")


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """Clip range minimising the expected squared quantization error over the histogram.

    Options: :class:`MSEObserverConfig` (``scheme``, ``bins``).
    """

    config_class = MSEObserverConfig
    config: MSEObserverConfig

    def __init__(self, config: ObserverConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.scheme = self.config.scheme or QScheme(8, symmetric=False)

    def _err(self, lo: float, hi: float) -> float:
        centres = (self._edges()[:-1] + self._edges()[1:]) / 2
        s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), self.scheme)
        q = torch.clamp(torch.round(centres / s.double()) + z, self.scheme.qmin, self.scheme.qmax)
        return float((((q - z) * s.double() - centres) ** 2 * self.hist).sum())

    def choose_range(self) -> tuple[float, float]:
        return min(self._candidates(), key=lambda r: self._err(*r))


@dataclasses.dataclass
class EntropyObserverConfig(HistogramObserverConfig):
    """Options of :class:`EntropyObserver`: ``bins`` (see :class:`HistogramObserverConfig`)."""


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """Clip range minimising KL divergence between the clipped histogram and its 8-bit quantization
    (Migacz, "8-bit Inference with TensorRT", GTC 2017).

    Options: :class:`EntropyObserverConfig` (``bins``).
    """

    config_class = EntropyObserverConfig

    def _kl(self, lo: float, hi: float, levels: int = 255) -> float:
        edges = self._edges()
        inside = (edges[:-1] >= lo) & (edges[1:] <= hi)
        raw = self.hist[inside].clone()
        if raw.numel() < levels or raw.sum() == 0:
            return float("inf")
        p = raw.clone()  # reference: clipped outliers folded into the edge bins
        first, last = int(inside.nonzero()[0]), int(inside.nonzero()[-1])
        p[0] += self.hist[:first].sum()
        p[-1] += self.hist[last + 1:].sum()
        # candidate: the in-range histogram merged into `levels` bins, spread over its non-empty bins
        n = raw.numel()
        idx = torch.arange(n) * levels // n
        sums = torch.zeros(levels, dtype=raw.dtype).index_add_(0, idx, raw)
        nonzero = torch.zeros(levels, dtype=raw.dtype).index_add_(0, idx, (raw > 0).to(raw.dtype))
        q = torch.where(raw > 0, sums[idx] / nonzero[idx].clamp_min(1), torch.zeros_like(raw))
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        return float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())

    def choose_range(self) -> tuple[float, float]:
        return min(self._candidates(), key=lambda r: self._kl(*r))


def reduce_observers_(model: Any) -> int:
    """Give every rank's observers in ``model`` (attributes of its modules, such as the fake-quant layers'
    ``obs_in`` / ``obs_out``) the statistics of all ranks' data; returns how many were reduced.

    Call it on every rank after each has calibrated on its own shard; outside a distributed run it returns
    0 and changes nothing.
    """
    from slimguard.train.distributed import world_size

    if world_size() == 1:
        return 0
    found = [obs for m in model.modules() for obs in vars(m).values() if isinstance(obs, Observer)]
    for obs in found:
        obs.all_reduce_()
    return len(found)
