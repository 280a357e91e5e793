"""Per-layer-type rules of structured pruning: how each layer type carries, couples and loses channels.

One small rule object per layer type (the idea of Torch-Pruning's per-layer pruners; Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023) serves both halves of structured pruning:

* the dependency graph (:class:`~slimguard.prune.graph.DependencyGraph`) asks the rule of every leaf
  module how channel labels flow through one call of it (:meth:`LayerRule.trace`): a Conv or Linear
  opens a new space of output channels, a BatchNorm keeps the labels and holds one slice per channel, a
  grouped convolution or a GroupNorm couples whole groups, an activation passes the labels on;
* the shrinking (:func:`~slimguard.prune.structured.prune_channels`) asks the same rule for channel
  scores (:meth:`LayerRule.score`), sizes (:meth:`LayerRule.size`) and the cut (:meth:`LayerRule.prune`).

Rules are found by module type, walking the type's MRO (a ``torch.nn`` subclass of ``nn.Conv2d`` gets the
conv rule), or by a predicate for families recognised by structure rather than class (Hugging Face
BERT-family layers, :mod:`slimguard.prune.blocks`). A leaf module whose type has no rule is refused by name
when it receives prunable channels, with the way out (``ignore=[...]``). A new layer type plugs in with
:func:`register_rule`, without editing anything else:

    >>> class Dense(nn.Module):                   # weight (in, out); forward: x @ weight + bias
    ...     ...
    >>> class DenseRule(ChannelRule):
    ...     channels_last = True                  # channels on the last dim, like nn.Linear
    ...     weight_dims = {"out": 1, "in": 0}     # where scores read a channel in ``weight``
    ...     def in_channels(self, m): return m.weight.shape[0]
    ...     def out_channels(self, m): return m.weight.shape[1]
    ...     def prune_out(self, m, keep):
    ...         keep_slices(m, ("weight",), 1, keep)
    ...         keep_slices(m, ("bias",), 0, keep)
    ...     def prune_in(self, m, keep): keep_slices(m, ("weight",), 0, keep)
    >>> register_rule(Dense)(DenseRule())

Roles: a rule records the channel positions it holds under a role: ``out`` (output channels, weight
rows of a Linear/Conv), ``in`` (input channels, weight columns), ``gin`` (input channels of a grouped
convolution: they go with whole groups) or ``feat`` (a per-channel layer such as a norm, whose input and
output channel are one).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar, cast

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.core.registry import Registry
from slimguard.models.layers import Normalize
from slimguard.prune.surgery import keep_slices

if TYPE_CHECKING:
    from slimguard.prune.importance import Importance


@dataclasses.dataclass
class Labels:
    """Channel labels of one tensor: channel ``c`` along ``dim`` is union-find element ``ids[c]``.

    Attributes:
        ids: one element id per channel.
        dim: the channel dimension of the tensor.
        rank: the tensor's number of dimensions.
    """

    ids: list[int]
    dim: int
    rank: int


ModuleT = TypeVar("ModuleT", bound=nn.Module)  # the module type a rule handles (its registration keys say so)


@dataclasses.dataclass
class Call(Generic[ModuleT]):
    """One call of a leaf module in the traced graph, as its rule sees it.

    Attributes:
        name: qualified name of the module (what error messages and ``ignore`` use).
        module: the module.
        inputs: labels of every tensor argument (``None``: carries no prunable channels).
        in_shape: shape of the first argument (``None``: not a tensor).
        out_shape: shape of the output (``None``: not a tensor).
    """

    name: str
    module: ModuleT
    inputs: list[Labels | None]
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None

    @property
    def x(self) -> Labels | None:
        """Labels of the first tensor argument."""
        return self.inputs[0] if self.inputs else None


class LabelGraph(Protocol):
    """What a rule may do to the dependency graph while tracing one call."""

    def new(self, n: int) -> list[int]:
        """A new space of ``n`` prunable channels (e.g. the outputs of a Conv)."""

    def unite(self, ids: Sequence[int]) -> None:
        """Couple channels: all of ``ids`` are pruned together or not at all."""

    def fix(self, labels: Labels | None) -> None:
        """Mark every channel of ``labels`` as never pruned."""

    def input_ids(self, labels: Labels | None, n: int, dim: int, rank: int) -> list[int]:
        """The ``n`` input channel labels of a layer that reads channels on ``dim``: ``labels.ids`` when
        they fit, else a fixed space of ``n`` (and ``labels`` fixed when only their count differs)."""

    def record(self, module: str, role: str, ids: list[int]) -> None:
        """Module ``module`` holds channel ``ids[p]`` at position ``p`` of its ``role``."""

    def refuse(self, where: str, what: str, labels: Sequence[Labels | None]) -> None:
        """``what`` in module ``where`` cannot be followed: an error if any of ``labels`` is prunable."""


class LayerRule(abc.ABC, Generic[ModuleT]):
    """How one layer type takes part in structured pruning.

    Subclasses implement :meth:`trace`; a rule that records channel positions (:meth:`LabelGraph.record`)
    also implements :meth:`size` and :meth:`prune` for the roles it records. ``LayerRule[M]`` handles
    modules of type ``M`` (``LinearRule`` is a ``ChannelRule[nn.Linear]``); the keys it is registered
    under promise that type.

    Attributes:
        weight_dims: role -> dimension of ``module.weight`` that indexes the channels of that role, for
            :meth:`score` (default: rows for ``out`` and ``feat``, columns for ``in``).
    """

    weight_dims: ClassVar[Mapping[str, int]] = {"out": 0, "in": 1, "feat": 0}

    @abc.abstractmethod
    def trace(self, graph: LabelGraph, call: Call[ModuleT]) -> Labels | None:
        """Propagate labels through one call: record what the module holds, return the output's labels
        (``None``: the output carries no prunable channels)."""

    def size(self, module: ModuleT, role: str) -> int:
        """How many channels ``module`` has in ``role``."""
        raise TypeError(f"{type(self).__name__} records no {role!r} channels")

    def prune(self, module: ModuleT, keep: Mapping[str, torch.Tensor], name: str) -> None:
        """Shrink ``module`` in place to the positions ``keep[role]`` (sorted indices) of each role."""
        raise TypeError(f"{type(self).__name__} records no channels to cut (module {name!r})")

    def score(self, module: ModuleT, role: str, importance: Importance) -> torch.Tensor | None:
        """One score per channel of ``role`` (``None``: this module has nothing to say)."""
        dim = self.weight_dims.get(role)
        if dim is None or not torch.is_tensor(getattr(module, "weight", None)):
            return None
        return importance.channel_score(module, dim)


RuleKey = type[nn.Module] | Callable[[nn.Module], bool]
RULES: Registry[LayerRule] = Registry("pruning rule")
"""Module type or predicate -> the :class:`LayerRule` that traces and shrinks matching modules."""


def register_rule(*keys: RuleKey) -> Callable[[LayerRule], LayerRule]:
    """Use ``rule`` for modules of each key: a module type (its subclasses too) or a predicate.

    A module whose own type is registered (or that matches a predicate) is one leaf when the graph
    traces a model; ``torch.nn`` modules are leaves anyway. A subclass defined elsewhere of a registered
    type is traced through (its ``forward`` may differ) unless its own type is registered too. Raises
    ValueError, registering nothing, when a key already has a rule.

    Example:
        >>> register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)(ConvRule())
    """

    def deco(rule: LayerRule) -> LayerRule:
        for key in keys:
            if key in RULES:
                raise ValueError(f"a pruning rule for {getattr(key, '__qualname__', key)} is already registered")
        for key in keys:
            RULES.register(cast(Hashable, key), rule)  # classes hash; mypy reads type[Module] as unhashable
        return rule

    return deco


def rule_for(module: nn.Module, *, inherited: bool = True) -> LayerRule | None:
    """The rule for ``module``: its type's, else the nearest base class's (``inherited``), else the first
    matching predicate's; ``None`` when no rule applies."""
    own = type(module)
    found = RULES.for_type(own) if inherited or own in RULES else None  # the MRO starts with ``own``
    if found is not None:
        return found
    for key, rule in RULES.items():
        if not isinstance(key, type) and callable(key) and key(module):
            return rule
    return None


