"""The one training loop.

``finetune(model, data, FinetuneConfig(...))`` trains in place with AdamW/SGD and a cosine learning
rate, early-stops on the validation split (keeping the best weights), respects pruning masks after
every step, is seeded, shows a progress bar, and runs under DistributedDataParallel when
``torch.distributed`` is initialised (``torchrun``). It trains on the device ``FinetuneConfig.device`` picks
(:mod:`slimguard.train.placement`; the model comes back afterwards) and streams a user's DataLoader epoch by
epoch (:mod:`slimguard.train.batches`). Later techniques plug in through ``loss_fn``
(distillation, adversarial training) and :class:`Callback` (gradual pruning, QAT freezing).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import Registry, register_handler
from slimguard.core.torch_utils import accuracy as _accuracy
from slimguard.core.torch_utils import device_of, eval_mode, to_device
from slimguard.data.core import DataBundle, Split
from slimguard.train.batches import Batches, SplitBatches, StreamBatches, is_one_shot, stream_score
from slimguard.train.placement import check_device, placed, training_device
from slimguard.ui import progress as progress_bar

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]
TASK_TRAINERS: Registry[Callable[..., dict[str, Any]]] = Registry("task trainer")
"""Data task -> the trainer :func:`finetune` hands a bundle of that task to when no ``loss_fn`` is given
(``causal-lm``: :func:`slimguard.distill.causal_lm.finetune_causal_lm`, next-token cross-entropy)."""


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
        device: where to train: ``auto`` (default: this rank's GPU under ``torchrun`` with NCCL, else the
            model's own device), ``cpu``, ``cuda`` or ``cuda:N``. The model moves there for training and
            back afterwards (see :mod:`slimguard.train.placement`).
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
    device: str = "auto"

    def validate(self) -> None:
        check_range("epochs", self.epochs, 0, 10_000)
        check_range("lr", self.lr, 0.0, 10.0, low_inclusive=False)
        check_range("batch_size", self.batch_size, 1, 1 << 20)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("patience", self.patience, 0, 10_000)
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_inclusive=False)
        check_range("max_steps", self.max_steps, 0)
        check_device("device", self.device)


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


ScoreFn = Callable[[nn.Module, LossFn], float]
"""A default validation score: ``score(model, loss_fn) -> float``, higher is better."""


def training_data(data: Any, config: FinetuneConfig) -> tuple[Batches, ScoreFn | None]:
    """The train batches of what :func:`finetune` was given, and its default validation score (None when
    there is nothing to validate on).

    * A :class:`DataBundle` (``sg.data.load``, ``npz:`` files): its train split, held in memory and shuffled
      each epoch (:class:`~slimguard.train.batches.SplitBatches`); validation on its val split, by accuracy
      (classification with labels) or minus the mean loss.
    * A ``(train, val)`` pair of DataLoaders or iterables of ``(inputs, labels)`` batches: both streamed
      (:class:`~slimguard.train.batches.StreamBatches`), never gathered in memory; validation streams val
      after each epoch (accuracy when its labels are class indices, else minus the mean loss).
    * One DataLoader or iterable: streamed, without validation (every epoch runs; no early stopping, no
      best-epoch restore) unless ``finetune`` gets a ``score_fn``. Pass a pair to early-stop, or
      ``sg.data.bundle_from_batches(loader)`` to gather it in memory with a seeded 20% validation split.

    Raises:
        DataError: the bundle's train split is empty, ``data`` is not iterable, or a one-shot iterator (a
            generator) is given for more than one epoch.
    """
    if isinstance(data, DataBundle):
        if len(data.train) == 0:
            raise DataError("the train split is empty; nothing to fine-tune on")
        val = data.val
        score: ScoreFn | None = None
        if len(val) and data.task == "classification" and val.y is not None:
            def score(m: nn.Module, loss_fn: LossFn) -> float:
                return accuracy(m, val)
        elif len(val):
            def score(m: nn.Module, loss_fn: LossFn) -> float:
                return -mean_loss(m, val, loss_fn)
        return SplitBatches(data.train, config.batch_size, config.seed), score
    parts = {"train": data, "val": None}
    if isinstance(data, tuple) and len(data) == 2 and not torch.is_tensor(data[0]):
        parts = {"train": data[0], "val": data[1]}
    for what, part in parts.items():
        if part is None:
            continue
        if not isinstance(part, Iterable):
            raise DataError(f"cannot train on a {type(part).__name__}; pass a DataBundle (sg.data.load), a "
                            "DataLoader or an iterable of (inputs, labels) batches, or a (train, val) pair of "
                            "them")
        if config.epochs > 1 and is_one_shot(part):
            raise DataError(f"{what}: a one-shot iterator (generator) cannot be read again for each of "
                            f"{config.epochs} epochs; pass a re-iterable (a DataLoader or a list of batches), "
                            "or set epochs: 1")
    train = StreamBatches(parts["train"], "train")
    if parts["val"] is None:
        return train, None
    val_batches = StreamBatches(parts["val"], "val")

    def streamed(m: nn.Module, loss_fn: LossFn) -> float:
        return stream_score(m, val_batches, loss_fn)

    return train, streamed


def _schedule(total: int | None) -> Callable[[int], float]:
    """The learning-rate factor at step ``s``: cosine from 1 to 0.01 over ``total`` steps; constant 1 when the
    number of steps is unknown (a one-shot iterator without a length, and no ``max_steps``)."""
    if total is None:
        return lambda s: 1.0
    return lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total)))


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
    move_with: Sequence[nn.Module] = (),
) -> dict[str, Any]:
    """Train ``model`` in place and return a history ``{"epochs": [...], "best_epoch": k, "steps": n}``.

    Args:
        model: the model; its ``training`` flag and its device are restored afterwards.
        data: a bundle (trains on ``data.train`` in memory, early-stops on ``data.val``), or a ``DataLoader`` /
            iterable of ``(inputs, labels)`` batches, or a ``(train, val)`` pair of them, streamed epoch by
            epoch without being gathered in memory (:func:`training_data` says what each form does).
        config: :class:`FinetuneConfig` (defaults if None); its ``device`` says where to train.
        loss_fn: ``loss_fn(model, x, y) -> scalar``; default cross-entropy on labels. It gets batches on the
            training device.
        callbacks: :class:`Callback` objects (gradual pruning, QAT freezing, ...).
        extra_parameters: trained too (for example a distillation projection); moved with the model.
        score_fn: validation score, higher is better; default accuracy (classification) or minus the
            validation loss.
        progress: show a progress bar (unless quiet).
        description: the progress bar's label.
        move_with: other modules ``loss_fn`` or ``score_fn`` calls (a distillation teacher): moved to the
            training device with the model and back afterwards.

    Pruning masks (see :mod:`slimguard.prune.masks`) are re-applied after every optimizer step, so
    pruned weights stay exactly zero. Under ``torchrun`` the model trains inside DistributedDataParallel on
    this rank's device (``cuda:LOCAL_RANK`` with NCCL); see :mod:`slimguard.train.placement`.

    Example:
        >>> finetune(model, sg.data.load("digits"), FinetuneConfig(epochs=3))
        >>> finetune(model, (train_loader, val_loader), FinetuneConfig(epochs=3, device="cuda"))
    """
    cfg = config or FinetuneConfig()
    if loss_fn is None and isinstance(data, DataBundle) and data.task in TASK_TRAINERS:
        return TASK_TRAINERS.get(data.task)(model, data, cfg, callbacks=callbacks, progress=progress)
    batches, default_score = training_data(data, cfg)
    loss_fn = loss_fn or default_loss(cfg.label_smoothing)
    if isinstance(data, DataBundle) and not len(data.val):
        score_fn = None  # nothing to validate on
    elif score_fn is None and default_score is not None:
        def score_fn(m: nn.Module) -> float:
            return default_score(m, loss_fn)

    device = training_device(model, cfg.device)
    with placed(device, [model, *move_with], list(extra_parameters)):
        return _train(model, batches, cfg, device, loss_fn, callbacks, list(extra_parameters), score_fn,
                      progress, description)


def _train(model: nn.Module, batches: Batches, cfg: FinetuneConfig, device: torch.device, loss_fn: LossFn,
           callbacks: Sequence[Callback], extra_parameters: list[nn.Parameter],
           score_fn: Callable[[nn.Module], float] | None, progress: bool, description: str) -> dict[str, Any]:
    """:func:`finetune`'s loop, with everything already on ``device``."""
    from slimguard.core.masks import apply_masks

    torch.manual_seed(cfg.seed)
    is_dist, rank, world = _distributed()
    train_model: nn.Module = model
    if is_dist:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index]) if device.type == "cuda" else DDP(model)

    params = [p for p in model.parameters() if p.requires_grad] + extra_parameters
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = batches.steps_per_epoch()
    if steps_per_epoch is None and not cfg.max_steps and isinstance(batches, StreamBatches) \
            and not batches.one_shot:
        steps_per_epoch = batches.count_steps()  # a loader without a length: read once to size the schedule
    total: int | None = None if steps_per_epoch is None else steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = cfg.max_steps if total is None else min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total))
    for cb in callbacks:
        cb.on_train_begin(model, total or 0)

    was_training = model.training
    history: dict[str, Any] = {"epochs": [], "best_epoch": -1, "steps": 0}
    best_score, best_state, bad_epochs = -math.inf, None, 0
    step = 0
    with progress_bar(total or 0, description, enabled=progress and rank == 0) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            running, seen = 0.0, 0
            epoch_batches = batches.epoch(epoch)
            while not (cfg.max_steps and step >= cfg.max_steps):
                batch = next(epoch_batches, None)
                if batch is None:
                    break
                x, y, k = batch
                xb = to_device(x, device)
                yb = None if y is None else to_device(y, device)
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
                    cb.on_step_end(model, step, total or 0)
                running += loss.item() * k
                seen += k
                bar.advance(1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {running / max(1, seen):.4f}")
            if step == 0:
                raise DataError(f"the train data gave no batches to rank {rank} of {world}; give at least "
                                f"{world} (inputs, labels) batch(es)")
            if is_dist:  # rank 0's buffers (BatchNorm statistics) on every rank, then one score for all
                from slimguard.train.distributed import broadcast_buffers_, broadcast_float

                broadcast_buffers_(model)
            val = score_fn(model) if score_fn is not None else None
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
