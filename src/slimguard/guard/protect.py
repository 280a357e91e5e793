"""Fault protection: range restriction of activations, per-tensor weight checksums with repair, and a
confidence/detector cascade from a compressed model to the original.

* :class:`RangeRestriction` (after Ranger, Chen et al., DSN 2021): the output of each activation
  module is clipped to the range profiled on training data; NaN becomes the lower bound. A bit flip
  that makes a weight or activation huge then cannot carry its size to the output.
* :class:`WeightChecksums` (in the spirit of RADAR, Li et al., DSN 2021): a CRC-32 per tensor, taken
  from the trusted artifact; ``verify`` names the tensors whose bytes changed (CRC-32 detects every
  1-bit and 2-bit error), ``repair`` copies them back from the artifact in place.
* :class:`Cascade`: answer with the small model; rows with low confidence or flagged by a detector are
  answered by the original model.

Example:
    >>> rr = RangeRestriction().profile(model, data.train.x).attach(model)
    >>> sums = WeightChecksums.from_model(model)
    >>> bad = sums.verify(model); sums.repair(model, "model.slim")
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_choice, check_range
from slimguard.core.errors import ArtifactError, DataError, NotFittedError
from slimguard.core.torch_utils import eval_mode

DEFAULT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh)


# ---- range restriction ---------------------------------------------------------------------------------
@dataclasses.dataclass
class RangeRestrictionConfig(Config):
    """Args:
    granularity: ``channel`` (default: one bound pair per output channel / feature, tighter) or
        ``layer`` (one pair per module, as in Ranger). On digits32-resnet, weight exponent-bit flips:
        24x fewer silent corruptions per channel vs 6x per layer (``benchmarks/faults.py``).
    margin: widen each profiled range by this fraction of its width (default 0: the profiled maximum).
    layers: module names to restrict; default every activation module (ReLU, GELU, ...).
    """

    granularity: str = "channel"
    margin: float = 0.0
    layers: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check_choice("granularity", self.granularity, ("layer", "channel"))
        check_range("margin", self.margin, 0.0, 10.0)


class RangeRestriction:
    """Clip activations to ranges profiled on training data (Ranger).

    Use: ``profile(model, x)`` once on training inputs, then ``attach(model)`` (forward hooks) and
    ``detach()``. Bounds are plain tensors, so ``state_dict()`` / ``from_state_dict`` store them.
    Options: :class:`RangeRestrictionConfig`, or its keys as keywords
    (``RangeRestriction(granularity="layer")``).

    Shape:
        Bounds are scalars (``layer``) or ``(1, C, 1, ...)`` (``channel``) for outputs ``(N, C, ...)``.
    """

    def __init__(self, config: RangeRestrictionConfig | None = None, **options: Any) -> None:
        self.config = RangeRestrictionConfig.build(config, options, where="range restriction")
        self.bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def _modules(self, model: nn.Module) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        if self.config.layers:
            missing = [n for n in self.config.layers if n not in named]
            if missing:
                raise DataError(f"range restriction: {missing[0]!r} is not a module of the model")
            return {n: named[n] for n in self.config.layers}
        return {n: m for n, m in named.items() if n and isinstance(m, DEFAULT_ACTIVATIONS)}

    @torch.no_grad()
    def profile(self, model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> RangeRestriction:
        """Record each module's output range on ``inputs`` (training data). Mode restored."""
        if len(inputs) == 0:
            raise DataError("range restriction needs non-empty training inputs to profile")
        mods = self._modules(model)
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}
        per_channel = self.config.granularity == "channel"

        def make_hook(name: str) -> Any:
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
                if per_channel and out.dim() >= 2:
                    dims = [0, *range(2, out.dim())]
                    a, b = out.amin(dim=dims, keepdim=True), out.amax(dim=dims, keepdim=True)
                else:
                    a, b = out.min(), out.max()
                lo[name] = a if name not in lo else torch.minimum(lo[name], a)
                hi[name] = b if name not in hi else torch.maximum(hi[name], b)
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
        try:
            with eval_mode(model):
                for i in range(0, len(inputs), batch_size):
                    model(inputs[i : i + batch_size])
        finally:
            for h in handles:
                h.remove()
        m = self.config.margin
        self.bounds = {n: (lo[n] - m * (hi[n] - lo[n]), hi[n] + m * (hi[n] - lo[n])) for n in lo}
        return self

    def attach(self, model: nn.Module) -> RangeRestriction:
        """Add clipping hooks to the profiled modules (idempotent)."""
        if not self.bounds:
            raise NotFittedError("RangeRestriction is not profiled; call .profile(model, train_inputs) first")
        self.detach()
        mods = dict(model.named_modules())
        for name, (lo, hi) in self.bounds.items():
            if name not in mods:
                raise DataError(f"range restriction: module {name!r} is not in this model")
            self._handles.append(mods[name].register_forward_hook(_clip_hook(lo, hi)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, (lo, hi) in self.bounds.items():
            out[f"{n}::low"], out[f"{n}::high"] = lo, hi
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor],
                        config: RangeRestrictionConfig | None = None) -> RangeRestriction:
        rr = cls(config)
        names = {k.rsplit("::", 1)[0] for k in state}
        rr.bounds = {n: (state[f"{n}::low"], state[f"{n}::high"]) for n in sorted(names)}
        return rr


