"""Channel dependency graph: which channels of which modules must be pruned together.

The model is traced with ``torch.fx`` (``torch.nn`` layers, module types with a layer rule, Hugging Face
models and ``ignore``d modules stay leaves) and shapes are propagated with example inputs. Every tensor's
channel dimension then carries one *label* per channel: an element id in a union-find.

* every leaf module is handled by its layer rule (:mod:`slimguard.prune.rules`, looked up by type): a
  Conv/Linear output opens a new *space* of labels (its output channels); BatchNorm, LayerNorm,
  activations, pooling, dropout pass labels through; a grouped/depthwise convolution or a GroupNorm
  unites each group's channels, so whole groups go; a transformer block keeps its channels whole;
* ``a + b`` (residual add, also ``*``, ``-``, ``/``) unites the labels of both operands channel by
  channel, so coupled channels are pruned together;
* concatenation along channels concatenates labels; flatten repeats each label over the spatial size,
  so a following Linear loses the matching block of inputs;
* graph inputs and outputs, ignored modules, and anything unknown that only sees fixed channels are
  *fixed*; a channel united with a fixed one is never pruned (outputs keep their shape).

A leaf module without a rule, or an operation the graph does not understand, that receives prunable
channels is refused with a :class:`~slimguard.core.errors.ModelError` naming its module and the way out
(``ignore=[...]``).

The result is a list of :class:`Group` objects; each holds *units* (sets of coupled channels) and the
*touches* (module, role, position) a unit occupies, which :mod:`slimguard.prune.structured` scores and
cuts. Idea after Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ModelError
from slimguard.core.torch_utils import eval_mode
from slimguard.prune.blocks import is_block
from slimguard.prune.rules import Call, Labels, LayerRule, flatten_labels, rule_for

PASS_FUNCS: set[Any] = {
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    operator.neg, torch.clamp, torch.abs,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max", "contiguous", "to", "float",
                "half", "bfloat16", "clone", "detach", "type_as", "abs", "neg", "exp", "sqrt"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
          torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCE = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
CREATORS = {torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like, torch.arange, torch.ones,
            torch.zeros, operator.getitem}


@dataclasses.dataclass
class Touch:
    """Module ``module`` holds channel ``position`` of its ``role`` (``out``, ``in``, ``gin``, ``feat``)."""

    module: str
    role: str
    position: int


@dataclasses.dataclass
class Group:
    """Coupled channels: prune ``ratio`` of ``units``; a unit is a set of channels that go together.

    Attributes:
        units: unit id -> touches (every module slice the unit occupies).
        modules: names of the modules whose output channels (``out`` role) are in the group.
        fixed: number of units that may not be pruned (united with an input, output or ignored module).
    """

    units: dict[int, list[Touch]]
    modules: list[str]
    fixed: int = 0


class _UF:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _where(node: fx.Node) -> str:
    """The module an error about ``node`` names."""
    return str(node.target) if node.op == "call_module" else (_module_path(node) or node.name)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Callable[[nn.Module, str], bool]) -> None:
        super().__init__()
        self._leaves = leaves
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaves(m, qualname) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def is_hf_model(m: nn.Module) -> bool:
    hf = sys.modules.get("transformers.modeling_utils")  # a Hugging Face model exists only if it was imported
    return hf is not None and isinstance(m, hf.PreTrainedModel)


def is_opaque(m: nn.Module) -> bool:
    """A transformer block or a Hugging Face model: a leaf whose outer channels stay fixed."""
    return is_block(m) or is_hf_model(m)


def trace(model: nn.Module, ignore: Sequence[str] = ()) -> tuple[fx.GraphModule, set[str]]:
    """Symbolically trace ``model``; returns the graph module and the names of the leaves kept whole
    (``ignore``d modules and Hugging Face models). A module whose own type has a layer rule is a leaf."""
    opaque: set[str] = set()

    def leaves(m: nn.Module, qualname: str) -> bool:
        if qualname in ignore or is_hf_model(m):
            opaque.add(qualname)
            return True
        return rule_for(m, inherited=False) is not None

    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.stack[-1] if tracer.stack else ""
        hint = f"in module {where!r}; add ignore=[{where!r}] to leave it whole" if where else (
            "in the top-level forward; ignore=[...] the modules it cannot follow")
        raise ModelError(f"cannot trace the model for structured pruning ({type(exc).__name__}: {exc}) "
                         f"{hint}") from None
    return fx.GraphModule(tracer.root, graph), opaque


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _int_arg(node: fx.Node, index: int, name: str, default: int) -> int | None:
    """Argument ``index`` (or keyword ``name``, else ``default``) of ``node`` when it is a plain int; None when
    the traced code computes it at run time (then it is a graph node the labels cannot follow)."""
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    return value if isinstance(value, int) else None


def _int_list(value: fx.node.Argument) -> list[int] | None:
    """An int or a sequence of ints (a ``dim`` argument) as a list; None when any is computed at run time."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        ints = [d for d in value if isinstance(d, int)]
        return ints if len(ints) == len(value) else None
    return None


