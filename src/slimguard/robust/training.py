"""Adversarial training through the one training loop: PGD-AT and TRADES as ``loss_fn`` for ``finetune``.

* **PGD-AT** (Madry et al., ICLR 2018): train on PGD examples, ``CE(f(x_adv), y)`` (optionally mixed with
  the clean loss, ``clean_weight``).
* **TRADES** (Zhang et al., ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` where ``x_adv``
  maximises the KL term inside the eps ball.

``AdversarialFinetune`` is the recipe step ``adv-finetune`` (verb ``train``): put it after a pruning step
for robustness-aware compression (adversarially fine-tune the pruned model; masks are kept by the loop)::

    steps:
      - magnitude: {sparsity: 0.5}
      - adv-finetune: {method: pgd-at, eps: 0.1, finetune: {epochs: 3, lr: 0.0005}}

Example:
    >>> sg.robust.adversarial_finetune(model, data, sg.robust.AdversarialFinetune(eps=0.1))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import accuracy as accuracy_on
from slimguard.data.core import DataBundle
from slimguard.robust.attacks import PGD, PGDConfig
from slimguard.robust.base import Attack, direction, frozen_eval, project, resolve_bounds
from slimguard.train.distributed import unwrap
from slimguard.train.loop import FinetuneConfig, LossFn, check_finetune, finetune, register_trainer


def pgd_at_loss(attack: Attack, bounds: Any = None, clean_weight: float = 0.0) -> LossFn:
    """PGD-AT loss for :func:`~slimguard.train.finetune`: cross-entropy on ``attack``'s examples.

    Args:
        attack: the inner attack (usually :class:`~slimguard.robust.PGD`); run in eval mode, mode restored.
        bounds: the valid input range (default: the model's recorded data).
        clean_weight: weight of the clean cross-entropy in ``(1 - w) * adv + w * clean`` (default 0).
    """

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(unwrap(model), x, y, bounds=bounds)  # input gradients only: not through DDP
        adv = F.cross_entropy(model(x_adv), y)
        if clean_weight <= 0:
            return adv
        return (1 - clean_weight) * adv + clean_weight * F.cross_entropy(model(x), y)

    return loss


def trades_examples(model: nn.Module, x: torch.Tensor, eps: float, steps: int, alpha: float, norm: str,
                    bounds: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """TRADES' inner maximisation: PGD on ``KL(f(x) || f(x'))`` from ``x + 0.001 * N(0, 1)``."""
    low, high = (b.to(x.device) for b in bounds)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with frozen_eval(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = project(x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device), x, eps, norm, low, high)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
                (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = project(x_adv.detach() + alpha * direction(g, norm), x, eps, norm, low, high)
    return x_adv.detach()


def trades_loss(eps: float, steps: int = 7, alpha: float | None = None, beta: float = 6.0, norm: str = "linf",
                bounds: Any = None, seed: int = 0) -> LossFn:
    """TRADES loss for :func:`~slimguard.train.finetune` (Zhang et al., ICML 2019).

    Args:
        eps: radius of the ball in raw input units.
        steps: inner PGD steps on the KL term (default 7).
        alpha: inner step (default ``2.5 * eps / steps``).
        beta: weight of the robustness (KL) term (default 6.0, as in the paper).
        norm: ``linf`` (default) or ``l2``.
        bounds: the valid input range (default: the model's recorded data).
    """
    step = alpha if alpha else 2.5 * eps / steps
    calls = [0]

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = resolve_bounds(unwrap(model), bounds)
        calls[0] += 1
        x_adv = trades_examples(unwrap(model), x, eps, steps, step, norm, b, seed=seed + calls[0])
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * kl

    return loss


@register_config("adv-finetune")
@dataclasses.dataclass
class AdversarialFinetuneConfig(Config):
    """Adversarial training or fine-tuning (PGD-AT or TRADES) through the one training loop.

    Args:
        method: ``pgd-at`` (default) or ``trades``.
        eps: radius of the threat model in raw input units (fraction of each feature's range when
            ``relative``) (default 0.1).
        norm: ``linf`` (default) or ``l2``.
        steps: inner PGD steps (default 7).
        alpha: inner step size; 0 means ``2.5 * eps / steps`` (default 0).
        beta: TRADES weight of the KL term (default 6.0).
        clean_weight: PGD-AT only: weight of the clean loss, ``(1 - w) * adv + w * clean`` (default 0).
        relative: eps as a fraction of each feature's valid range (tabular data) (default False).
        select: what picks the best epoch on the validation split: ``robust`` accuracy, ``clean``
            accuracy, or their ``mean`` (default).
        val_examples: validation examples attacked per epoch for the selection (default 256).
        finetune: the training loop's options (epochs, lr, batch size, ...).
    """

    method: Literal["pgd-at", "trades"] = "pgd-at"
    eps: float = 0.1
    norm: Literal["linf", "l2"] = "linf"
    steps: int = 7
    alpha: float = 0.0
    beta: float = 6.0
    clean_weight: float = 0.0
    relative: bool = False
    select: Literal["robust", "clean", "mean"] = "mean"
    val_examples: int = 256
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        check_range("eps", self.eps, 0.0, None, low_inclusive=False)
        check_range("steps", self.steps, 1, 1000)
        check_range("alpha", self.alpha, 0.0, None)
        check_range("beta", self.beta, 0.0, None)
        check_range("clean_weight", self.clean_weight, 0.0, 1.0)
        check_range("val_examples", self.val_examples, 1, None)
        if self.relative and self.method == "trades":
            raise ConfigError("relative: true is supported for method pgd-at only; use pgd-at or raw eps")
        check_finetune(self.finetune)

    def attack(self, seed: int = 0) -> PGD:
        """The inner PGD attack of this config."""
        return PGD(PGDConfig(eps=self.eps, steps=self.steps, alpha=self.alpha or None, norm=self.norm,
                             relative=self.relative, seed=seed))


def adversarial_finetune(model: nn.Module, data: DataBundle, config: AdversarialFinetuneConfig | None = None, *,
                         progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place against the config's threat model; returns the loop's history.

    The best epoch is picked on the validation split by robust, clean or mean accuracy (``select``);
    pruning masks are respected after every step (the loop does it).

    Args:
        model: a float model with trainable parameters (pruned models are fine; quantize afterwards).
        data: a labelled image or tabular bundle.
        config: :class:`AdversarialFinetune` (default ``eps=0.1``, PGD-AT).
        progress: show a progress bar.
    """
    cfg = config or AdversarialFinetuneConfig()
    if data.task != "classification" or not torch.is_tensor(data.train.x):
        raise DataError(f"adversarial training needs labelled tensor data; {data.name!r} is {data.task}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("the model has no trainable parameters (int8 layers?); adversarially fine-tune "
                         "before quantizing, then quantize")
    bounds = data.meta.bounds()
    if cfg.method == "trades":
        loss_fn = trades_loss(cfg.eps, cfg.steps, cfg.alpha or None, cfg.beta, cfg.norm, bounds,
                              seed=cfg.finetune.seed)
    else:
        loss_fn = pgd_at_loss(cfg.attack(seed=cfg.finetune.seed), bounds, cfg.clean_weight)
    val_x, val_y = data.val.subset(cfg.val_examples, seed=cfg.finetune.seed).tensors
    val_attack = cfg.attack(seed=cfg.finetune.seed + 1)

    def score(m: nn.Module) -> float:
        clean = accuracy_on(m, val_x, val_y)
        if cfg.select == "clean":
            return clean
        robust = accuracy_on(m, val_attack(m, val_x, val_y, bounds=bounds), val_y)
        return robust if cfg.select == "robust" else 0.5 * (clean + robust)

    history = finetune(model, data, cfg.finetune, loss_fn=loss_fn, score_fn=score, progress=progress,
                       description=f"adversarial training ({cfg.method}, eps={cfg.eps:g})")
    history["selected_by"] = cfg.select
    return history


register_trainer(AdversarialFinetuneConfig, adversarial_finetune)