def _clip_hook(lo: torch.Tensor, hi: torch.Tensor) -> Any:
    lo_f, hi_f = (float(lo), float(hi)) if lo.numel() == 1 else (None, None)

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        if lo_f is not None:
            return torch.nan_to_num(out, nan=lo_f, posinf=hi_f, neginf=lo_f).clamp_(lo_f, hi_f)
        y = torch.nan_to_num(out, nan=0.0)
        if y.requires_grad or y.dtype != hi.dtype:  # autograd, or a dtype the bounds promote: out of place
            return torch.maximum(torch.minimum(y, hi), lo)
        torch.minimum(y, hi, out=y)  # in place on the fresh tensor: no more large allocations per call
        return torch.maximum(y, lo, out=y)

    return hook


# ---- weight checksums ----------------------------------------------------------------------------------
def _crc(t: torch.Tensor) -> int:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.view(-1).view(torch.uint8).numpy().data)


@dataclasses.dataclass
class WeightChecksumsConfig(Config):
    """How attached checksums check the model (:meth:`WeightChecksums.attach`).

    Args:
        tensors_per_call: verify this many tensors before each forward, in round robin (amortised
            cost); None verifies every tensor on every call (default).
        repair: copy damaged tensors back from the source (default True); False raises ArtifactError.
    """

    tensors_per_call: int | None = None
    repair: bool = True

    def validate(self) -> None:
        if self.tensors_per_call is not None:
            check_range("tensors_per_call", self.tensors_per_call, 1)


