"""Gradual magnitude pruning (AGP): sparsity grows on a cubic schedule while the model fine-tunes.

Paper: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
compression", 2017. At step ``t`` between ``t0`` and ``t1`` the target sparsity is

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3

updated every ``frequency`` steps; masks only grow and stay applied through training (the loop
re-applies them after every optimizer step), so the artifact stores them sparsely.

Example:
    >>> sg.prune_(model, sg.AGPConfig(sparsity=0.9, finetune=sg.FinetuneConfig(epochs=20)), data=data)
    >>> # or as a callback in your own fine-tuning:
    >>> cb = AGPCallback(sg.MagnitudePruningConfig(sparsity=0.9))
    >>> sg.finetune(model, data, cfg, callbacks=[cb])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.registry import register_handler
from slimguard.prune.importance import Importance, check_weight_importance, get_importance, prepare_importance
from slimguard.prune.magnitude import MagnitudePruningConfig, prune_unstructured
from slimguard.train.loop import Callback, FinetuneConfig, check_finetune, finetune, finetune_block


def agp_sparsity(step: int, total: int, final: float, initial: float = 0.0, start: float = 0.0,
                 end: float = 0.75) -> float:
    """Target sparsity at ``step`` of ``total`` (``start``/``end`` are fractions of the steps)."""
    t0, t1 = int(start * total), max(int(start * total) + 1, int(end * total))
    if step <= t0:
        return initial
    if step >= t1:
        return final
    return final + (initial - final) * (1.0 - (step - t0) / (t1 - t0)) ** 3


class AGPCallback(Callback):
    """Raise sparsity on the AGP schedule during :func:`~slimguard.train.loop.finetune`.

    Args:
        target: a :class:`MagnitudePruning` giving the final sparsity, scope, ignore and overrides
            (overrides are scaled by the same schedule).
        initial: sparsity at ``start`` (default 0).
        start, end: fractions of the training steps where pruning starts and reaches the target.
        frequency: steps between mask updates (default 10).
        importance: a ready importance (default from ``target.importance``).
    """

    def __init__(self, target: MagnitudePruningConfig, initial: float = 0.0, start: float = 0.0, end: float = 0.75,
                 frequency: int = 10, importance: Importance | None = None) -> None:
        self.target, self.initial, self.start, self.end = target, initial, start, end
        self.frequency = max(1, frequency)
        self.importance = importance or get_importance(target.importance)
        self.total = 1
        self.current = -1.0
        self.done = False
        self.history: list[tuple[int, float]] = []

    def _apply(self, model: nn.Module, step: int) -> None:
        s = agp_sparsity(step, self.total, self.target.sparsity, self.initial, self.start, self.end)
        if s <= self.current + 1e-9:
            return
        scale = s / self.target.sparsity if self.target.sparsity else 0.0
        cfg = dataclasses.replace(self.target, sparsity=s,
                                  overrides={k: v * scale for k, v in self.target.overrides.items()})
        prune_unstructured(model, cfg, self.importance)
        self.current = s
        self.history.append((step, s))

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.total = max(1, total_steps)
        self.done = False
        self.current = -1.0
        if self.initial > 0:
            self._apply(model, 0)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        t1 = max(int(self.start * self.total) + 1, int(self.end * self.total))
        if step % self.frequency == 0 or step >= t1:
            self._apply(model, step)
        if step >= t1:
            self.done = True

    def best_tracking_allowed(self, epoch: int) -> bool:
        return self.done


@register_config("agp")
@dataclasses.dataclass
class AGPConfig(Config):
    """Fine-tune while the sparsity rises on the AGP cubic schedule (a recipe step that trains).

    Args:
        sparsity: final sparsity in [0, 1) (default 0.9).
        initial_sparsity: sparsity at the start of pruning (default 0).
        start, end: fractions of training steps where pruning begins / reaches ``sparsity``
            (defaults 0 and 0.75: the last quarter fine-tunes at the final sparsity).
        frequency: optimizer steps between mask updates (default 10).
        scope: ``global`` (default) or ``layer``.
        importance: ``l1`` (default), ``l2``, ``taylor``, ``random``.
        ignore: modules to leave dense. overrides: per-layer final sparsity.
        finetune: the training options (:class:`FinetuneConfig`; default 10 epochs, patience 0, otherwise
            FinetuneConfig's defaults). In a recipe, keys the block leaves out keep these defaults.
    """

    sparsity: float = 0.9
    initial_sparsity: float = 0.0
    start: float = 0.0
    end: float = 0.75
    frequency: int = 10
    scope: Literal["global", "layer"] = "global"
    importance: str = "l1"
    ignore: list[str] = dataclasses.field(default_factory=list)
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    finetune: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig(epochs=10, patience=0))

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_inclusive=False)
        check_range("initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        check_range("start", self.start, 0.0, 1.0, high_inclusive=False)
        check_range("end", self.end, self.start, 1.0, low_inclusive=False)
        check_range("frequency", self.frequency, 1)
        check_weight_importance(self.importance)
        for name, s in self.overrides.items():
            check_range(f"overrides.{name}", s, 0.0, 1.0, high_inclusive=False)
        check_finetune(self.finetune)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], where: str = "") -> AGPConfig:
        where = where or cls.config_name
        return super().from_fields(finetune_block(cls, fields, where), where)

    def target(self) -> MagnitudePruningConfig:
        return MagnitudePruningConfig(sparsity=self.sparsity, scope=self.scope, ignore=list(self.ignore),
                                overrides=dict(self.overrides), importance=self.importance)


@register_handler("prune", AGPConfig)
def _agp(model: nn.Module, config: AGPConfig, *, data: Any = None, progress: bool = True,
         **context: Any) -> dict[str, Any]:
    if data is None:
        raise ConfigError("agp fine-tunes while pruning; it needs data (the recipe's data set)")
    target = config.target()
    imp = get_importance(config.importance)
    prepare_importance(imp, model, {"data": data, **context})
    cb = AGPCallback(target, config.initial_sparsity, config.start, config.end, config.frequency, imp)
    history = finetune(model, data, config.finetune, callbacks=[cb], progress=progress,
                       description=f"AGP to {config.sparsity:.0%}")
    if not cb.done:  # training stopped early: make the final sparsity hold anyway
        prune_unstructured(model, target, imp)
    return {"schedule": cb.history[-20:], "finetune": history, "final_sparsity": config.sparsity}