# ---- layers with weights: Conv, Linear --------------------------------------------------------------
class ChannelRule(LayerRule[ModuleT]):
    """A layer whose weight maps input channels to a new space of output channels (Conv, Linear).

    Implement the channel counts and the two cuts; :attr:`channels_last` says where the channels sit.
    :meth:`groups` > 1 couples each group's inputs with its outputs (grouped/depthwise convolution): whole
    groups go, recorded under role ``gin``.

    Attributes:
        channels_last: channels on the last dimension (Linear) instead of dimension 1 (Conv).
    """

    channels_last: ClassVar[bool] = False

    @abc.abstractmethod
    def in_channels(self, module: ModuleT) -> int:
        """Number of input channels."""

    @abc.abstractmethod
    def out_channels(self, module: ModuleT) -> int:
        """Number of output channels."""

    @abc.abstractmethod
    def prune_out(self, module: ModuleT, keep: torch.Tensor) -> None:
        """Keep only output channels ``keep`` (weights, bias and the size attribute)."""

    @abc.abstractmethod
    def prune_in(self, module: ModuleT, keep: torch.Tensor) -> None:
        """Keep only input channels ``keep`` (weights and the size attribute)."""

    def groups(self, module: ModuleT) -> int:
        """Channel groups (1: every output sees every input)."""
        return 1

    def trace(self, graph: LabelGraph, call: Call[ModuleT]) -> Labels | None:
        m, x = call.module, call.x
        if call.in_shape is None or call.out_shape is None:
            graph.refuse(call.name, f"a {type(m).__name__}", call.inputs)
            return None
        rank, out_rank = len(call.in_shape), len(call.out_shape)
        dim = rank - 1 if self.channels_last else 1
        if x is not None and x.dim != dim:  # labels on a dimension the layer mixes: keep them whole
            graph.fix(x)
            x = None
        in_ids = graph.input_ids(x, self.in_channels(m), dim, rank)
        out_ids = graph.new(self.out_channels(m))
        groups = self.groups(m)
        if groups == 1:
            graph.record(call.name, "in", in_ids)
        else:
            bi, bo = len(in_ids) // groups, len(out_ids) // groups
            for j in range(groups):
                graph.unite([*in_ids[j * bi : (j + 1) * bi], *out_ids[j * bo : (j + 1) * bo]])
            graph.record(call.name, "gin", in_ids)
        graph.record(call.name, "out", out_ids)
        return Labels(out_ids, out_rank - 1 if self.channels_last else 1, out_rank)

    def size(self, module: ModuleT, role: str) -> int:
        if role == "out":
            return self.out_channels(module)
        if role in ("in", "gin"):
            return self.in_channels(module)
        return super().size(module, role)

    def prune(self, module: ModuleT, keep: Mapping[str, torch.Tensor], name: str) -> None:
        if "gin" in keep:
            raise TypeError(f"{type(self).__name__} has channel groups but no cut for them (module {name!r})")
        if "out" in keep:
            self.prune_out(module, keep["out"])
        if "in" in keep:
            self.prune_in(module, keep["in"])


