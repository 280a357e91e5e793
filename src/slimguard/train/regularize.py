"""Regularisation for compressibility: penalties added to the training loss so that a later pruning
step finds whole channels it can remove.

* **Network slimming** (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network
  Slimming"): ``lambda * sum |gamma|`` over BatchNorm scales pushes unimportant channels' scales to
  zero; channel pruning by BN scale then removes them.
* **Group lasso** (Wen et al. 2016, "Learning Structured Sparsity in Deep Neural Networks"):
  ``lambda * sum_c ||W_c||_2`` over the output channels (rows) of Conv and Linear weights zeroes whole
  filters.

Both are loss additions for :func:`slimguard.train.loop.finetune` (``loss_fn=regularized(...)``) and a
recipe step ``sparsity-train``.

Example:
    >>> finetune(model, data, FinetuneConfig(epochs=5), loss_fn=regularized(bn_l1=1e-4))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, ModelError
from slimguard.core.torch_utils import matches
from slimguard.train.loop import (
    FinetuneConfig,
    LossFn,
    check_finetune,
    default_loss,
    finetune,
    finetune_block,
    register_trainer,
)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _bn_scales(model: nn.Module) -> list[torch.Tensor]:
    """The ``gamma`` of every affine BatchNorm layer."""
    return [m.weight for m in model.modules() if isinstance(m, _BN) and m.weight is not None]


def bn_l1(model: nn.Module) -> torch.Tensor:
    """``sum |gamma|`` over every affine BatchNorm layer (0 when there are none)."""
    terms = [w.abs().sum() for w in _bn_scales(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def group_lasso(model: nn.Module, ignore: Sequence[str] = ()) -> torch.Tensor:
    """``sum_c ||W_c||_2`` over output channels of Conv and Linear weights (names in ``ignore`` skipped)."""
    terms = []
    for name, m in model.named_modules():
        if matches(name, ignore):
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.weight.requires_grad:
            terms.append(m.weight.flatten(1).norm(dim=1).sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def regularized(base: LossFn | None = None, *, bn_l1_weight: float = 0.0, group_lasso_weight: float = 0.0,
                ignore: Sequence[str] = ()) -> LossFn:
    """A loss ``base(model, x, y) + bn_l1_weight * bn_l1 + group_lasso_weight * group_lasso``.

    Args:
        base: the task loss (default cross-entropy on labels).
        bn_l1_weight: network-slimming strength (typical 1e-5 to 1e-4).
        group_lasso_weight: group-lasso strength (typical 1e-5 to 1e-4).
        ignore: module names excluded from group lasso (e.g. the classifier head).
    """
    base = base or default_loss()

    def loss(model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        core = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
        out = base(model, x, y)
        if bn_l1_weight:
            out = out + bn_l1_weight * bn_l1(core).to(out.device)
        if group_lasso_weight:
            out = out + group_lasso_weight * group_lasso(core, ignore).to(out.device)
        return out

    return loss


def bn_scale_fraction_below(model: nn.Module, threshold: float = 1e-2) -> float:
    """Fraction of BatchNorm scales with ``|gamma| < threshold`` (what network slimming produces)."""
    gammas = [w.detach().abs().flatten() for w in _bn_scales(model)]
    if not gammas:
        return 0.0
    g = torch.cat(gammas)
    return float((g < threshold).float().mean())


@register_config("sparsity-train")
@dataclasses.dataclass
class SparsityTrainingConfig(Config):
    """Recipe step: fine-tune with sparsity-inducing penalties, before a structured pruning step.

    Args:
        bn_l1: network-slimming strength on BatchNorm scales (default 1e-4).
        group_lasso: group-lasso strength on output channels (default 0).
        ignore: module names excluded from group lasso (default none).
        finetune: the training loop's options (default 5 epochs of SGD at lr 0.01, patience 0, as in the
            paper: Adam rescales each parameter's step, which blunts the constant pull of an L1 penalty).
            In a recipe, keys the block leaves out keep these defaults; the old spelling with
            ``epochs``, ``lr``, ``batch_size``, ``optimizer``, ``weight_decay``, ``patience``, ``seed``
            beside the step's options is still read, with a deprecation warning.

    Example (recipe)::

        - sparsity-train: {bn_l1: 1.0e-4, finetune: {epochs: 5}}
    """

    bn_l1: float = 1e-4
    group_lasso: float = 0.0
    ignore: list[str] = dataclasses.field(default_factory=list)
    finetune: FinetuneConfig = dataclasses.field(
        default_factory=lambda: FinetuneConfig(epochs=5, lr=1e-2, optimizer="sgd", patience=0))

    # training options older recipes wrote beside the step's own (read into ``finetune``, with a warning)
    FLAT_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size", "optimizer",
                                                     "weight_decay", "patience", "seed")

    def validate(self) -> None:
        check_range("bn_l1", self.bn_l1, 0.0, 1.0)
        check_range("group_lasso", self.group_lasso, 0.0, 1.0)
        if self.bn_l1 == 0 and self.group_lasso == 0:
            raise ConfigError("bn_l1 and group_lasso are both 0; set at least one (e.g. bn_l1: 1.0e-4)")
        check_finetune(self.finetune)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], where: str = "") -> SparsityTrainingConfig:
        where = where or cls.config_name
        return super().from_fields(finetune_block(cls, fields, where, cls.FLAT_TRAINING_KEYS), where)


def sparsity_train(model: nn.Module, data: Any, config: SparsityTrainingConfig | None = None, *,
                   progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` in place with the penalties of ``config``; returns the loop's history plus the
    fraction of BN scales below 1e-2 before and after."""
    cfg = config or SparsityTrainingConfig()
    if cfg.bn_l1 and not _bn_scales(model):
        raise ModelError("bn_l1 needs BatchNorm layers and this model has none; use group_lasso instead")
    before = bn_scale_fraction_below(model)
    history = finetune(model, data, cfg.finetune,
                       loss_fn=regularized(bn_l1_weight=cfg.bn_l1, group_lasso_weight=cfg.group_lasso,
                                           ignore=cfg.ignore),
                       progress=progress, description="sparsity training")
    history["bn_small_before"] = before
    history["bn_small_after"] = bn_scale_fraction_below(model)
    return history


register_trainer(SparsityTrainingConfig, sparsity_train)
