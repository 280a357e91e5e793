"""Knowledge distillation: losses, teachers (ensembles), students built from teachers, and ``distill``."""

from slimguard.distill.core import DistillConfig, distill
from slimguard.distill.losses import (
    attention_kl,
    attention_transfer,
    embedding_loss,
    feature_loss,
    hard_ce,
    kd_loss,
    soft_kl,
)
from slimguard.distill.students import DropLayers, drop_layers_, pruned_student, width_student
from slimguard.distill.teachers import Ensemble

__all__ = [
    "DistillConfig", "DropLayers", "Ensemble", "attention_kl", "attention_transfer", "distill", "drop_layers_",
    "embedding_loss", "feature_loss", "hard_ce", "kd_loss", "pruned_student", "soft_kl", "width_student",
]