class _WeightOutInRule(ChannelRule[ModuleT]):
    """A :class:`ChannelRule` for torch's own layers: weight ``(out, in, ...)``, bias ``(out,)``, and the
    channel counts kept in the module attributes named by :attr:`in_attr` and :attr:`out_attr`.

    A cut slices the weight (dimension 0 for outputs, with the bias; dimension 1 for inputs) and sets the
    attribute to the number of channels kept.
    """

    in_attr: ClassVar[str]
    out_attr: ClassVar[str]

    def in_channels(self, module: ModuleT) -> int:
        return int(getattr(module, self.in_attr))

    def out_channels(self, module: ModuleT) -> int:
        return int(getattr(module, self.out_attr))

    def prune_out(self, module: ModuleT, keep: torch.Tensor) -> None:
        setattr(module, self.out_attr, keep_slices(module, ("weight", "bias"), 0, keep))

    def prune_in(self, module: ModuleT, keep: torch.Tensor) -> None:
        setattr(module, self.in_attr, keep_slices(module, ("weight",), 1, keep))


ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d  # the modules ConvRule handles


class ConvRule(_WeightOutInRule[ConvNd]):
    """``nn.Conv1d/2d/3d``, including grouped and depthwise convolutions (weight ``(out, in/groups, k...)``)."""

    in_attr, out_attr = "in_channels", "out_channels"

    def groups(self, module: ConvNd) -> int:
        return int(module.groups)

    def prune(self, module: ConvNd, keep: Mapping[str, torch.Tensor], name: str) -> None:
        bo, bi = module.out_channels // module.groups, module.in_channels // module.groups
        super().prune(module, {role: k for role, k in keep.items() if role != "gin"}, name)
        if "gin" in keep:  # whole groups went: the weight keeps its per-group input width
            module.in_channels = len(keep["gin"])
            module.groups = module.in_channels // bi
            if module.out_channels != module.groups * bo or module.in_channels != module.groups * bi:
                raise ConfigError(f"grouped convolution {name!r} lost a partial group; add ignore=[{name!r}]")