class DependencyGraph:
    """Trace ``model``, propagate channel labels and build the :class:`Group` list.

    Each leaf module is traced by its layer rule (:mod:`slimguard.prune.rules`); :attr:`rules` keeps the
    rule of every leaf it traced, so the shrinking scores and cuts a module with the same rule.

    Args:
        model: the model (not modified).
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors (for tracing shapes).
        ignore: qualified names of modules to keep whole (their channels are fixed).

    Example:
        >>> g = DependencyGraph(model, torch.rand(1, 1, 32, 32))
        >>> [len(grp.units) for grp in g.groups]
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignore: Sequence[str] = ()) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        names = dict(model.named_modules())
        for entry in ignore:
            if entry not in names:
                raise ModelError(f"ignore: {entry!r} names no module; modules are e.g. "
                                 f"{', '.join(n for n in list(names)[1:6])}")
        self.model = model
        self.gm, self.opaque = trace(model, ignore)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if isinstance(example_inputs, dict):
            args = [example_inputs.get(p.target) for p in placeholders]
        else:
            args = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
            args += [None] * (len(placeholders) - len(args))
        try:
            with eval_mode(model), torch.no_grad():
                ShapeProp(self.gm).propagate(*args)
        except Exception as exc:
            raise ModelError(f"running the traced model on the example inputs failed ({type(exc).__name__}: "
                             f"{exc}); pass example_inputs that fit the model") from None
        self.uf = _UF()
        self.fixed: set[int] = set()
        self.touches: list[tuple[int, Touch]] = []
        self._out_of: dict[str, list[int]] = {}
        self._seen: dict[tuple[str, str], list[int]] = {}
        self._pending: list[tuple[str, str, list[int]]] = []
        self.modules = dict(self.gm.named_modules())
        self.rules: dict[str, LayerRule] = {}
        labels: dict[fx.Node, Labels | None] = {}
        for node in self.gm.graph.nodes:
            labels[node] = self._visit(node, labels)
        roots = self._fixed_roots()
        for where, what, ids in self._pending:
            if any(self.uf.find(i) not in roots for i in ids):
                raise ModelError(f"structured pruning cannot follow {what} in module {where!r}; "
                                 f"add ignore=[{where!r}] to leave it whole")
        self.groups = self._build_groups()

    # ---- what a layer rule may do (slimguard.prune.rules.LabelGraph) ----------------------------
    def new(self, n: int) -> list[int]:
        """A new space of ``n`` prunable channels."""
        return self.uf.new(n)

    def unite(self, ids: Sequence[int]) -> None:
        """Couple channels: all of ``ids`` go together."""
        for e in ids[1:]:
            self.uf.union(ids[0], e)

    def fix(self, labels: Labels | None) -> None:
        """Mark every channel of ``labels`` as never pruned."""
        if labels is not None:
            self.fixed.update(labels.ids)

    def refuse(self, where: str, what: str, labels: Sequence[Labels | None]) -> None:
        """Remember ``what`` in module ``where``, which the graph cannot follow; it is an error only if a
        channel it sees turns out prunable (checked once every union is known)."""
        ids = [i for lab in labels if lab is not None for i in lab.ids]
        if ids:
            self._pending.append((where, what, ids))

    def record(self, module: str, role: str, ids: list[int]) -> None:
        """Module ``module`` holds channel ``ids[p]`` at position ``p`` of its ``role``."""
        key = (module, role)
        if key in self._seen:  # a module called twice: both calls share its weights
            prev = self._seen[key]
            if len(prev) != len(ids):
                self.fixed.update(prev)
                self.fixed.update(ids)
                return
            for a, b in zip(prev, ids, strict=True):
                self.uf.union(a, b)
            return
        self._seen[key] = ids
        if role == "out":
            self._out_of[module] = ids
        for pos, e in enumerate(ids):
            self.touches.append((e, Touch(module, role, pos)))

    def input_ids(self, labels: Labels | None, n: int, dim: int, rank: int) -> list[int]:
        """``labels.ids`` when they are ``n`` channels on ``dim`` of a rank-``rank`` tensor, else a fixed
        space of ``n`` (fixing ``labels`` when only their count differs)."""
        if labels is None or labels.dim != dim or labels.rank != rank:
            return self._fixed_space(n)
        if len(labels.ids) != n:
            self.fix(labels)
            return self._fixed_space(n)
        return labels.ids

    # ---- helpers ------------------------------------------------------------------------------
    def _fixed_space(self, n: int) -> list[int]:
        ids = self.uf.new(n)
        self.fixed.update(ids)
        return ids

    def _tensor_args(self, node: fx.Node, labels: dict[fx.Node, Labels | None]) -> list[Labels | None]:
        out: list[Labels | None] = []
        for a in node.all_input_nodes:
            out.append(labels.get(a))
        return out

    def _refuse(self, node: fx.Node, what: str, labs: list[Labels | None]) -> None:
        self.refuse(_where(node), what, labs)

    def _fixed_roots(self) -> set[int]:
        return {self.uf.find(i) for i in self.fixed}

    # ---- the visitor ----------------------------------------------------------------------------
    def _visit(self, node: fx.Node, labels: dict[fx.Node, Labels | None]) -> Labels | None:
        shape = _shape(node)
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for lab in self._tensor_args(node, labels):
                self.fix(lab)
            return None
        if node.op == "call_module":
            return self._visit_module(node, labels, shape)
        if node.op in ("call_function", "call_method"):
            return self._visit_function(node, labels, shape)
        return None

    def _visit_module(self, node: fx.Node, labels: dict[fx.Node, Labels | None],
                      shape: tuple[int, ...] | None) -> Labels | None:
        name = str(node.target)
        m = self.modules[name]
        ins = self._tensor_args(node, labels)
        if name in self.opaque:
            for lab in ins:
                self.fix(lab)
            return None
        rule = rule_for(m)
        if rule is None:
            self.refuse(name, f"a {type(m).__name__}", ins)
            return None
        self.rules[name] = rule
        return rule.trace(self, Call(name, m, ins, _shape(node.args[0]) if node.args else None, shape))

    def _visit_function(self, node: fx.Node, labels: dict[fx.Node, Labels | None],
                        shape: tuple[int, ...] | None) -> Labels | None:
        t = node.target
        ins = self._tensor_args(node, labels)
        if all(lab is None for lab in ins):
            return None
        is_method = node.op == "call_method"
        x = labels.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if (t in BINARY) or (is_method and t in BINARY_METHODS):
            return self._binary(node, labels, shape)
        if (not is_method and t in PASS_FUNCS) or (is_method and t in PASS_METHODS):
            if x is not None and shape is not None and len(shape) == x.rank:
                for lab in ins[1:]:
                    self.fix(lab)
                return x
        if (not is_method and t is torch.flatten) or (is_method and t == "flatten"):
            start, end = _int_arg(node, 1, "start_dim", 0), _int_arg(node, 2, "end_dim", -1)
            if start is None or end is None:
                self._refuse(node, "a flatten over dims computed at run time", ins)
                return None
            return flatten_labels(self, x, _shape(node.args[0]), start, end, _where(node), ins)
        if (is_method and t in ("view", "reshape")) or t is torch.reshape:
            xs = _shape(node.args[0])
            if x is not None and xs is not None and shape is not None:
                if shape == xs:
                    return x
                if len(shape) == 2 and shape[0] == xs[0] and x.dim == 1:
                    return flatten_labels(self, x, xs, 1, -1, _where(node), ins)
        if (not is_method and t in (torch.cat, torch.concat)) or (is_method and t == "cat"):
            return self._cat(node, labels, shape)
        if (not is_method and t in REDUCE) or (is_method and t in REDUCE_METHODS):
            return self._reduce(node, x, shape, ins)
        if t is F.normalize and x is not None:
            dim = _int_arg(node, 2, "dim", 1)
            if dim is None:
                self._refuse(node, "a normalize over a dim computed at run time", ins)
                return None
            if dim % x.rank == x.dim:
                self.fix(x)
            return x
        if t is F.linear or t is F.conv2d or t is F.conv1d:
            self._refuse(node, f"a functional call {getattr(t, '__name__', t)}", ins)
            return None
        if t in (getattr, len) or (is_method and t in ("size", "dim")):
            return None  # reads shapes only
        if t in CREATORS:
            if t is operator.getitem and x is not None:
                self._refuse(node, "indexing of a tensor", ins)
            return None
        self._refuse(node, f"operation {getattr(t, '__name__', t)!s}", ins)
        return None

    def _binary(self, node: fx.Node, labels: dict[fx.Node, Labels | None],
                shape: tuple[int, ...] | None) -> Labels | None:
        if shape is None:
            return None
        r = len(shape)
        ops = [a for a in node.args[:2]]
        result: Labels | None = None
        placed: list[tuple[Labels, int]] = []
        unlabeled: list[tuple[int, ...]] = []
        for a in ops:
            if isinstance(a, fx.Node):
                lab, s = labels.get(a), _shape(a)
                if lab is not None:
                    placed.append((lab, lab.dim + (r - lab.rank)))
                elif s is not None:
                    unlabeled.append((1,) * (r - len(s)) + tuple(s))
        if not placed:
            return None
        first, dim0 = placed[0]
        for lab, dim in placed[1:]:
            if dim == dim0 and len(lab.ids) == len(first.ids):
                for a, b in zip(first.ids, lab.ids, strict=True):
                    self.uf.union(a, b)
            else:
                self.fix(first)
                self.fix(lab)
        for s in unlabeled:
            if s[dim0] != 1:
                for lab, _ in placed:
                    self.fix(lab)
        result = Labels(first.ids, dim0, r)
        return result

    def _cat(self, node: fx.Node, labels: dict[fx.Node, Labels | None],
             shape: tuple[int, ...] | None) -> Labels | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = _int_arg(node, 1, "dim", 0)
        if shape is None or not isinstance(tensors, (list, tuple)):
            return None
        r = len(shape)
        labs = [labels.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        ref = next((lab for lab in labs if lab is not None), None)
        if ref is None:
            return None
        if dim is None:
            self._refuse(node, "a concatenation along a dim computed at run time", labs)
            return None
        dim %= r
        if ref.dim == dim:
            ids: list[int] = []
            for t, lab in zip(tensors, labs, strict=True):
                s = _shape(t)
                n = s[dim] if s is not None else 0
                if lab is not None and lab.dim == dim and len(lab.ids) == n:
                    ids.extend(lab.ids)
                else:
                    self.fix(lab)
                    ids.extend(self._fixed_space(n))
            return Labels(ids, dim, r)
        for lab in labs:  # concatenation along another axis: channels line up, unite them
            if lab is None or lab.dim != ref.dim or len(lab.ids) != len(ref.ids):
                for other in labs:
                    self.fix(other)
                return ref
            for a, b in zip(ref.ids, lab.ids, strict=True):
                self.uf.union(a, b)
        return ref

    def _reduce(self, node: fx.Node, x: Labels | None, shape: tuple[int, ...] | None,
                ins: list[Labels | None]) -> Labels | None:
        if x is None or shape is None:
            return None
        arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if arg is None:
            self.fix(x)
            return None
        given = _int_list(arg)
        if given is None:
            self._refuse(node, "a reduction over dims computed at run time", ins)
            return None
        dims = [d % x.rank for d in given]
        if x.dim in dims:
            self.fix(x)
            return None
        new_dim = x.dim if keep else x.dim - sum(1 for d in dims if d < x.dim)
        return Labels(x.ids, new_dim, len(shape))

    # ---- groups -------------------------------------------------------------------------------
    def _build_groups(self) -> list[Group]:
        uf = self.uf
        fixed_roots = self._fixed_roots()
        space_uf = _UF()
        space_uf.new(len(uf.parent))
        for e in range(len(uf.parent)):
            space_uf.union(e, uf.find(e))
        # elements of one producer space belong to the same group
        for ids in self._out_of.values():
            for e in ids[1:]:
                space_uf.union(ids[0], e)
        units_by_group: dict[int, dict[int, list[Touch]]] = {}
        for e, touch in self.touches:
            root = uf.find(e)
            g = space_uf.find(root)
            units_by_group.setdefault(g, {}).setdefault(root, []).append(touch)
        groups = []
        for units in units_by_group.values():
            mods = sorted({t.module for ts in units.values() for t in ts if t.role == "out"})
            if not mods:
                continue
            free = {u: ts for u, ts in units.items() if u not in fixed_roots}
            groups.append(Group(units=free, modules=mods, fixed=len(units) - len(free)))
        return groups
