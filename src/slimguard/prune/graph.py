"""Channel dependency graph: which channels of which modules must be pruned together.

The model is traced with ``torch.fx`` (standard ``torch.nn`` layers, registered transformer blocks,
Hugging Face models and ``ignore``d modules stay leaves) and shapes are propagated with example inputs.
Every tensor's channel dimension then carries one *label* per channel: an element id in a union-find.

* a Conv/Linear output opens a new *space* of labels (its output channels);
* BatchNorm, LayerNorm, activations, pooling, dropout pass labels through;
* ``a + b`` (residual add, also ``*``, ``-``, ``/``) unites the labels of both operands channel by
  channel, so coupled channels are pruned together;
* concatenation along channels concatenates labels; flatten repeats each label over the spatial size,
  so a following Linear loses the matching block of inputs;
* a grouped/depthwise convolution unites each group's input and output channels: whole groups go;
* graph inputs and outputs, ignored modules, and anything unknown that only sees fixed channels are
  *fixed*; a channel united with a fixed one is never pruned (outputs keep their shape).

An operation the graph does not understand that receives prunable channels is refused with a
:class:`~slimguard.core.errors.ModelError` naming its module and the way out (``ignore=[...]``).

The result is a list of :class:`Group` objects; each holds *units* (sets of coupled channels) and the
*touches* (module, role, position) a unit occupies, which :mod:`slimguard.prune.structured` scores and
cuts. Idea after Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ModelError

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
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


@dataclasses.dataclass
class _Lab:
    ids: list[int]   # one element id per channel
    dim: int         # the channel dimension of the tensor
    rank: int


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


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


def is_opaque(m: nn.Module) -> bool:
    """A transformer block or a Hugging Face model: a leaf whose outer channels stay fixed."""
    from slimguard.prune.blocks import is_block

    if is_block(m):
        return True
    hf = sys.modules.get("transformers.modeling_utils")  # a Hugging Face model exists only if it was imported
    return hf is not None and isinstance(m, hf.PreTrainedModel)


def trace(model: nn.Module, ignore: Sequence[str] = ()) -> tuple[fx.GraphModule, set[str]]:
    """Symbolically trace ``model``; returns the graph module and the set of opaque leaf names."""
    opaque: set[str] = set()

    def leaves(m: nn.Module, qualname: str) -> bool:
        from slimguard.models.layers import Normalize

        if qualname in ignore or is_opaque(m):
            opaque.add(qualname)
            return True
        return isinstance(m, Normalize)

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


class DependencyGraph:
    """Trace ``model``, propagate channel labels and build the :class:`Group` list.

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
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*args)
        except Exception as exc:
            raise ModelError(f"running the traced model on the example inputs failed ({type(exc).__name__}: "
                             f"{exc}); pass example_inputs that fit the model") from None
        finally:
            model.train(was)
        self.uf = _UF()
        self.fixed: set[int] = set()
        self.touches: list[tuple[int, Touch]] = []
        self._out_of: dict[str, list[int]] = {}
        self._seen: dict[tuple[str, str], list[int]] = {}
        self._pending: list[tuple[str, str, list[int]]] = []
        self.modules = dict(self.gm.named_modules())
        labels: dict[fx.Node, _Lab | None] = {}
        for node in self.gm.graph.nodes:
            labels[node] = self._visit(node, labels)
        roots = self._fixed_roots()
        for where, what, ids in self._pending:
            if any(self.uf.find(i) not in roots for i in ids):
                raise ModelError(f"structured pruning cannot follow {what} in module {where!r}; "
                                 f"add ignore=[{where!r}] to leave it whole")
        self.groups = self._build_groups()

    # ---- helpers ------------------------------------------------------------------------------
    def _fix(self, lab: _Lab | None) -> None:
        if lab is not None:
            self.fixed.update(lab.ids)

    def _fixed_space(self, n: int) -> list[int]:
        ids = self.uf.new(n)
        self.fixed.update(ids)
        return ids

    def _tensor_args(self, node: fx.Node, labels: dict[fx.Node, _Lab | None]) -> list[_Lab | None]:
        out: list[_Lab | None] = []
        for a in node.all_input_nodes:
            out.append(labels.get(a))
        return out

    def _refuse(self, node: fx.Node, what: str, labs: list[_Lab | None]) -> None:
        """Remember an operation the graph cannot follow; it is an error only if a channel it sees
        turns out prunable (checked once every union is known)."""
        ids = [i for lab in labs if lab is not None for i in lab.ids]
        if ids:
            where = str(node.target) if node.op == "call_module" else (_module_path(node) or node.name)
            self._pending.append((where, what, ids))

    def _fixed_roots(self) -> set[int]:
        return {self.uf.find(i) for i in self.fixed}

    def _record(self, module: str, role: str, ids: list[int]) -> None:
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

    def _input_ids(self, lab: _Lab | None, n: int, dim: int, rank: int) -> list[int]:
        if lab is None or lab.dim != dim or len(lab.ids) != n or lab.rank != rank:
            if lab is not None and lab.dim == dim and lab.rank == rank and len(lab.ids) != n:
                self._fix(lab)
            return self._fixed_space(n)
        return lab.ids

    # ---- the visitor ----------------------------------------------------------------------------
    def _visit(self, node: fx.Node, labels: dict[fx.Node, _Lab | None]) -> _Lab | None:
        shape = _shape(node)
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for lab in self._tensor_args(node, labels):
                self._fix(lab)
            return None
        if node.op == "call_module":
            return self._visit_module(node, labels, shape)
        if node.op in ("call_function", "call_method"):
            return self._visit_function(node, labels, shape)
        return None

    def _visit_module(self, node: fx.Node, labels: dict[fx.Node, _Lab | None],
                      shape: tuple[int, ...] | None) -> _Lab | None:
        name = str(node.target)
        m = self.modules[name]
        ins = self._tensor_args(node, labels)
        x = ins[0] if ins else None
        xs = _shape(node.args[0]) if node.args else None
        if name in self.opaque:
            for lab in ins:
                self._fix(lab)
            return None
        if isinstance(m, CONV) and xs is not None and shape is not None:
            rank = len(xs)
            in_ids = self._input_ids(x, m.in_channels, 1, rank)
            out_ids = self.uf.new(m.out_channels)
            if m.groups == 1:
                self._record(name, "in", in_ids)
            else:
                bi, bo = m.in_channels // m.groups, m.out_channels // m.groups
                for j in range(m.groups):
                    head = out_ids[j * bo]
                    for t in range(bi):
                        self.uf.union(in_ids[j * bi + t], head)
                    for s in range(bo):
                        self.uf.union(out_ids[j * bo + s], head)
                self._record(name, "gin", in_ids)
            self._record(name, "out", out_ids)
            return _Lab(out_ids, 1, len(shape))
        if isinstance(m, nn.Linear) and xs is not None and shape is not None:
            rank = len(xs)
            in_ids = self._input_ids(x if x is not None and x.dim == rank - 1 else None, m.in_features,
                                     rank - 1, rank)
            self._record(name, "in", in_ids)
            out_ids = self.uf.new(m.out_features)
            self._record(name, "out", out_ids)
            if x is not None and x.dim != rank - 1:
                self._fix(x)
            return _Lab(out_ids, len(shape) - 1, len(shape))
        if isinstance(m, NORMS):
            if x is None or x.dim != 1 or len(x.ids) != m.num_features:
                self._fix(x)
                return x
            if m.affine or m.track_running_stats:
                self._record(name, "feat", x.ids)
            return x
        if isinstance(m, nn.LayerNorm):
            if x is None:
                return None
            nd = len(m.normalized_shape)
            if x.dim >= x.rank - nd:  # the channel dim is normalised over
                if nd == 1 and x.dim == x.rank - 1 and len(x.ids) == m.normalized_shape[0]:
                    if m.elementwise_affine:
                        self._record(name, "feat", x.ids)
                    return x
                self._fix(x)
            return x
        if isinstance(m, PASS_MODULES):
            if x is not None and shape is not None and len(shape) == x.rank:
                return x
            return self._refuse_ret(node, f"a {type(m).__name__}", ins)
        if isinstance(m, nn.Flatten):
            return self._flatten(x, xs, m.start_dim, m.end_dim, node, ins)
        if isinstance(m, nn.Softmax):
            dim = m.dim if m.dim is None or m.dim >= 0 else (x.rank + m.dim if x else m.dim)
            if x is not None and dim == x.dim:
                self._fix(x)
            return x
        from slimguard.models.layers import Normalize

        if isinstance(m, Normalize):
            self._fix(x)
            return x
        self._refuse(node, f"a {type(m).__name__}", ins)
        return None

    def _refuse_ret(self, node: fx.Node, what: str, ins: list[_Lab | None]) -> None:
        self._refuse(node, what, ins)
        return None

    def _flatten(self, x: _Lab | None, xs: tuple[int, ...] | None, start: int, end: int, node: fx.Node,
                 ins: list[_Lab | None]) -> _Lab | None:
        if x is None or xs is None:
            return None
        rank = len(xs)
        start, end = start % rank, end % rank
        if x.dim < start or x.dim > end:
            new_dim = x.dim if x.dim < start else x.dim - (end - start)
            return _Lab(x.ids, new_dim, rank - (end - start))
        if x.dim != start:
            return self._refuse_ret(node, "a flatten that does not start at the channel dimension", ins)
        inner = math.prod(xs[start + 1 : end + 1])
        ids = [e for e in x.ids for _ in range(inner)]
        return _Lab(ids, start, rank - (end - start))

    def _visit_function(self, node: fx.Node, labels: dict[fx.Node, _Lab | None],
                        shape: tuple[int, ...] | None) -> _Lab | None:
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
                    self._fix(lab)
                return x
        if (not is_method and t is torch.flatten) or (is_method and t == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(x, _shape(node.args[0]), start, end, node, ins)
        if (is_method and t in ("view", "reshape")) or t is torch.reshape:
            xs = _shape(node.args[0])
            if x is not None and xs is not None and shape is not None:
                if shape == xs:
                    return x
                if len(shape) == 2 and shape[0] == xs[0] and x.dim == 1:
                    return self._flatten(x, xs, 1, -1, node, ins)
        if (not is_method and t in (torch.cat, torch.concat)) or (is_method and t == "cat"):
            return self._cat(node, labels, shape)
        if (not is_method and t in REDUCE) or (is_method and t in REDUCE_METHODS):
            return self._reduce(node, x, shape, ins)
        if t is F.normalize and x is not None:
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 1)
            if dim % x.rank == x.dim:
                self._fix(x)
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

    def _binary(self, node: fx.Node, labels: dict[fx.Node, _Lab | None],
                shape: tuple[int, ...] | None) -> _Lab | None:
        if shape is None:
            return None
        r = len(shape)
        ops = [a for a in node.args[:2]]
        result: _Lab | None = None
        placed: list[tuple[_Lab, int]] = []
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
                self._fix(first)
                self._fix(lab)
        for s in unlabeled:
            if s[dim0] != 1:
                for lab, _ in placed:
                    self._fix(lab)
        result = _Lab(first.ids, dim0, r)
        return result

    def _cat(self, node: fx.Node, labels: dict[fx.Node, _Lab | None],
             shape: tuple[int, ...] | None) -> _Lab | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if shape is None or not isinstance(tensors, (list, tuple)):
            return None
        r = len(shape)
        dim %= r
        labs = [labels.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        ref = next((lab for lab in labs if lab is not None), None)
        if ref is None:
            return None
        if ref.dim == dim:
            ids: list[int] = []
            for t, lab in zip(tensors, labs, strict=True):
                s = _shape(t)
                n = s[dim] if s is not None else 0
                if lab is not None and lab.dim == dim and len(lab.ids) == n:
                    ids.extend(lab.ids)
                else:
                    self._fix(lab)
                    ids.extend(self._fixed_space(n))
            return _Lab(ids, dim, r)
        for lab in labs:  # concatenation along another axis: channels line up, unite them
            if lab is None or lab.dim != ref.dim or len(lab.ids) != len(ref.ids):
                for other in labs:
                    self._fix(other)
                return ref
            for a, b in zip(ref.ids, lab.ids, strict=True):
                self.uf.union(a, b)
        return ref

    def _reduce(self, node: fx.Node, x: _Lab | None, shape: tuple[int, ...] | None,
                ins: list[_Lab | None]) -> _Lab | None:
        if x is None or shape is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            self._fix(x)
            return None
        dims = [d % x.rank for d in ((dims,) if isinstance(dims, int) else dims)]
        if x.dim in dims:
            self._fix(x)
            return None
        new_dim = x.dim if keep else x.dim - sum(1 for d in dims if d < x.dim)
        return _Lab(x.ids, new_dim, len(shape))

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