class LinearRule(_WeightOutInRule[nn.Linear]):
    """``nn.Linear`` (weight ``(out, in)``; channels on the last dimension)."""

    channels_last = True
    in_attr, out_attr = "in_features", "out_features"


LINEAR = LinearRule()
register_rule(nn.Linear)(LINEAR)
register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)(ConvRule())


# ---- per-channel layers: norms ------------------------------------------------------------------------
class ChannelwiseRule(LayerRule[ModuleT]):
    """A layer with one slice per channel whose input and output channel are one (role ``feat``).

    The labels pass through; the layer records them when they sit on its channel dimension and their
    count fits, and otherwise keeps them whole (it mixes those channels). It records even without
    parameters, so its size attribute follows the cut.
    """

    @abc.abstractmethod
    def channels(self, module: ModuleT) -> int:
        """Number of channels."""

    @abc.abstractmethod
    def channel_dim(self, module: ModuleT, rank: int) -> int | None:
        """The dimension the layer keeps per channel, for an input of ``rank`` (``None``: none)."""

    @abc.abstractmethod
    def prune_channels(self, module: ModuleT, keep: torch.Tensor) -> None:
        """Keep only channels ``keep`` (parameters, buffers and size attributes)."""

    def untouched(self, module: ModuleT, labels: Labels) -> bool:
        """The layer does not look across this dimension: labels pass without being recorded."""
        return False

    def couple(self, graph: LabelGraph, module: ModuleT, ids: list[int]) -> None:
        """Unite channels that must go together (default: none)."""

    def trace(self, graph: LabelGraph, call: Call[ModuleT]) -> Labels | None:
        m, x = call.module, call.x
        if x is None or self.untouched(m, x):
            return x
        if x.dim != self.channel_dim(m, x.rank) or len(x.ids) != self.channels(m):
            graph.fix(x)
            return x
        self.couple(graph, m, x.ids)
        graph.record(call.name, "feat", x.ids)
        return x

    def size(self, module: ModuleT, role: str) -> int:
        if role == "feat":
            return self.channels(module)
        return super().size(module, role)

    def prune(self, module: ModuleT, keep: Mapping[str, torch.Tensor], name: str) -> None:
        if "feat" in keep:
            self.prune_channels(module, keep["feat"])


BatchNormNd = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d  # the modules BatchNormRule handles


class BatchNormRule(ChannelwiseRule[BatchNormNd]):
    """``nn.BatchNorm1d/2d/3d``: per-channel statistics and affine on dimension 1."""

    def channels(self, module: BatchNormNd) -> int:
        return int(module.num_features)

    def channel_dim(self, module: BatchNormNd, rank: int) -> int | None:
        return 1

    def prune_channels(self, module: BatchNormNd, keep: torch.Tensor) -> None:
        module.num_features = keep_slices(module, ("weight", "bias", "running_mean", "running_var"), 0, keep)


class LayerNormRule(ChannelwiseRule[nn.LayerNorm]):
    """``nn.LayerNorm`` over the last dimension; a channel dimension it does not normalise passes freely.

    Normalised over several trailing dimensions, it keeps channels on them whole.
    """

    def channels(self, module: nn.LayerNorm) -> int:
        return int(module.normalized_shape[-1])

    def channel_dim(self, module: nn.LayerNorm, rank: int) -> int | None:
        return rank - 1 if len(module.normalized_shape) == 1 else None

    def untouched(self, module: nn.LayerNorm, labels: Labels) -> bool:
        return labels.dim < labels.rank - len(module.normalized_shape)

    def prune_channels(self, module: nn.LayerNorm, keep: torch.Tensor) -> None:
        module.normalized_shape = (keep_slices(module, ("weight", "bias"), 0, keep),)


