"""Gradient attacks: FGSM, PGD (L-inf / L2, random start, restarts), APGD (CE / DLR), Carlini-Wagner L2.

All take raw inputs and bounds from the data (see :mod:`slimguard.robust.base`), are batched, run on the
model's device, and leave the model's mode and ``requires_grad`` flags as they found them.

Example:
    >>> import slimguard as sg
    >>> model, data = sg.zoo.load("digits-mlp"), sg.data.load("digits")
    >>> x, y = data.test.tensors
    >>> x_adv = sg.robust.PGD(eps=0.1, steps=10)(model, x, y, bounds=data.meta.bounds())
    >>> sg.robust.accuracy_on(model, x_adv, y) < sg.robust.accuracy_on(model, x, y)
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from slimguard.core.config import check_choice, check_range, check_ranges
from slimguard.core.errors import ConfigError
from slimguard.robust.base import (
    OBJECTIVES,
    Attack,
    AttackConfig,
    Forward,
    direction,
    grad_of,
    perturbation_norm,
    project,
    random_start,
    success,
)


def _keep_best(best_x: torch.Tensor | None, best_key: torch.Tensor | None, x_new: torch.Tensor,
               key_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, keep the candidate with the larger key (success first, then objective)."""
    if best_x is None or best_key is None:
        return x_new.clone(), key_new.clone()
    better = key_new > best_key
    shape = (-1,) + (1,) * (x_new.ndim - 1)
    return torch.where(better.view(shape), x_new, best_x), torch.where(better, key_new, best_key)


def _budget(attack: Attack) -> float:
    """``eps`` of an attack that needs a budget (only CW may run without one)."""
    if attack.config.eps is None:
        raise ConfigError(f"{attack.name}: eps is None but this attack needs a budget; give one (e.g. 0.1)")
    return attack.config.eps


def _key(f: Forward, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
         objective: str) -> torch.Tensor:
    with torch.no_grad():
        logits = f(x_adv)
        obj = OBJECTIVES[objective](logits, y, target).float()
        # success dominates; among failures the larger objective is the stronger start for the next step
        return success(logits, y, target).float() * 1e6 + obj.clamp(-1e5, 1e5)


