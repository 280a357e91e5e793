"""The one training loop.

``finetune(model, data, FinetuneConfig(...))`` trains in place with AdamW/SGD and a cosine learning
rate, early-stops on the validation split (keeping the best weights), respects pruning masks after
every step, is seeded, shows a progress bar, and runs under DistributedDataParallel when
``torch.distributed`` is initialised (``torchrun``). Later techniques plug in through ``loss_fn``
(distillation, adversarial training) and :class:`Callback` (gradual pruning, QAT freezing).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import accuracy as _accuracy
from slimguard.core.torch_utils import device_of, eval_mode, to_device
from slimguard.data.core import DataBundle, Split, bundle_from_batches
from slimguard.ui import progress as progress_bar

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


@register_config("finetune")
@dataclasses.dataclass
class FinetuneConfig(Config):
    """Options of the training loop.

    Args:
        epochs: passes over the train split (default 3).
        lr: peak learning rate (default 1e-3), decayed by a cosine schedule to ``lr * 0.01``.
        batch_size: examples per step (default 64).
        optimizer: ``adamw`` (default) or ``sgd`` (momentum 0.9, nesterov).
        weight_decay: decoupled weight decay (default 0).
        patience: epochs without validation improvement before stopping; 0 disables (default 3).
        restore_best: put back the weights of the best validation epoch at the end (default True).
        label_smoothing: for the default cross-entropy loss (default 0).
        seed: seed of shuffling and initialisation (default 0).
        max_steps: stop after this many optimizer steps; 0 means no limit (default 0).
    """

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    patience: int = 3
    restore_best: bool = True
    label_smoothing: float = 0.0
    seed: int = 0
    max_steps: int = 0

    def validate(self) -> None:
        check_range("epochs", self.epochs, 0, 10_000)
        check_range("lr", self.lr, 0.0, 10.0, low_inclusive=False)
        check_range("batch_size", self.batch_size, 1, 1 << 20)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("patience", self.patience, 0, 10_000)
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_inclusive=False)
        check_range("max_steps", self.max_steps, 0)


def finetune_block(step: type[Config], fields: Any, where: str, flat: Sequence[str] = ()) -> Any:
    """Recipe fields of a step that trains (``distill``, ``sparsity-train``, ...), with its training
    options in the one nested ``finetune:`` block.

    * Keys the block leaves out keep the step's own default block (``distill`` trains 10 epochs by
      default, ``sparsity-train`` uses SGD at lr 0.01), not :class:`FinetuneConfig`'s.
    * Older recipes wrote some training options (``flat``) beside the step's own; they are moved into
      the block with a ``FutureWarning`` (shown to command-line users too) naming the new spelling.
      Giving a key both ways is refused.

    Steps call it from their ``from_fields``; ``fields`` that are not a mapping pass through unchanged
    (``from_fields`` then says what is wrong).
    """
    if not isinstance(fields, dict):
        return fields
    fields = dict(fields)
    moved = {k: fields.pop(k) for k in flat if k in fields}
    block = fields.get("finetune")
    if isinstance(block, dict) and "_type" in block:  # a stored config (manifest): complete as it is
        if moved:
            raise ConfigError(f"{where}: {', '.join(moved)} given beside a stored finetune block; drop them")
        return fields
    if block is None and not moved:
        return fields
    if block is not None and not isinstance(block, dict):
        return fields  # from_fields reports the type
    block = block or {}
    both = sorted(set(moved) & set(block))
    if both:
        raise ConfigError(f"{where}: {both[0]!r} is given both beside the step and in its finetune block; "
                          "keep the one in finetune")
    if moved:
        spelled = ", ".join(f"{k}: {v!r}" for k, v in moved.items())
        warnings.warn(f"{where}: training options beside the step ({', '.join(moved)}) are deprecated; "
                      f"write them in its finetune block: finetune: {{{spelled}}}", FutureWarning,
                      stacklevel=3)
    factory = next(f for f in dataclasses.fields(step) if f.name == "finetune").default_factory
    default = factory() if callable(factory) else FinetuneConfig()
    fields["finetune"] = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default)}, **moved,
                          **block}
    return fields


def check_finetune(value: Any) -> None:
    """ConfigError unless ``value`` is a :class:`FinetuneConfig` (a step's ``finetune`` field)."""
    if not isinstance(value, FinetuneConfig):
        raise ConfigError(f"finetune: expected a FinetuneConfig, got {type(value).__name__}; "
                          "write finetune=FinetuneConfig(epochs=...)")


class Callback:
    """Hooks into :func:`finetune`. Override what you need; each gets the model being trained."""

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None: ...

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int, val_score: float | None) -> None: ...

    def best_tracking_allowed(self, epoch: int) -> bool:
        """False while the model is still changing shape or sparsity (early stopping waits)."""
        return True


