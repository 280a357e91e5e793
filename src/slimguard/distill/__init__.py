"""Knowledge distillation: losses, teachers (ensembles), students built from teachers, and ``distill``.

``sg.distill`` names both this package and the verb: once the package is imported, Python binds the
attribute ``slimguard.distill`` to it, so the package itself is callable and forwards to
:func:`slimguard.distill.core.distill`. ``sg.distill(teacher, student, data, cfg)`` therefore works
whatever was imported first.
"""

import sys
import types

from slimguard.distill.core import DistillConfig, distill
from slimguard.distill.losses import (
    attention_kl,
    attention_transfer,
    causal_lm_kd_loss,
    causal_lm_kl,
    embedding_loss,
    feature_loss,
    hard_ce,
    kd_loss,
    next_token_ce,
    soft_kl,
)
from slimguard.distill.students import DropLayersConfig, drop_layers_, pruned_student, width_student
from slimguard.distill.teachers import Ensemble

__all__ = [
    "DistillConfig", "DropLayersConfig", "Ensemble", "attention_kl", "attention_transfer", "causal_lm_kd_loss",
    "causal_lm_kl", "distill", "drop_layers_", "embedding_loss", "feature_loss", "hard_ce", "kd_loss",
    "next_token_ce", "pruned_student", "soft_kl", "width_student",
]


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`distill`."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
