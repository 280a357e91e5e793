"""The attack base: bounds, checks, batching, model-mode hygiene and the losses attacks maximise.

Every attack works in the model's **raw input space** (what a user would send): zoo models normalise
inside their first layer, so ``eps`` is measured in the units of the data, and every adversarial example
stays inside the valid range taken from the data's metadata (``split.meta.bounds()``, or the model's
recorded data when no bounds are given).

An attack is a small object with one job, ``_perturb(f, x, y, target, low, high, gen) -> x_adv``; the base
class's ``__call__`` does the rest (checks, batching, device, eval mode, frozen parameters, restoring both).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_choice, check_range
from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import device_of, eval_mode

Bounds = tuple[torch.Tensor | float, torch.Tensor | float]
Forward = Callable[[torch.Tensor], torch.Tensor]

NO_GRAD_HINT = (
    "the model has no gradient path from its input to its output (int8 kernels such as "
    "DynamicInt8Linear are not differentiable); attack its fake-quant twin instead: "
    "twin = sg.robust.fake_quant_twin(model), then evaluate the examples on the real model "
    "(sg.scorecard does both and reports both numbers)"
)


def frozen_eval(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter for the duration; both restored after
    (:func:`slimguard.core.torch_utils.eval_mode` with ``requires_grad=False``)."""
    return eval_mode(model, requires_grad=False)


def resolve_bounds(model: nn.Module, bounds: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid input range as float tensors: ``bounds`` (a pair, a DataMeta or a Split) or the model's data."""
    from slimguard.data.core import DataMeta, Split

    if isinstance(bounds, Split):
        bounds = bounds.meta
    if isinstance(bounds, DataMeta):
        bounds = bounds.bounds()
    if bounds is None:
        from slimguard.models.spec import maybe_info

        mi = maybe_info(model)
        if mi is None or not mi.data or "low" not in mi.data:
            raise DataError("the input range is unknown: pass bounds=split.meta.bounds() (or a (low, high) pair)")
        bounds = DataMeta.from_dict(mi.data).bounds()
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in bounds)
    if bool((high < low).any()):
        raise DataError("bounds: high is below low somewhere; pass (low, high) in that order")
    return low, high


def check_labels(y: torch.Tensor, num_outputs: int, what: str = "labels") -> None:
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_outputs:
        raise DataError(f"{what} go from {lo} to {hi} but the model has {num_outputs} outputs; "
                        f"use labels in [0, {num_outputs - 1}]")


