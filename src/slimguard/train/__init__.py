"""The one training loop: fine-tuning, QAT, distillation and adversarial training all run through it."""

from slimguard.train.loop import Callback, FinetuneConfig, finetune

__all__ = ["Callback", "FinetuneConfig", "finetune"]
