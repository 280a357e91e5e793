"""Importance scores: small objects with one job, saying how much each weight or channel matters.

Every importance answers two questions about one module:

* :meth:`Importance.score` -> a tensor shaped like ``module.weight`` (unstructured pruning ranks these);
* :meth:`Importance.channel_score` -> one value per slice along ``dim`` (structured pruning sums these
  over every module a channel touches), or ``None`` when the module has nothing to say.

Built-in importances, by name (``importance: l1`` in a recipe):

| name     | class                  | idea                                                               |
|----------|------------------------|--------------------------------------------------------------------|
| ``l1``   | ``MagnitudeImportance(p=1)`` | absolute weight (Han et al. 2015; L1 filter norm, Li et al. 2017) |
| ``l2``   | ``MagnitudeImportance(p=2)`` | squared weight / L2 filter norm                              |
| ``taylor`` | ``TaylorImportance``   | first-order Taylor ``|w * dL/dw|`` (Molchanov et al. 2017/2019)    |
| ``bn``   | ``BNScaleImportance``  | ``|gamma|`` of the BatchNorm after a channel (network slimming, Liu et al. 2017) |
| ``random`` | ``RandomImportance`` | seeded random scores, the control                                   |
| ``wanda``  | ``ActivationImportance`` | ``|w_ij| * ||x_j||``: weight times input activation norm (Sun et al. 2024) |

``bn`` has nothing to say about single weights (a BatchNorm scale belongs to a whole channel), so unstructured
and N:M pruning refuse it (:func:`check_weight_importance`) rather than quietly ranking by ``l1``.

Example:
    >>> imp = sg.TaylorImportance()
    >>> imp.prepare(model, batches)          # accumulates gradients over a few batches
    >>> sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8, importance="taylor"), data=data)
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_choice, check_range
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import eval_mode, forward
from slimguard.train.loop import LossFn

ImportanceFactory = Callable[..., "Importance"]
IMPORTANCES: Registry[ImportanceFactory] = Registry("importance")


def register_importance(name: str) -> Callable[[ImportanceFactory], ImportanceFactory]:
    """Make an importance factory (a class, or a function of its options) known under ``name``; a
    second registration is refused."""
    return IMPORTANCES.register(name)


def importance_names() -> list[str]:
    return IMPORTANCES.names()


def weight_importance_names() -> list[str]:
    """The importances that rank single weights (unstructured and N:M pruning): those whose objects say
    :attr:`Importance.per_weight`; ``bn`` scores only channels."""
    return [n for n in IMPORTANCES.names() if IMPORTANCES.get(n)().per_weight]


def check_weight_importance(name: str) -> None:
    """ConfigError unless ``name`` is an importance that ranks single weights, naming the allowed ones."""
    if name not in weight_importance_names():
        raise _not_for_weights(name)


def _not_for_weights(name: str) -> ConfigError:
    known = name in IMPORTANCES.names()
    why = " for single weights (it scores whole channels: use it with channel pruning)" if known else ""
    return ConfigError(f"importance: {name!r} is not allowed{why}; allowed: {', '.join(weight_importance_names())}")


def get_importance(name: str | Importance, **options: Any) -> Importance:
    """An importance object from its name (``l1``, ``l2``, ``taylor``, ``bn``, ``random``, ``wanda``) and
    its config's options (``get_importance("taylor", max_batches=4)``); an object passes through."""
    if isinstance(name, Importance):
        if options:
            raise ConfigError(f"importance: options ({', '.join(options)}) go with a name, not an object")
        return name
    return IMPORTANCES.get(name)(**options)


def _reduce(t: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dims) if dims else t


@dataclasses.dataclass
class ImportanceConfig(Config):
    """Options of an importance; the base has none (``bn`` needs none), subclasses add theirs."""