class WeightChecksums:
    """One CRC-32 per state tensor (parameters and buffers).

    CRC-32 detects every single-bit and double-bit error in a tensor, so every injected bit flip is
    caught. Take the reference from the trusted artifact (:meth:`from_artifact`) or from a model known
    to be good (:meth:`from_model`).

    Example:
        >>> sums = WeightChecksums.from_artifact("model.slim")
        >>> sums.verify(model)          # [] when intact, else the names of changed tensors
        >>> sums.repair(model, "model.slim")
    """

    def __init__(self, checksums: dict[str, int], source: str | dict[str, torch.Tensor] | None = None) -> None:
        self.checksums = dict(checksums)
        self.source = source
        self._handle: Any = None
        self._cursor = 0

    @classmethod
    def from_model(cls, model: nn.Module,
                   source: str | os.PathLike[str] | dict[str, torch.Tensor] | None = None) -> WeightChecksums:
        """Checksums of ``model``'s current tensors; ``source`` (artifact path or state dict) repairs."""
        src = source if source is None or isinstance(source, dict) else str(source)
        return cls({k: _crc(v) for k, v in model.state_dict().items()}, src)

    @classmethod
    def from_artifact(cls, path: str | os.PathLike[str]) -> WeightChecksums:
        """Checksums of the tensors stored in a verified ``.slim`` artifact (repair source = it)."""
        return cls({k: _crc(v) for k, v in _artifact_state(path).items()}, str(path))

    def verify(self, model: nn.Module, names: list[str] | None = None) -> list[str]:
        """Names of tensors whose bytes differ from the reference (checked: ``names`` or all)."""
        state = model.state_dict()
        missing = sorted(set(self.checksums) - set(state))
        if missing:
            raise DataError(f"weight checksums: tensor {missing[0]!r} is not in this model; wrong model?")
        keys = names if names is not None else list(self.checksums)
        return [k for k in keys if _crc(state[k]) != self.checksums[k]]

    @torch.no_grad()
    def repair(self, model: nn.Module, source: str | os.PathLike[str] | dict[str, torch.Tensor] | None = None,
               names: list[str] | None = None) -> list[str]:
        """Copy the damaged tensors back in place from the artifact (or a state dict). Returns their names.

        Raises:
            ArtifactError: when a repaired tensor still fails its checksum (the source does not match).
        """
        bad = self.verify(model) if names is None else names
        if not bad:
            return []
        src = source if source is not None else self.source
        if src is None:
            raise ArtifactError("no repair source: pass the .slim artifact path (or build with from_artifact)")
        good = src if isinstance(src, dict) else _artifact_state(src)
        state = model.state_dict(keep_vars=True)
        for k in bad:
            # copied into the tensor itself (not ``.data``), so its version changes and layers rebuild what they
            # derived from it (packed int8 weights, row sums, int4 packs) instead of computing with the damage
            state[k].copy_(good[k].to(state[k].dtype))
        still = self.verify(model, bad)
        if still:
            raise ArtifactError(f"tensor {still[0]!r} does not match its checksum after repair; wrong source?")
        return bad

    def attach(self, model: nn.Module, config: WeightChecksumsConfig | None = None,
               **options: Any) -> WeightChecksums:
        """Verify before every forward: all tensors, or ``tensors_per_call`` of them in round robin
        (amortised cost). Damaged tensors are repaired (``repair=True``) or an ArtifactError is raised.
        Options: :class:`WeightChecksumsConfig`, or its keys as keywords
        (``attach(model, tensors_per_call=1)``).
        """
        cfg = WeightChecksumsConfig.build(config, options, where="weight checksums")
        tensors_per_call, repair = cfg.tensors_per_call, cfg.repair
        self.detach()
        keys = list(self.checksums)

        def pre_hook(mod: nn.Module, _args: Any) -> None:
            if tensors_per_call is None:
                names = keys
            else:
                names = [keys[(self._cursor + i) % len(keys)] for i in range(min(tensors_per_call, len(keys)))]
                self._cursor = (self._cursor + len(names)) % len(keys)
            bad = self.verify(mod, names)
            if bad:
                if not repair:
                    raise ArtifactError(f"weight tensor {bad[0]!r} failed its checksum; the model is corrupted")
                self.repair(mod, names=bad)

        self._handle = model.register_forward_pre_hook(pre_hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _artifact_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from slimguard.artifact import TENSORS, decode_tensors, read_entry, read_manifest

    manifest = read_manifest(path)
    return decode_tensors(manifest, read_entry(path, TENSORS), str(path))


# ---- cascade ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CascadeConfig(Config):
    """Args:
    threshold: confidence (max softmax probability of the small model) below which a row falls back to
        the large model, in [0, 1] (default 0.9).
    """

    threshold: float = 0.9

    def validate(self) -> None:
        check_range("threshold", self.threshold, 0.0, 1.0)


class Cascade(nn.Module):
    """Answer with ``small``; rows it is unsure of go to ``large``.

    A row falls back when the small model's max softmax probability is below ``threshold`` or when
    ``detector`` (fitted on the small model) flags it as out of distribution.

    Args:
        small: the compressed model.
        large: the original model.
        config: :class:`CascadeConfig`, or its keys as keywords (``Cascade(small, large, threshold=0.8)``).
        detector: optional fitted and calibrated OOD detector (see :mod:`slimguard.guard.ood`).

    Shape:
        Input ``(N, *input_shape)``, output logits ``(N, num_classes)``; ``last_fallback`` holds the
        boolean mask ``(N,)`` of rows answered by ``large``.
    """

    def __init__(self, small: nn.Module, large: nn.Module, config: CascadeConfig | None = None, *,
                 detector: Any = None, **options: Any) -> None:
        super().__init__()
        self.config = CascadeConfig.build(config, options, where="cascade")
        self.small, self.large, self.detector = small, large, detector
        self.last_fallback: torch.Tensor | None = None
        self.calls = 0
        self.fallback_rows = 0
        self.rows = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.small(x)
        fallback = F.softmax(logits.float(), dim=-1).amax(-1) < self.config.threshold
        if self.detector is not None:
            fallback |= self.detector.predict(x)
        if bool(fallback.any()):
            logits = logits.clone()
            logits[fallback] = self.large(x[fallback]).to(logits.dtype)
        self.last_fallback = fallback
        self.calls += 1
        self.rows += len(x)
        self.fallback_rows += int(fallback.sum())
        return logits

    @property
    def fallback_rate(self) -> float:
        return self.fallback_rows / self.rows if self.rows else 0.0
