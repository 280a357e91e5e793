"""Calibration: stream data through a model so that observers and hooks see real activations.

Static int8 and QAT (activation observers), GPTQ (input Hessians) and SmoothQuant (activation ranges)
all run the same loop: the model in eval mode (its mode restored afterwards, even on error), no
gradients, one batch at a time (nothing is held), and a one-line :class:`DataError` when a batch does not
fit the model. Text splits are tokenized with the model's own ``tokenize`` (sentence embedders).

Example:
    >>> split = calibration_split(calib, data, "Int8Static")        # checks there is usable data
    >>> seen = run_calibration(model, split, batch_size=64, max_batches=0, what="Int8Static")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import DataError
from slimguard.core.torch_utils import eval_mode, forward
from slimguard.data.core import Split
from slimguard.ui import progress as progress_bar


class UserCalibration:
    """Calibration data given as the user has it (as in ModelOpt's ``forward_loop``): a torch ``DataLoader``
    or any iterable of batches, a single tensor batch, or a callable ``forward_loop(model)`` that runs the
    model itself. Batches are model inputs: a tensor, a dict of tensors (``labels``/``label`` dropped), or a
    tuple/list ``(inputs, labels, ...)`` as DataLoaders of ``TensorDataset`` yield (the inputs used)."""

    name = "user calibration data"

    def __init__(self, source: Any) -> None:
        self.source = source

    def batches(self, max_batches: int = 0) -> Iterator[Any]:
        if callable(self.source) and not hasattr(self.source, "__iter__"):
            raise DataError("this method needs calibration batches, not a forward_loop; give a DataLoader or "
                            "an iterable of batches")
        items = [self.source] if torch.is_tensor(self.source) else self.source
        for n, batch in enumerate(items, start=1):
            if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], str):
                batch = batch[0]
            if isinstance(batch, dict):
                batch = {k: v for k, v in batch.items() if k not in ("labels", "label")}
            yield batch
            if max_batches and n >= max_batches:
                return

    def run(self, model: nn.Module, what: str, max_batches: int = 0, progress: bool = True) -> int:
        """Stream the batches through ``model`` (see :func:`calibrate`), or call ``forward_loop(model)``
        in eval mode without gradients; returns the batches seen (1 for a forward loop)."""
        if callable(self.source) and not hasattr(self.source, "__iter__"):
            with eval_mode(model), torch.no_grad():
                self.source(model)
            return 1
        return calibrate(model, self.batches(max_batches), what, progress=False)


def user_calibration(calib: Any) -> UserCalibration | None:
    """``calib`` wrapped as :class:`UserCalibration` when it is a DataLoader, an iterable of batches, a
    tensor or a forward loop; None for a :class:`Split` or None."""
    if calib is None or isinstance(calib, Split):
        return None
    if torch.is_tensor(calib) or callable(calib) or (hasattr(calib, "__iter__") and not isinstance(calib, str)):
        return UserCalibration(calib)
    raise DataError(f"calibration data of type {type(calib).__name__} is not usable; give a Split, a DataLoader, "
                    "an iterable of batches or a forward_loop(model)")


def calibration_split(calib: Any, data: Any, what: str, *, text_ok: bool = False) -> Any:
    """The split to calibrate on: ``calib``, else ``data.calib``; a DataLoader, an iterable of batches or
    a ``forward_loop(model)`` given as ``calib`` comes back as :class:`UserCalibration`.

    Raises:
        DataError: there is none, it is empty, or its inputs are not a tensor (text is allowed when
            ``text_ok``, for models that tokenize).
    """
    user = user_calibration(calib)
    if user is not None:
        return user
    split = calib if calib is not None else getattr(data, "calib", None)
    if split is None:
        raise DataError(f"{what} needs calibration data; pass calib=<a Split> (e.g. data.calib)")
    if len(split) == 0:
        raise DataError(f"{what}: the calibration split {split.name!r} is empty; give it at least one example")
    if not torch.is_tensor(split.x) and not (text_ok and isinstance(split.x, list)):
        raise DataError(f"{what}: calibration inputs must be a tensor, got {type(split.x).__name__}")
    return split


def check_input_shape(model: nn.Module, split: Split, what: str) -> None:
    """A DataError when the split's examples do not have the input shape recorded in the model's info."""
    from slimguard.models.spec import info

    if isinstance(split, UserCalibration) or not torch.is_tensor(split.x):  # batches / text: checked as it runs
        return
    try:
        shape = info(model).data.get("input_shape")
    except Exception:  # a plain nn.Module without slimguard info: nothing to compare with
        return
    if shape and tuple(split.x.shape[1:]) != tuple(shape):
        raise DataError(f"{what}: calibration examples have shape {tuple(split.x.shape[1:])}, the model takes "
                        f"{tuple(shape)}; calibrate with data of the model's input shape")


def calibration_batches(model: nn.Module, split: Split, batch_size: int, max_batches: int = 0) -> Iterator[Any]:
    """Inputs ready for the model, ``batch_size`` examples each: tensor slices, or tokenized texts (a dict
    of tensors) when the split holds strings. Stops after ``max_batches`` (0: the whole split)."""
    if isinstance(split, UserCalibration):
        yield from split.batches(max_batches)
        return
    if len(split) == 0:
        raise DataError(f"the calibration split {split.name!r} is empty; give it at least one example")
    for n, (x, _) in enumerate(split.batches(batch_size), start=1):
        if isinstance(x, list):
            tokenize = getattr(model, "tokenize", None)
            if not callable(tokenize):
                raise DataError("calibration data is text but the model has no tokenize(); give tensors")
            x = tokenize(x)
        yield x
        if max_batches and n >= max_batches:
            return


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in x.items() if torch.is_tensor(v))
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], what: str, *, total: int | None = None,
              progress: bool = True, after_batch: Callable[[], None] | None = None) -> int:
    """Run every batch through ``model`` in eval mode (mode restored after); returns the batches seen.

    Args:
        model: the model, with its observers or hooks already in place.
        batches: model inputs: tensors (``model(x)``) or dicts of tensors (``model(**x)``).
        what: the method's name, for messages and the progress bar.
        total: the number of batches, for the progress bar (None: no bar).
        progress: show a progress bar (default True).
        after_batch: called after each batch (e.g. to drop per-batch hook state).

    Raises:
        DataError: the model cannot run on a batch (wrong shape or type).
    """
    n = 0
    with eval_mode(model):
        with progress_bar(total or 0, f"calibrating ({what})", enabled=progress and total is not None) as bar:
            for x in batches:
                try:
                    forward(model, x)
                except RuntimeError as exc:
                    raise DataError(f"{what}: the model cannot run on calibration batch of shape {_describe(x)} "
                                    f"({str(exc).splitlines()[0]}); give data of the model's input shape") from None
                n += 1
                bar.advance(1)
                if after_batch is not None:
                    after_batch()
    return n


def shard_split(split: Split, batch_size: int, max_batches: int) -> Split:
    """This rank's share of the examples a single process would calibrate on (the first ``max_batches``
    batches, 0: all), split between the ranks without repeats; the whole of them outside a distributed run
    or when there are fewer examples than ranks."""
    from slimguard.train.distributed import shard_range, world_size

    used = min(len(split), max_batches * batch_size) if max_batches else len(split)
    if world_size() == 1 or used < world_size():
        return split
    idx = shard_range(used)
    x = [split.x[i] for i in idx.tolist()] if isinstance(split.x, list) else split.x[idx]
    y = None if split.y is None else split.y[idx]
    return Split(split.name, x, y, split.meta)


def run_calibration(model: nn.Module, split: Split, batch_size: int, max_batches: int, what: str,
                    progress: bool = True, *, shard: bool = False) -> int:
    """Stream ``split`` through ``model`` (see :func:`calibrate`), ``batch_size`` examples at a time and at
    most ``max_batches`` batches (0: all); returns the batches seen.

    With ``shard`` in a data-parallel run, each rank streams its share of those examples
    (:func:`shard_split`) and the model's observers are then reduced across ranks
    (:func:`~slimguard.quantize.observers.reduce_observers_`), so every rank ends with the statistics of all
    the data; the batches seen are then counted over every rank. Only methods whose statistics live in
    observers may shard (static int8, QAT's initial ranges).
    """
    from slimguard.train.distributed import all_reduce_float, world_size

    if isinstance(split, UserCalibration):
        return split.run(model, what, max_batches, progress)
    sharded = shard and world_size() > 1
    if sharded:
        split = shard_split(split, batch_size, max_batches)
        max_batches = 0
    total = -(-len(split) // batch_size)
    if max_batches:
        total = min(total, max_batches)
    seen = calibrate(model, calibration_batches(model, split, batch_size, max_batches), what, total=total,
                     progress=progress)
    if sharded:
        from slimguard.quantize.observers import reduce_observers_

        reduce_observers_(model)
        seen = int(all_reduce_float(seen, "sum"))
    return seen