def default_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    return loss


def _take(x: Any, idx: torch.Tensor) -> Any:
    if torch.is_tensor(x):
        return x[idx]
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return [x[i] for i in idx.tolist()]


def accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy on a labelled split (model mode saved and restored); 0.0 for an empty split."""
    if len(split) == 0:
        return 0.0
    if split.y is None:
        raise DataError(f"split {split.name!r} has no labels; accuracy needs labelled data")
    return _accuracy(model, split.x, split.y, batch_size)


@torch.no_grad()
def mean_loss(model: nn.Module, split: Split, loss_fn: LossFn, batch_size: int = 512) -> float:
    device = device_of(model)
    total, n = 0.0, 0
    with eval_mode(model):
        for xb, yb in split.batches(batch_size):
            k = len(xb)
            total += float(loss_fn(model, to_device(xb, device), to_device(yb, device))) * k
            n += k
    return total / max(1, n)


def _distributed() -> tuple[bool, int, int]:
    from slimguard.train import distributed

    return distributed.is_initialized(), distributed.rank(), distributed.world_size()


def as_bundle(data: Any) -> DataBundle:
    """``data`` as a bundle: a :class:`DataBundle` as it is; a torch ``DataLoader`` or any iterable of
    ``(inputs, labels)`` batches as the train split (val: a seeded 20% of it); a pair ``(train, val)`` of
    those as both (see :func:`slimguard.data.core.bundle_from_batches`, which gathers them in memory)."""
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, tuple) and len(data) == 2 and not torch.is_tensor(data[0]):
        return bundle_from_batches(data[0], data[1])
    try:
        iter(data)
    except TypeError:
        raise DataError(f"cannot train on a {type(data).__name__}; pass a DataBundle (sg.data.load), a DataLoader "
                        "or an iterable of (inputs, labels) batches, or a (train, val) pair of them") from None
    return bundle_from_batches(data)


def finetune(
    model: nn.Module,
    data: DataBundle | Any,
    config: FinetuneConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[Callback] = (),
    extra_parameters: Sequence[nn.Parameter] = (),
    score_fn: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    description: str = "fine-tuning",
) -> dict[str, Any]:
    """Train ``model`` in place and return a history ``{"epochs": [...], "best_epoch": k, "steps": n}``.

    Args:
        model: the model; its ``training`` flag is restored afterwards.
        data: a bundle (trains on ``data.train``, early-stops on ``data.val``), or a ``DataLoader`` / iterable
            of ``(inputs, labels)`` batches, or a ``(train, val)`` pair of them (:func:`as_bundle`).
        config: :class:`FinetuneConfig` (defaults if None).
        loss_fn: ``loss_fn(model, x, y) -> scalar``; default cross-entropy on labels.
        callbacks: :class:`Callback` objects (gradual pruning, QAT freezing, ...).
        extra_parameters: trained too (for example a distillation projection).
        score_fn: validation score, higher is better; default accuracy (classification) or minus the
            validation loss.
        progress: show a progress bar (unless quiet).

    Pruning masks (see :mod:`slimguard.prune.masks`) are re-applied after every optimizer step, so
    pruned weights stay exactly zero.

    Example:
        >>> finetune(model, sg.data.load("digits"), FinetuneConfig(epochs=3))
    """
    from slimguard.core.masks import apply_masks

    cfg = config or FinetuneConfig()
    data = as_bundle(data)
    if len(data.train) == 0:
        raise DataError("the train split is empty; nothing to fine-tune on")
    loss_fn = loss_fn or default_loss(cfg.label_smoothing)
    if score_fn is None:
        if data.task == "classification" and data.val.y is not None:
            def score_fn(m: nn.Module) -> float:
                return accuracy(m, data.val)
        else:
            def score_fn(m: nn.Module) -> float:
                return -mean_loss(m, data.val, loss_fn)

    torch.manual_seed(cfg.seed)
    device = device_of(model)
    is_dist, rank, world = _distributed()
    train_model: nn.Module = model
    if is_dist:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)

    params = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    n = len(data.train)
    per_rank = math.ceil(n / world)
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total)))
    )
    for cb in callbacks:
        cb.on_train_begin(model, total)

    was_training = model.training
    history: dict[str, Any] = {"epochs": [], "best_epoch": -1, "steps": 0}
    best_score, best_state, bad_epochs = -math.inf, None, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    with progress_bar(total, description, enabled=progress and rank == 0) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            if is_dist:  # this rank's shard, padded so that every rank takes the same number of steps
                from slimguard.train.distributed import shard_indices

                perm = shard_indices(perm)
            running, seen = 0.0, 0
            for i in range(0, len(perm), cfg.batch_size):
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                idx = perm[i : i + cfg.batch_size]
                xb = to_device(_take(data.train.x, idx), device)
                yb = None if data.train.y is None else to_device(data.train.y[idx], device)
                loss = loss_fn(train_model, xb, yb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if is_dist and extra_parameters:  # outside the DDP wrapper: average their gradients here
                    from slimguard.train.distributed import all_reduce_

                    for p in extra_parameters:
                        if p.grad is not None:
                            all_reduce_(p.grad, "mean")
                opt.step()
                sched.step()
                apply_masks(model)
                step += 1
                for cb in callbacks:
                    cb.on_step_end(model, step, total)
                running += loss.item() * len(idx)
                seen += len(idx)
                bar.advance(1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {running / max(1, seen):.4f}")
            if is_dist:  # rank 0's buffers (BatchNorm statistics) on every rank, then one score for all
                from slimguard.train.distributed import broadcast_buffers_, broadcast_float

                broadcast_buffers_(model)
            val = score_fn(model) if len(data.val) else None
            if is_dist and val is not None:  # every rank takes the same early-stopping decision
                val = broadcast_float(val)
            history["epochs"].append({"epoch": epoch, "train_loss": running / max(1, seen), "val_score": val})
            for cb in callbacks:
                cb.on_epoch_end(model, epoch, val)
            tracking = all(cb.best_tracking_allowed(epoch) for cb in callbacks)
            if val is not None and tracking:
                if val > best_score + 1e-12:
                    best_score, bad_epochs = val, 0
                    history["best_epoch"] = epoch
                    if cfg.restore_best:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
                    if cfg.patience and bad_epochs >= cfg.patience:
                        break
            if cfg.max_steps and step >= cfg.max_steps:
                break
    if best_state is not None and cfg.restore_best:
        model.load_state_dict(best_state)
        apply_masks(model)
    history["steps"] = step
    history["best_val_score"] = None if best_score == -math.inf else best_score
    model.train(was_training)
    return history


def register_trainer(config_type: type, train: Callable[..., dict[str, Any]]) -> None:
    """Make ``train(model, data, config, progress=...)`` the recipe step (verb ``train``) for configs of
    ``config_type``; fine-tuning, sparsity training and adversarial training register this way."""

    def step(model: nn.Module, config: Any, *, data: DataBundle, progress: bool = True, **_: Any) -> dict[str, Any]:
        return train(model, data, config, progress=progress)

    register_handler("train", config_type)(step)


register_trainer(FinetuneConfig, finetune)