class Importance(abc.ABC):
    """Base: override :meth:`score` (per weight); :meth:`channel_score` sums it over a slice by default.

    An importance takes its config (``config_class``), or the config's options as keywords:
    ``TaylorImportance(max_batches=4)`` is ``TaylorImportance(TaylorImportanceConfig(max_batches=4))``.
    ``needs_data`` importances are given batches through :meth:`prepare` before scoring. ``per_weight``
    importances rank single weights (unstructured, N:M pruning); the others only score channels.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    per_weight: ClassVar[bool] = True
    config_class: ClassVar[type[ImportanceConfig]] = ImportanceConfig

    def __init__(self, config: ImportanceConfig | None = None, **options: Any) -> None:
        self.config = self.config_class.build(config, options, where=type(self).__name__)

    def prepare(self, model: nn.Module, batches: Iterable[tuple[Any, Any]],  # noqa: B027 (optional hook)
                loss_fn: LossFn | None = None) -> None:
        """Collect what the score needs from data (default: nothing)."""

    @abc.abstractmethod
    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        """One score per entry of ``module.<name>`` (same shape); higher means keep."""

    def channel_score(self, module: nn.Module, dim: int, name: str = "weight") -> torch.Tensor | None:
        """One score per index of ``dim`` of ``module.<name>`` (``None``: nothing to say)."""
        w = getattr(module, name, None)
        if not torch.is_tensor(w):
            return None
        return _reduce(self.score(module, name), dim)


@dataclasses.dataclass
class MagnitudeImportanceConfig(ImportanceConfig):
    """Args:
    p: the power of ``|w|``: 1 (L1) or 2 (squared L2) (default 1).
    """

    p: int = 1

    def validate(self) -> None:
        check_choice("p", self.p, (1, 2))


class MagnitudeImportance(Importance):
    """``|w|^p`` per weight; per channel the sum, i.e. the L1 (p=1) or squared L2 (p=2) norm.

    Options: :class:`MagnitudeImportanceConfig` (``p``, default 1).
    """

    name = "l1"
    config_class = MagnitudeImportanceConfig
    config: MagnitudeImportanceConfig

    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        return getattr(module, name).detach().abs().pow(self.config.p).float()


@dataclasses.dataclass
class DataImportanceConfig(ImportanceConfig):
    """Args:
    max_batches: batches :meth:`DataImportance.prepare` runs, >= 1 (default 8).
    """

    max_batches: int = 8

    def validate(self) -> None:
        check_range("max_batches", self.max_batches, 1)


class DataImportance(Importance):
    """An importance learned from data (``needs_data``): :meth:`prepare` runs at most ``max_batches``
    batches (:meth:`first_batches`) and keeps a statistic per weight tensor in :attr:`stats`, keyed by the
    tensor's ``id``."""

    needs_data = True
    config_class: ClassVar[type[ImportanceConfig]] = DataImportanceConfig
    config: DataImportanceConfig

    def __init__(self, config: DataImportanceConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.stats: dict[int, torch.Tensor] = {}

    def first_batches(self, batches: Iterable[tuple[Any, Any]], *, shard: bool = False) -> Iterator[tuple[Any, Any]]:
        """The first ``config.max_batches`` of ``batches``; with ``shard`` in a data-parallel run, only this
        rank's share of them (every ``world_size``-th from its rank): the importance must then sum its
        statistics across ranks (:meth:`reduce_stats`)."""
        from slimguard.train.distributed import rank, world_size

        first = itertools.islice(batches, self.config.max_batches)
        if not shard or world_size() == 1:
            return first
        here, world = rank(), world_size()
        return (b for i, b in enumerate(first) if i % world == here)

    def reduce_stats(self, keys: list[tuple[int, tuple[int, ...]]]) -> None:
        """Sum :attr:`stats` over the ranks (``keys``: every possible ``(key, shape)``, in the same order on
        every rank), keeping the keys some rank filled; nothing outside a data-parallel run."""
        from slimguard.train.distributed import all_reduce_, all_reduce_stats_, world_size

        if world_size() == 1:
            return
        present = all_reduce_(torch.tensor([float(k in self.stats) for k, _ in keys]), "max").tolist()
        all_reduce_stats_(self.stats, keys, "sum")
        self.stats = {k: self.stats[k] for (k, _), p in zip(keys, present, strict=True) if p}


@dataclasses.dataclass
class TaylorImportanceConfig(DataImportanceConfig):
    """Options of :class:`TaylorImportance`: ``max_batches``, the batches gradients are summed over."""


class TaylorImportance(DataImportance):
    """First-order Taylor importance ``|w * g|`` with ``g`` the gradient of the loss summed over batches.

    Paper: Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
    Without :meth:`prepare` it uses the gradients already in ``.grad`` (e.g. after a backward pass).

    Options: :class:`TaylorImportanceConfig` (``max_batches``, default 8).
    """

    name = "taylor"
    config_class = TaylorImportanceConfig

    def prepare(self, model: nn.Module, batches: Iterable[tuple[Any, Any]], loss_fn: LossFn | None = None) -> None:
        grads: dict[int, torch.Tensor] = {}
        params = [p for p in model.parameters() if p.is_floating_point()]
        with eval_mode(model, requires_grad=True):  # gradients of the weights, whatever their flags say
            for x, y in self.first_batches(batches, shard=True):
                if loss_fn is None:
                    if y is None:
                        raise DataError("taylor importance needs labelled data (or a loss_fn); use l1 instead")
                    loss = F.cross_entropy(model(x), y)
                else:
                    loss = loss_fn(model, x, y)
                g = torch.autograd.grad(loss, params, allow_unused=True)
                for p, gp in zip(params, g, strict=True):
                    if gp is not None:
                        grads[id(p)] = grads.get(id(p), 0) + gp.detach()
        self.stats = grads
        self.reduce_stats([(id(p), tuple(p.shape)) for p in params])  # gradient sums over every rank's batches

    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        w = getattr(module, name)
        g = self.stats.get(id(w))
        if g is None:
            g = w.grad
        if g is None:
            raise DataError("taylor importance has no gradients; call prepare(model, batches) or pass data")
        return (w.detach() * g.to(w.device)).abs().float()  # sums kept where prepared; w may train elsewhere

    def channel_score(self, module: nn.Module, dim: int, name: str = "weight") -> torch.Tensor | None:
        w = getattr(module, name, None)
        if not torch.is_tensor(w):
            return None
        if id(w) not in self.stats and w.grad is None:
            return None
        return _reduce(self.score(module, name), dim)


class BNScaleImportance(Importance):
    """Channel importance ``|gamma|`` from normalisation layers (network slimming).

    Paper: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.
    Only BatchNorm/LayerNorm scales count for channels; a group with none falls back to L1 magnitude.
    It scores channels only: a single weight has no scale of its own, so :meth:`score` is a ConfigError.
    """

    name = "bn"
    per_weight = False
    _NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)

    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        raise _not_for_weights(self.name)

    def channel_score(self, module: nn.Module, dim: int, name: str = "weight") -> torch.Tensor | None:
        if isinstance(module, self._NORMS) and torch.is_tensor(getattr(module, "weight", None)):
            return module.weight.detach().abs().float()
        return None