class GroupNormRule(ChannelwiseRule[nn.GroupNorm]):
    """``nn.GroupNorm``: channels are normalised in ``num_groups`` groups, so whole groups go.

    Each group's channels are united; the cut keeps whole groups and updates ``num_channels`` and
    ``num_groups`` (the channels per group stay).
    """

    def channels(self, module: nn.GroupNorm) -> int:
        return int(module.num_channels)

    def channel_dim(self, module: nn.GroupNorm, rank: int) -> int | None:
        return 1

    def couple(self, graph: LabelGraph, module: nn.GroupNorm, ids: list[int]) -> None:
        per = module.num_channels // module.num_groups
        for j in range(module.num_groups):
            graph.unite(ids[j * per : (j + 1) * per])

    def prune_channels(self, module: nn.GroupNorm, keep: torch.Tensor) -> None:
        per = module.num_channels // module.num_groups
        whole = len(keep) % per == 0
        if whole:
            rows = keep.reshape(-1, per)
            whole = bool((rows == rows[:, :1] + torch.arange(per)).all() and (rows[:, 0] % per == 0).all())
        if not whole:
            raise ConfigError(f"a GroupNorm would lose part of a channel group ({per} channels each); "
                              "ignore=[...] the module that splits its groups")
        module.num_channels = keep_slices(module, ("weight", "bias"), 0, keep)
        module.num_groups = module.num_channels // per


register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(BatchNormRule())
register_rule(nn.LayerNorm)(LayerNormRule())
register_rule(nn.GroupNorm)(GroupNormRule())


# ---- layers that pass channels on ---------------------------------------------------------------------
class PassRule(LayerRule[nn.Module]):
    """Elementwise and per-channel layers that keep the tensor's rank: labels pass unchanged
    (activations, dropout, pooling)."""

    def trace(self, graph: LabelGraph, call: Call[nn.Module]) -> Labels | None:
        x, shape = call.x, call.out_shape
        if x is not None and shape is not None and len(shape) == x.rank:
            return x
        graph.refuse(call.name, f"a {type(call.module).__name__}", call.inputs)
        return None


register_rule(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)(PassRule())


def flatten_labels(graph: LabelGraph, x: Labels | None, shape: tuple[int, ...] | None, start: int, end: int,
                   where: str, inputs: Sequence[Labels | None]) -> Labels | None:
    """Labels after flattening dims ``start..end`` of a tensor of ``shape``: a channel dimension outside
    them moves; the channel dimension starting them repeats each label over the flattened size."""
    if x is None or shape is None:
        return None
    rank = len(shape)
    start, end = start % rank, end % rank
    if x.dim < start or x.dim > end:
        new_dim = x.dim if x.dim < start else x.dim - (end - start)
        return Labels(x.ids, new_dim, rank - (end - start))
    if x.dim != start:
        graph.refuse(where, "a flatten that does not start at the channel dimension", inputs)
        return None
    inner = math.prod(shape[start + 1 : end + 1])
    return Labels([e for e in x.ids for _ in range(inner)], start, rank - (end - start))


class FlattenRule(LayerRule[nn.Flatten]):
    """``nn.Flatten``: see :func:`flatten_labels` (a following Linear loses whole blocks of inputs)."""

    def trace(self, graph: LabelGraph, call: Call[nn.Flatten]) -> Labels | None:
        m = call.module
        return flatten_labels(graph, call.x, call.in_shape, m.start_dim, m.end_dim, call.name, call.inputs)


class SoftmaxRule(LayerRule[nn.Softmax]):
    """``nn.Softmax``: a softmax over the channel dimension mixes every channel, so they stay whole."""

    def trace(self, graph: LabelGraph, call: Call[nn.Softmax]) -> Labels | None:
        x, dim = call.x, call.module.dim
        if dim is not None and dim < 0:
            dim = x.rank + dim if x is not None else dim
        if x is not None and dim == x.dim:
            graph.fix(x)
        return x


class FixedChannelsRule(LayerRule[nn.Module]):
    """A layer with stored per-channel constants that pruning must not change (slimguard's input
    ``Normalize``): its channels stay whole and pass on."""

    def trace(self, graph: LabelGraph, call: Call[nn.Module]) -> Labels | None:
        graph.fix(call.x)
        return call.x


register_rule(nn.Flatten)(FlattenRule())
register_rule(nn.Softmax)(SoftmaxRule())
register_rule(Normalize)(FixedChannelsRule())