# ---- the objectives attacks maximise (per example) ----------------------------------------------------
def ce_objective(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy to the true label (untargeted) or minus cross-entropy to the target (targeted)."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def dlr_objective(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein, ICML 2020): scale-invariant margin loss.

    Untargeted: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``; targeted: ``-(z_y - z_t) /
    (z_pi1 - (z_pi3 + z_pi4) / 2)`` (with fewer classes the lowest available logits stand in).
    """
    z = logits.float()
    srt = z.sort(dim=1, descending=True).values
    c = z.shape[1]
    zy = z.gather(1, y[:, None]).squeeze(1)
    if target is None:
        other = z.masked_fill(F.one_hot(y, c).bool(), -math.inf).amax(1)
        denom = srt[:, 0] - srt[:, min(2, c - 1)] + 1e-12
        return -(zy - other) / denom
    zt = z.gather(1, target[:, None]).squeeze(1)
    denom = srt[:, 0] - 0.5 * (srt[:, min(2, c - 1)] + srt[:, min(3, c - 1)]) + 1e-12
    return -(zy - zt) / denom


OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "ce": ce_objective,
    "dlr": dlr_objective,
}


def success(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example: misclassified (untargeted) or classified as the target (targeted)."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def grad_of(f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
            objective: str = "ce") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, objective per example, d objective / d x)``; ModelError when no gradient reaches ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = f(x)
        loss = OBJECTIVES[objective](logits, y, target)
        if not loss.requires_grad:
            raise ModelError(NO_GRAD_HINT)
        (g,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    if g is None or any("autograd kernel was not registered" in str(w.message) for w in caught):
        raise ModelError(NO_GRAD_HINT)
    return logits.detach(), loss.detach(), g.detach()


# ---- norms -------------------------------------------------------------------------------------------
def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.ndim - 1))


def direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for the norm: ``sign(g)`` (L-inf) or ``g / ||g||`` (L2)."""
    return g.sign() if norm == "linf" else g / _flat_norm(g)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, low: torch.Tensor,
            high: torch.Tensor) -> torch.Tensor:
    """Project onto the eps ball around ``x``, then clip to the valid range (which keeps it in the ball)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return torch.maximum(torch.minimum(x + delta, high), low)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a random direction at a uniform radius of the L2 ball."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * eps
    d = torch.randn(x.shape, generator=gen, device=x.device)
    r = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=gen, device=x.device)
    return d / _flat_norm(d) * r * eps


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of ``x_adv - x`` in the given norm."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@dataclasses.dataclass
class AttackConfig(Config):
    """Options every attack shares (each attack's config adds its own).

    Args:
        eps: size of the perturbation budget in raw input units (or a fraction of each feature's range when
            ``relative``); must be finite and >= 0 (0 means no attack) and not beyond the input range.
        norm: ``linf`` or ``l2``.
        relative: measure ``eps`` as a fraction of the valid range of every feature (for tabular data whose
            features have different scales); the attack then runs in the rescaled ``[0, 1]`` space.
        batch_size: examples attacked at once (default 256).
        seed: seed of random starts (default 0).
    """

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    eps: float | None = 0.1
    norm: str = "linf"
    relative: bool = False
    batch_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        if self.eps is not None:
            check_range("eps", self.eps, 0.0, math.inf, high_inclusive=False)
        check_choice("norm", self.norm, self.norms)
        check_range("batch_size", self.batch_size, 1)


class Attack(abc.ABC):
    """Base of every attack. Subclasses set ``name`` and ``config_class`` and implement :meth:`_perturb`.

    An attack takes its config, or the config's options as keywords (``PGD(eps=0.1)`` is
    ``PGD(PGDConfig(eps=0.1))``); ``attack.config`` holds them (see :class:`AttackConfig`).

    Calling ``attack(model, x, y, target=None, bounds=None)`` returns adversarial inputs of ``x``'s shape:
    untargeted (make the model miss ``y``) or, with ``target``, targeted (make it answer ``target``).
    """

    name: ClassVar[str] = "attack"
    config_class: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | None = None, **options: Any) -> None:
        self.config = self.config_class.build(config, options, where=self.name)

    # ---- description ------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """JSON description of the attack (recorded by the scorecard): its options, batch size aside."""
        out: dict[str, Any] = {"attack": self.name}
        out.update((f.name, getattr(self.config, f.name)) for f in dataclasses.fields(self.config)
                   if f.name != "batch_size")
        out.update(self._resolved_settings())
        return out

    def _resolved_settings(self) -> dict[str, Any]:
        """Options whose value is derived when left unset (PGD's step size)."""
        return {}

    @property
    def label(self) -> str:
        eps = "" if self.config.eps is None else f" eps={self.config.eps:g}"
        return f"{self.name}-{self.config.norm}{eps}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # ---- running ----------------------------------------------------------------------------------------
    def _check_eps(self, low: torch.Tensor, high: torch.Tensor, numel: int) -> None:
        c = self.config
        if c.eps is None:
            return
        width = torch.ones(()) if c.relative else (high - low)
        limit = float(width.max()) if c.norm == "linf" else float(
            (width.expand(numel) if width.numel() == 1 else width).float().norm())
        if c.eps > limit + 1e-9:
            unit = "fraction of the range" if c.relative else "input units"
            raise ConfigError(f"{self.name}: eps {c.eps:g} is beyond the input range ({c.norm} size "
                              f"{limit:g} in {unit}); use a smaller eps")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None,
                 bounds: Any = None) -> torch.Tensor:
        """Adversarial versions of ``x`` (same shape, same device as ``x``).

        Shape:
            ``x``: ``(N, *input_shape)`` raw inputs inside the bounds; ``y``, ``target``: ``(N,)`` labels.
        """
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise DataError(f"{self.name}: inputs must be a float tensor (N, *input_shape); text is not attackable")
        if len(x) != len(y) or (target is not None and len(target) != len(y)):
            raise DataError(f"{self.name}: {len(x)} inputs but {len(y)} labels"
                            + ("" if target is None else f" and {len(target)} targets"))
        from slimguard.robust.twin import is_quantized

        if is_quantized(model):  # integer kernels: no (or zero) gradients; the twin carries them
            raise ModelError(NO_GRAD_HINT)
        low, high = (b.to(x.device) for b in resolve_bounds(model, bounds))  # per-feature bounds beside x
        self._check_eps(low, high, int(x[0].numel()) if len(x) else 1)
        if len(x) == 0:
            return x.clone()
        tol = 1e-5 * float((high - low).abs().max().clamp_min(1.0))
        if bool((x < low - tol).any()) or bool((x > high + tol).any()):
            raise DataError(f"{self.name}: inputs lie outside the valid range [{float(low.min()):g}, "
                            f"{float(high.max()):g}]; pass raw (unnormalised) inputs and the data's bounds")
        device = device_of(model)
        low, high = low.to(device), high.to(device)
        gen = torch.Generator(device=device).manual_seed(self.config.seed)
        bs = self.config.batch_size
        outs = []
        with frozen_eval(model):
            for i in range(0, len(x), bs):
                xb = x[i : i + bs].to(device).float()
                yb = y[i : i + bs].to(device).long()
                tb = None if target is None else target[i : i + bs].to(device).long()
                if i == 0:  # one tiny forward/backward: label range and a gradient path to the input
                    n_out = model(xb[:1]).shape[-1]
                    check_labels(y, n_out)
                    if target is not None:  # exactly when tb is not None
                        check_labels(target, n_out, "targets")
                    grad_of(model, xb[:1], yb[:1], None if tb is None else tb[:1])
                outs.append(self._run_batch(model, xb, yb, tb, low, high, gen).to(x.device))
        return torch.cat(outs).to(x.dtype)

    def _run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                   low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xb = torch.maximum(torch.minimum(x, high), low)
        if self.config.eps == 0:
            return xb.clone()
        if not self.config.relative:
            return self._perturb(model, xb, y, target, low, high, gen).detach()
        width = (high - low).clamp_min(1e-12)

        def f(u: torch.Tensor) -> torch.Tensor:
            return model(low + u * width)

        zero, one = torch.zeros_like(width), torch.ones_like(width)
        u = self._perturb(f, (xb - low) / width, y, target, zero, one, gen).detach()
        return torch.maximum(torch.minimum(low + u * width, high), low)

    @abc.abstractmethod
    def _perturb(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Adversarial ``x`` for one batch on ``f``'s device, inside ``[low, high]`` and the eps ball."""


def random_targets(y: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A seeded random target label different from the true one, for every example."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, y.shape, generator=g)
    return (y.cpu() + shift) % num_classes