@dataclasses.dataclass
class RandomImportanceConfig(ImportanceConfig):
    """Args:
    seed: seed of the score generator, >= 0 (default 0).
    """

    seed: int = 0

    def validate(self) -> None:
        check_range("seed", self.seed, 0)


class RandomImportance(Importance):
    """Seeded random scores: the control every importance should beat.

    Options: :class:`RandomImportanceConfig` (``seed``, default 0).
    """

    name = "random"
    config_class = RandomImportanceConfig
    config: RandomImportanceConfig

    def __init__(self, config: RandomImportanceConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.gen = torch.Generator().manual_seed(self.config.seed)

    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        w = getattr(module, name)
        return torch.rand(w.shape, generator=self.gen)

    def channel_score(self, module: nn.Module, dim: int, name: str = "weight") -> torch.Tensor | None:
        w = getattr(module, name, None)
        if not torch.is_tensor(w):
            return None
        return torch.rand(w.shape[dim], generator=self.gen)


def run_batch(model: nn.Module, x: Any) -> Any:
    """Call ``model`` on a batch: tensors positionally, dicts as keywords, text through its tokenizer."""
    tokenize = getattr(model, "tokenize", None)
    if isinstance(x, list) and callable(tokenize):
        x = tokenize(x)
    return forward(model, x)


@dataclasses.dataclass
class ActivationImportanceConfig(DataImportanceConfig):
    """Options of :class:`ActivationImportance`: ``max_batches``, the calibration batches it runs."""


class ActivationImportance(DataImportance):
    """Weight magnitude times the L2 norm of the input feature it multiplies, over calibration data.

    Per weight ``|w_ij| * ||x_j||``; per output channel the row sum; per input channel the column sum,
    i.e. how much signal actually flows through it. Needs only forward passes (no labels), so it suits
    embedding models and transformer heads / FFN neurons.

    Paper: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda),
    ICLR 2024.

    Options: :class:`ActivationImportanceConfig` (``max_batches``, default 8).
    """

    name = "wanda"
    config_class = ActivationImportanceConfig

    def prepare(self, model: nn.Module, batches: Iterable[tuple[Any, Any]], loss_fn: LossFn | None = None) -> None:
        sq: dict[int, torch.Tensor] = {}
        hooks = []

        def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0].detach().float()
            if isinstance(mod, nn.Linear):
                v = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups == 1:
                v = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1)
            else:
                return
            sq[id(mod.weight)] = sq.get(id(mod.weight), 0) + v

        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                hooks.append(mod.register_forward_hook(hook))
        try:
            with eval_mode(model), torch.no_grad():
                for x, _ in self.first_batches(batches, shard=True):
                    run_batch(model, x)
        finally:
            for h in hooks:
                h.remove()
        self.stats = sq
        self.reduce_stats([(id(h.weight), (h.weight.shape[1],)) for h in model.modules()  # squared norms: summed
                           if isinstance(h, nn.Linear) or (isinstance(h, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                                                            and h.groups == 1)])
        self.stats = {k: v.sqrt() for k, v in self.stats.items()}

    def score(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        w = getattr(module, name).detach().abs().float()
        norm = self.stats.get(id(getattr(module, name)))
        if norm is None:
            return w
        norm = norm.to(w.device)  # statistics kept where prepared; w may train elsewhere
        shape = [1] * w.dim()
        shape[1] = -1
        if w.dim() > 2:  # conv: (out, in, k...) -> the input norm applies along dim 1
            return w * norm.reshape(shape)
        return w * norm.reshape(1, -1)


IMPORTANCES.register("l1", functools.partial(MagnitudeImportance, p=1))
IMPORTANCES.register("l2", functools.partial(MagnitudeImportance, p=2))
IMPORTANCES.register("taylor", TaylorImportance)
IMPORTANCES.register("bn", BNScaleImportance)
IMPORTANCES.register("random", RandomImportance)
IMPORTANCES.register("wanda", ActivationImportance)


def prepare_importance(imp: Importance, model: nn.Module, context: dict[str, Any],
                       batch_size: int = 64) -> None:
    """Give a data-hungry importance batches from ``context['data']`` (calib, else train split)."""
    if not imp.needs_data:
        return
    data = context.get("data")
    if data is None:
        raise DataError(f"importance {imp.name!r} needs data; pass data=... (or use l1)")
    split = data.calib if getattr(data, "calib", None) is not None and len(data.calib) else data.train
    imp.prepare(model, split.batches(batch_size))
