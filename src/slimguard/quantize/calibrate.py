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


def calibration_split(calib: Split | None, data: Any, what: str, *, text_ok: bool = False) -> Split:
    """The split to calibrate on: ``calib``, else ``data.calib``.

    Raises:
        DataError: there is none, it is empty, or its inputs are not a tensor (text is allowed when
            ``text_ok``, for models that tokenize).
    """
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


def run_calibration(model: nn.Module, split: Split, batch_size: int, max_batches: int, what: str,
                    progress: bool = True) -> int:
    """Stream ``split`` through ``model`` (see :func:`calibrate`), ``batch_size`` examples at a time and at
    most ``max_batches`` batches (0: all); returns the batches seen."""
    total = -(-len(split) // batch_size)
    if max_batches:
        total = min(total, max_batches)
    return calibrate(model, calibration_batches(model, split, batch_size, max_batches), what, total=total,
                     progress=progress)