@dataclasses.dataclass
class FGSMConfig(AttackConfig):
    """Options of :class:`FGSM`: those of :class:`~slimguard.robust.base.AttackConfig` (eps default 0.1)."""


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): one step of size ``eps``.

    With ``norm="l2"`` it is the fast gradient method: one step of L2 length ``eps`` along the gradient.

    Args:
        config: :class:`FGSMConfig`, or its options as keywords: ``eps`` (raw input units, default 0.1),
            ``norm`` (``linf`` default, or ``l2``), ``relative``, ``batch_size``, ``seed``.

    Example:
        >>> x_adv = FGSM(eps=0.05)(model, x, y, bounds=data.meta.bounds())
    """

    name = "fgsm"
    config_class = FGSMConfig

    def _perturb(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps, norm = _budget(self), self.config.norm
        _, _, g = grad_of(f, x, y, target)
        return project(x + eps * direction(g, norm), x, eps, norm, low, high)


@dataclasses.dataclass
class PGDConfig(AttackConfig):
    """Options of :class:`PGD` (besides those of :class:`~slimguard.robust.base.AttackConfig`).

    Args:
        steps: gradient steps per restart (default 10).
        alpha: step size; None means ``2.5 * eps / steps`` (default None).
        random_start: start from a uniform point of the ball (default True).
        restarts: independent runs; per example the most successful one is kept (default 1).
        loss: ``ce`` (default) or ``dlr``.
    """

    steps: int = 10
    alpha: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"

    def validate(self) -> None:
        super().validate()
        check_ranges(self, ("steps", "restarts"), 1)
        check_choice("loss", self.loss, OBJECTIVES)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, math.inf, low_inclusive=False, high_inclusive=False)


class PGD(Attack):
    """Projected Gradient Descent (Madry et al., ICLR 2018), L-inf or L2, with random start and restarts.

    Args:
        config: :class:`PGDConfig`, or its options as keywords: ``eps`` (radius in raw input units,
            default 0.1), ``steps`` (10), ``alpha`` (``2.5 * eps / steps``), ``norm`` (``linf``),
            ``random_start`` (True), ``restarts`` (1), ``loss`` (``ce`` or ``dlr``), ``relative``,
            ``batch_size``, ``seed``.

    Example:
        >>> x_adv = PGD(eps=0.1, steps=20, restarts=2)(model, x, y, bounds=data.meta.bounds())
    """

    name = "pgd"
    config_class = PGDConfig
    config: PGDConfig

    @property
    def alpha(self) -> float:
        """The step size: ``alpha``, or ``2.5 * eps / steps`` when it is not set."""
        c = self.config
        return c.alpha if c.alpha is not None else 2.5 * (c.eps or 0.0) / c.steps

    def _resolved_settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def _perturb(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c, alpha, eps = self.config, self.alpha, _budget(self)
        best_x = best_key = None
        for _ in range(c.restarts):
            x_adv = x.clone()
            if c.random_start:
                x_adv = project(x + random_start(x, eps, c.norm, gen), x, eps, c.norm, low, high)
            for _ in range(c.steps):
                _, _, g = grad_of(f, x_adv, y, target, c.loss)
                x_adv = project(x_adv + alpha * direction(g, c.norm), x, eps, c.norm, low, high)
            best_x, best_key = _keep_best(best_x, best_key, x_adv, _key(f, x_adv, y, target, c.loss))
        assert best_x is not None  # restarts >= 1 (validated)
        return best_x


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations where APGD may halve its step: ``p_0 = 0, p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({round(q * steps) for q in p if 0 < q < 1 and round(q * steps) > 0})


@dataclasses.dataclass
class APGDConfig(AttackConfig):
    """Options of :class:`APGD` (besides those of :class:`~slimguard.robust.base.AttackConfig`).

    Args:
        steps: iterations per restart (default 20).
        loss: ``ce`` (default) or ``dlr`` (scale-invariant margin; targeted when a target is given).
        restarts: independent runs from random starts (default 1).
        rho: fraction of improving steps under which the step is halved at a checkpoint, in (0, 1]
            (default 0.75).
    """

    steps: int = 20
    loss: str = "ce"
    restarts: int = 1
    rho: float = 0.75

    def validate(self) -> None:
        super().validate()
        check_ranges(self, ("steps", "restarts"), 1)
        check_choice("loss", self.loss, OBJECTIVES)
        check_range("rho", self.rho, 0.0, 1.0, low_inclusive=False)


class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020): step size halves automatically, momentum 0.75, best point kept.

    With ``loss="ce"`` and ``loss="dlr"`` it gives the two white-box parts of AutoAttack (a lighter
    AutoAttack: run both and keep the per-example worst case, as :func:`~slimguard.robust.scorecard`
    does for ``apgd``).

    Args:
        config: :class:`APGDConfig`, or its options as keywords: ``eps`` (radius in raw input units,
            default 0.1), ``steps`` (20), ``norm`` (``linf``), ``loss`` (``ce`` or ``dlr``), ``restarts``
            (1), ``rho`` (0.75), ``relative``, ``batch_size``, ``seed``.

    Example:
        >>> x_adv = APGD(eps=0.1, loss="dlr")(model, x, y, bounds=data.meta.bounds())
    """

    name = "apgd"
    config_class = APGDConfig
    config: APGDConfig

    @property
    def label(self) -> str:
        return f"apgd-{self.config.loss}-{self.config.norm} eps={self.config.eps:g}"

    def _perturb(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        best_x = best_key = None
        loss = self.config.loss
        for _ in range(self.config.restarts):
            x_adv = self._one_run(f, x, y, target, low, high, gen)
            best_x, best_key = _keep_best(best_x, best_key, x_adv, _key(f, x_adv, y, target, loss))
        assert best_x is not None  # restarts >= 1 (validated)
        return best_x

    def _one_run(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        eps, norm = _budget(self), c.norm
        shape = (-1,) + (1,) * (x.ndim - 1)
        checkpoints = set(apgd_checkpoints(c.steps))
        x_adv = project(x + random_start(x, eps, norm, gen), x, eps, norm, low, high)
        logits, loss, g = grad_of(f, x_adv, y, target, c.loss)
        step = torch.full((len(x),), 2.0 * eps, device=x.device)
        best_loss, x_best, g_best = loss.clone(), x_adv.clone(), g.clone()
        won = success(logits, y, target)
        x_won = x_adv.clone()
        loss_at_ck, reduced_last = best_loss.clone(), torch.ones_like(won)
        improving = torch.zeros(len(x), device=x.device)
        prev_loss, x_prev, last_ck = loss.clone(), x_adv.clone(), 0
        for i in range(c.steps):
            with torch.no_grad():
                momentum = 0.75 if i > 0 else 1.0
                z = project(x_adv + step.view(shape) * direction(g, norm), x, eps, norm, low, high)
                z = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm,
                            low, high)
                x_prev, x_adv = x_adv, z
            logits, loss, g = grad_of(f, x_adv, y, target, c.loss)
            now = success(logits, y, target)
            x_won = torch.where((now & ~won).view(shape), x_adv, x_won)
            won |= now
            improving += (loss > prev_loss).float()
            prev_loss = loss
            better = loss > best_loss
            x_best = torch.where(better.view(shape), x_adv, x_best)
            g_best = torch.where(better.view(shape), g, g_best)
            best_loss = torch.where(better, loss, best_loss)
            if i + 1 in checkpoints:
                few_gains = improving < c.rho * (i + 1 - last_ck)
                stalled = ~reduced_last & (loss_at_ck >= best_loss)
                halve = few_gains | stalled
                reduced_last, loss_at_ck = halve, best_loss.clone()
                step = torch.where(halve, step / 2, step)
                x_adv = torch.where(halve.view(shape), x_best, x_adv)
                g = torch.where(halve.view(shape), g_best, g)
                improving.zero_()
                last_ck = i + 1
        return torch.where(won.view(shape), x_won, x_best)


@dataclasses.dataclass
class CWConfig(AttackConfig):
    """Options of :class:`CW` (besides those of :class:`~slimguard.robust.base.AttackConfig`; L2 only).

    Args:
        eps: optional L2 budget: examples whose smallest found perturbation is larger come back unchanged
            (so accuracy under CW can be read at a fixed budget); None = unbounded (default).
        c: initial trade-off constant, > 0 (default 1.0).
        kappa: confidence margin, >= 0 (default 0).
        steps: Adam steps per search step (default 50).
        lr: Adam learning rate in tanh space, > 0 (default 0.05).
        binary_search_steps: searches over ``c`` (default 5).
    """

    norms: ClassVar[tuple[str, ...]] = ("l2",)

    eps: float | None = None
    norm: str = "l2"
    c: float = 1.0
    kappa: float = 0.0
    steps: int = 50
    lr: float = 0.05
    binary_search_steps: int = 5

    def validate(self) -> None:
        super().validate()
        check_range("c", self.c, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        check_range("kappa", self.kappa, 0.0, math.inf, high_inclusive=False)
        check_range("steps", self.steps, 1)
        check_range("lr", self.lr, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        check_range("binary_search_steps", self.binary_search_steps, 1)


class CW(Attack):
    """Carlini-Wagner L2 attack (Carlini & Wagner, IEEE S&P 2017) with a binary search over ``c``.

    Minimises ``||x' - x||_2^2 + c * max(Z_y - max_{i != y} Z_i, -kappa)`` in tanh space (so ``x'`` always
    lies in the valid range) with Adam; per example the smallest successful perturbation is kept.

    Args:
        config: :class:`CWConfig`, or its options as keywords: ``eps`` (optional L2 budget, default
            None), ``c`` (1.0), ``kappa`` (0), ``steps`` (50), ``lr`` (0.05), ``binary_search_steps`` (5),
            ``relative``, ``batch_size``, ``seed``.

    Example:
        >>> x_adv = CW(steps=100)(model, x, y, bounds=data.meta.bounds())
    """

    name = "cw"
    config_class = CWConfig
    config: CWConfig

    def _margin(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(target if target is not None else y, logits.shape[1]).bool()
        chosen = logits.masked_fill(~onehot, -torch.inf).amax(1)
        other = logits.masked_fill(onehot, -torch.inf).amax(1)
        margin = other - chosen if target is not None else chosen - other
        return margin.clamp(min=-self.config.kappa)

    def _perturb(self, f: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 low: torch.Tensor, high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        width = (high - low).clamp_min(1e-12)
        shape = (-1,) + (1,) * (x.ndim - 1)
        w0 = torch.atanh(((x - low) / width * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        n = len(x)
        c = torch.full((n,), cfg.c, device=x.device)
        lo_c, hi_c = torch.zeros(n, device=x.device), torch.full((n,), 1e10, device=x.device)
        best_dist = torch.full((n,), torch.inf, device=x.device)
        best_x = x.clone()
        for _ in range(cfg.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(cfg.steps):
                with torch.enable_grad():
                    x_adv = low + width * (torch.tanh(w) + 1) / 2
                    logits = f(x_adv)
                    dist = (x_adv - x).flatten(1).pow(2).sum(1)
                    loss = (dist + c * self._margin(logits, y, target)).sum()
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                with torch.no_grad():
                    confident = cfg.kappa == 0 or self._margin(logits, y, target) <= -cfg.kappa
                    ok = success(logits, y, target) & confident
                    l2 = dist.sqrt()
                    better = ok & (l2 < best_dist)
                    best_dist = torch.where(better, l2, best_dist)
                    best_x = torch.where(better.view(shape), x_adv.detach(), best_x)
                    found |= ok
            hi_c = torch.where(found, torch.minimum(hi_c, c), hi_c)
            lo_c = torch.where(found, lo_c, torch.maximum(lo_c, c))
            c = torch.where(hi_c < 1e9, (lo_c + hi_c) / 2, c * 10)
        if cfg.eps is not None:
            too_far = perturbation_norm(best_x, x, "l2") > cfg.eps
            best_x = torch.where(too_far.view(shape), x, best_x)
        return torch.maximum(torch.minimum(best_x, high), low)
