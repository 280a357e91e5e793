"""Robustness: adversarial attacks, fake-quant twins for quantized models, adversarial training,
corruptions, and a before/after scorecard for compressed models.

Example:
    >>> import slimguard as sg
    >>> model, data = sg.zoo.load("digits-mlp"), sg.data.load("digits")
    >>> x, y = data.test.tensors
    >>> x_adv = sg.robust.PGD(eps=0.1)(model, x, y, bounds=data.meta.bounds())
    >>> card = sg.scorecard(model, data)
"""

from slimguard.core.torch_utils import accuracy as accuracy_on
from slimguard.robust.attacks import APGD, CW, FGSM, PGD, APGDConfig, CWConfig, FGSMConfig, PGDConfig
from slimguard.robust.base import (
    Attack,
    AttackConfig,
    frozen_eval,
    perturbation_norm,
    random_targets,
)
from slimguard.robust.corruptions import SEVERITIES, corrupt, names_for, register_corruption
from slimguard.robust.scorecard import Scorecard, attack_accuracy, scorecard
from slimguard.robust.training import AdversarialFinetuneConfig, adversarial_finetune, pgd_at_loss, trades_loss
from slimguard.robust.twin import fake_quant_twin, is_quantized, register_twin

__all__ = [
    "APGD",
    "CW",
    "FGSM",
    "PGD",
    "SEVERITIES",
    "APGDConfig",
    "AdversarialFinetuneConfig",
    "Attack",
    "AttackConfig",
    "CWConfig",
    "FGSMConfig",
    "PGDConfig",
    "Scorecard",
    "accuracy_on",
    "adversarial_finetune",
    "attack_accuracy",
    "corrupt",
    "fake_quant_twin",
    "frozen_eval",
    "is_quantized",
    "names_for",
    "perturbation_norm",
    "pgd_at_loss",
    "random_targets",
    "register_corruption",
    "register_twin",
    "scorecard",
    "trades_loss",
]
