"""Input contracts: what a model may be given, inferred from its training data, editable as YAML.

A :class:`Contract` records the input shape (without the batch dimension), the accepted dtypes, the
valid range of each feature (training minimum and maximum widened by a margin), whether NaN/Inf are
allowed, and the largest batch. :meth:`Contract.check` returns structured :class:`Violation` records
(which field, what value, what was allowed); :meth:`Contract.validate` raises
:class:`ContractViolation` (a :class:`~slimguard.core.errors.DataError`) carrying them, so bad inputs
are never passed to the model.

Example:
    >>> contract = Contract.infer(data.train, margin=0.05)
    >>> contract.save("contract.yaml")              # edit ranges by hand if needed
    >>> contract = Contract.load("contract.yaml")
    >>> [v.to_dict() for v in contract.check(torch.full((2, 1, 8, 8), float("nan")))]
    [{'kind': 'nonfinite', 'field': 'x', 'value': 'nan', 'allowed': 'finite values', 'rows': [0, 1], ...}]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimguard.core.errors import ConfigError, DataError
from slimguard.core.outputs import write_text_atomic
from slimguard.core.recipe import load_yaml, read_yaml_file

MAX_REPORTED = 20  # range violations listed per check (the worst ones)
MAX_CONTRACT_BYTES = 32 << 20  # per-feature bounds of a large input still fit


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_margin(margin: Any, what: str) -> None:
    if not _is_number(margin) or not 0 <= margin < math.inf:
        raise ConfigError(f"{what}: {_short(margin)} is out of range; allowed: a finite number >= 0")


def _bad(field: str, got: Any, allowed: str) -> ConfigError:
    return ConfigError(f"contract {field}: {_short(got)} is not allowed; allowed: {allowed}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass
class Violation:
    """One broken rule.

    Attributes:
        kind: ``type``, ``empty``, ``dtype``, ``shape``, ``batch``, ``nonfinite`` or ``range``.
        field: what was checked (``x``, ``dtype``, ``shape``, ``x[3]`` or the feature's name).
        value: what was found (the worst value for range violations).
        allowed: what the contract allows, as text.
        rows: batch rows affected (up to 10), when the rule is per row.
        count: how many values broke the rule.
    """

    kind: str
    field: str
    value: Any
    allowed: str
    rows: list[int] = dataclasses.field(default_factory=list)
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.field}: {self.value} ({self.kind}); allowed: {self.allowed}"


class ContractViolation(DataError):
    """Inputs that break a contract. ``violations`` holds the structured reasons."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"input rejected by the contract: {violations[0]}{more}")


def _fmt(v: float) -> str:
    return f"{v:.6g}"


@dataclasses.dataclass
class Contract:
    """Rules for a model's inputs.

    Attributes:
        input_shape: shape of one example (batch dimension excluded).
        dtypes: accepted dtypes by name (default: the training data's dtype only).
        low, high: per-feature bounds, flattened (length = prod(input_shape)), or one scalar each.
        allow_nonfinite: accept NaN/Inf (default False).
        max_batch: largest batch accepted (None = any).
        feature_names: optional names used in violation reports (tabular data).
        margin: the margin used at inference time (recorded for reference).
    """

    input_shape: tuple[int, ...]
    dtypes: list[str]
    low: list[float] | float
    high: list[float] | float
    allow_nonfinite: bool = False
    max_batch: int | None = None
    feature_names: list[str] = dataclasses.field(default_factory=list)
    margin: float = 0.0

    def __post_init__(self) -> None:
        shape = self.input_shape
        if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 1 for d in shape):
            raise _bad("input_shape", shape, "positive integers, e.g. [1, 8, 8]")
        self.input_shape = tuple(int(d) for d in shape)
        n = math.prod(self.input_shape)
        dtypes = self.dtypes
        if not isinstance(dtypes, list) or not dtypes or not all(isinstance(d, str) for d in dtypes):
            raise _bad("dtypes", self.dtypes, "a non-empty list of dtype names, e.g. [float32]")
        for d in self.dtypes:
            if not isinstance(getattr(torch, d, None), torch.dtype):
                raise ConfigError(f"contract dtypes: {d!r} is not a torch dtype; e.g. float32, int64")
        names = self.feature_names
        if not isinstance(names, list) or not all(isinstance(f, str) for f in names):
            raise _bad("feature_names", names, "a list of names")
        if names and len(names) != n:
            raise ConfigError(f"contract feature_names: {len(names)} names for {n} features")
        if self.max_batch is not None and (not _is_int(self.max_batch) or self.max_batch < 1):
            raise _bad("max_batch", self.max_batch, "an integer >= 1, or null")
        if not isinstance(self.allow_nonfinite, bool):
            raise _bad("allow_nonfinite", self.allow_nonfinite, "true or false")
        _check_margin(self.margin, "contract margin")
        self._check_bounds(n)

    def _check_bounds(self, n: int) -> None:
        """Bounds are numbers (one, or one per feature), never NaN (NaN compares false, so it would bound
        nothing), with low <= high."""
        for name in ("low", "high"):
            v = getattr(self, name)
            values = v if isinstance(v, list) else [v]
            if not all(_is_number(e) for e in values):
                raise _bad(name, v, "a number or a list of numbers")
            if any(math.isnan(e) for e in values):
                raise _bad(name, v, "numbers, not NaN (-.inf / .inf for no bound)")
            if isinstance(v, list) and len(v) != n:
                raise ConfigError(f"contract {name}: {len(v)} bounds given but the input has {n} features")
        low = torch.as_tensor(self.low, dtype=torch.float64)
        high = torch.as_tensor(self.high, dtype=torch.float64)
        inverted = torch.broadcast_to(low > high, (n,) if low.dim() or high.dim() else ())
        if bool(inverted.any()):
            j = int(inverted.flatten().nonzero()[0, 0])
            lo, hi = (float(t if t.dim() == 0 else t[j]) for t in (low, high))
            where = "" if inverted.dim() == 0 else f" of {self._feature(j)}"
            raise ConfigError(f"contract low/high: the low bound{where} ({lo:g}) is above the high bound "
                              f"({hi:g}); allowed: low <= high")

    # ---- inference ---------------------------------------------------------------------------------
    @classmethod
    def infer(cls, data: Any, margin: float = 0.05, per_feature: bool | None = None,
              max_batch: int | None = None, feature_names: list[str] | None = None) -> Contract:
        """Infer a contract from training data (a Split or a tensor ``(N, *input_shape)``).

        Args:
            margin: widen each range by this fraction of its width (default 0.05).
            per_feature: one range per feature (default for tabular data) or one for all values
                (default for images, whose pixels share one range).
            max_batch: largest batch to accept (default any).
        """
        x = data.x if hasattr(data, "x") else data
        if not torch.is_tensor(x) or x.dim() < 2 or len(x) == 0:
            raise DataError("a contract is inferred from a non-empty tensor of shape (N, *input_shape)")
        _check_margin(margin, "margin")
        meta = getattr(data, "meta", None)
        if per_feature is None:
            per_feature = getattr(meta, "kind", "tabular") != "image"
        flat = x.detach().flatten(1).double()
        finite = flat[torch.isfinite(flat).all(1)]
        if len(finite) == 0:
            raise DataError("every training row holds NaN/Inf; cannot infer ranges")
        if per_feature:
            lo, hi = finite.amin(0), finite.amax(0)
            span = torch.where(hi > lo, hi - lo, (hi - lo).new_full((), float(finite.max() - finite.min())))
            low: Any = (lo - margin * span).tolist()
            high: Any = (hi + margin * span).tolist()
        else:
            lo_s, hi_s = float(finite.min()), float(finite.max())
            low, high = lo_s - margin * (hi_s - lo_s), hi_s + margin * (hi_s - lo_s)
        fitted = [v for bound in (low, high) for v in (bound if isinstance(bound, list) else [bound])]
        if any(math.isnan(v) for v in fitted):  # e.g. 0 * inf when the values span more than float64 holds
            raise DataError("the training values span more than float64 can hold, so no range can be "
                            "inferred; rescale the inputs")
        return cls(tuple(x.shape[1:]), [str(x.dtype).removeprefix("torch.")], low, high, False, max_batch,
                   list(feature_names or []), margin)

    # ---- checks ------------------------------------------------------------------------------------------
    def _feature(self, j: int) -> str:
        return self.feature_names[j] if self.feature_names else f"x[{j}]"

    def check(self, x: Any) -> list[Violation]:
        """All violations of ``x`` (a batch ``(N, *input_shape)``); empty when it conforms."""
        if isinstance(x, np.ndarray):
            try:
                x = torch.from_numpy(x)
            except TypeError:
                return [Violation("type", "x", f"numpy array of {x.dtype}", "a numeric tensor or array")]
        if not torch.is_tensor(x):
            return [Violation("type", "x", type(x).__name__, "a tensor or numpy array")]
        shape = tuple(x.shape)
        want = "(N, " + ", ".join(map(str, self.input_shape)) + ")"
        if x.dim() == 0 or shape[1:] != self.input_shape:
            return [Violation("shape", "shape", list(shape), want)]
        if shape[0] == 0:
            return [Violation("empty", "batch", 0, "at least one example")]
        out: list[Violation] = []
        if self.max_batch is not None and shape[0] > self.max_batch:
            out.append(Violation("batch", "batch", shape[0], f"at most {self.max_batch} examples"))
        name = str(x.dtype).removeprefix("torch.")
        if name not in self.dtypes:
            out.append(Violation("dtype", "dtype", name, ", ".join(self.dtypes)))
            if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                          torch.uint8)):
                return out
        flat = x.detach().flatten(1)
        finite = torch.ones_like(flat, dtype=torch.bool)
        if flat.is_floating_point():
            finite = torch.isfinite(flat)
            bad = ~finite
            if not self.allow_nonfinite and bool(bad.any()):
                rows = bad.any(1).nonzero().flatten()
                first = flat[bad][0].item()
                out.append(Violation("nonfinite", "x", str(first), "finite values (no NaN or Inf)",
                                     rows[:10].tolist(), int(bad.sum())))
            flat = torch.where(bad, torch.zeros((), dtype=flat.dtype), flat)
        flat = flat.double()
        low = torch.as_tensor(self.low, dtype=torch.float64)
        high = torch.as_tensor(self.high, dtype=torch.float64)
        # in range only when both comparisons hold, so a NaN bound rejects (fails closed); non-finite
        # values were reported above
        below = ~(flat >= low) & finite
        above = ~(flat <= high) & finite & ~below
        if bool(below.any()) or bool(above.any()):
            out.extend(self._range_violations(flat, below, above, low, high))
        return out

    def _range_violations(self, flat: torch.Tensor, below: torch.Tensor, above: torch.Tensor,
                          low: torch.Tensor, high: torch.Tensor) -> list[Violation]:
        out = []
        lo = low.expand(flat.shape[1]) if low.dim() == 0 else low
        hi = high.expand(flat.shape[1]) if high.dim() == 0 else high
        excess = torch.where(below, lo - flat, torch.zeros_like(flat)) + torch.where(above, flat - hi, 0.0)
        excess = torch.nan_to_num(excess, nan=math.inf)  # NaN bound: the worst violation
        if low.dim() == 0:  # one range for every value: report the input as a whole
            bad = below | above
            i, j = divmod(int(excess.argmax()), flat.shape[1])
            rows = bad.any(1).nonzero().flatten()[:10].tolist()
            return [Violation("range", "x", _fmt(float(flat[i, j])),
                              f"[{_fmt(float(low))}, {_fmt(float(high))}]", rows, int(bad.sum()))]
        worst = excess.amax(0)
        for j in worst.argsort(descending=True)[:MAX_REPORTED].tolist():
            if worst[j] <= 0:
                break
            i = int(excess[:, j].argmax())
            rows = (below[:, j] | above[:, j]).nonzero().flatten()[:10].tolist()
            out.append(Violation("range", self._feature(j), _fmt(float(flat[i, j])),
                                 f"[{_fmt(float(lo[j]))}, {_fmt(float(hi[j]))}]", rows,
                                 int((below[:, j] | above[:, j]).sum())))
        return out

    def row_ok(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``(N,)``: rows that are finite and within range (shape and dtype must already fit)."""
        flat = x.detach().flatten(1).double()
        ok = torch.isfinite(flat).all(1) | self.allow_nonfinite
        low = torch.as_tensor(self.low, dtype=torch.float64)
        high = torch.as_tensor(self.high, dtype=torch.float64)
        return ok & ((flat >= low) & (flat <= high)).all(1)

    def validate(self, x: Any) -> torch.Tensor:
        """Return ``x`` as a tensor if it conforms; raise :class:`ContractViolation` otherwise."""
        violations = self.check(x)
        if violations:
            raise ContractViolation(violations)
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    # ---- YAML / dict round trip ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return {"contract_version": 1, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "contract") -> Contract:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("contract_version", 1)
        if version != 1:
            raise ConfigError(f"{where}: contract_version {version!r} is not supported; allowed: 1")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        missing = sorted({"input_shape", "dtypes", "low", "high"} - set(d))
        if missing:
            raise ConfigError(f"{where}: key {missing[0]!r} is missing")
        return cls(**d)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @classmethod
    def from_yaml(cls, text: str, where: str = "contract") -> Contract:
        """Parse a contract from YAML text (plain data only; anchors and aliases are refused)."""
        return cls.from_dict(load_yaml(text, where), where)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the contract as YAML (atomically)."""
        return write_text_atomic(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Contract:
        """Read a contract YAML file (UTF-8, at most :data:`MAX_CONTRACT_BYTES`, no anchors/aliases)."""
        return cls.from_dict(read_yaml_file(os.fspath(path), "contract", MAX_CONTRACT_BYTES), str(path))


def basic_check(x: Any) -> list[Violation]:
    """The checks every input gets even without a contract: a tensor, at least one example, finite."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "fiub":
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        return [Violation("type", "x", type(x).__name__, "a numeric tensor or numpy array")]
    if x.dim() == 0:
        return [Violation("shape", "shape", [], "(N, ...) with a batch dimension")]
    if x.shape[0] == 0:
        return [Violation("empty", "batch", 0, "at least one example")]
    if x.is_floating_point():
        bad = ~torch.isfinite(x.flatten(1))
        if bool(bad.any()):
            rows = bad.any(1).nonzero().flatten()[:10].tolist()
            return [Violation("nonfinite", "x", str(x.flatten(1)[bad][0].item()), "finite values (no NaN or Inf)",
                              rows, int(bad.sum()))]
    return []
