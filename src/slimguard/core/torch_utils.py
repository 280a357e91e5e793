"""Small torch helpers every layer shares: picking modules by name, eval mode, calling a model on a batch,
the model's device, and top-1 accuracy.

Each is written once here; techniques, measurement, attacks, detectors and the training loop use these
instead of their own copies, so "which layers does ``ignore=["enc"]`` leave alone" or "is the model's
mode restored after an evaluation" have one answer.

Example:
    >>> with eval_mode(model, requires_grad=False):        # eval, no parameter gradients; both restored
    ...     logits = forward(model, to_device(batch, device_of(model)))
    >>> [n for n in ("enc", "enc.fc", "encoder") if matches(n, ["enc"])]
    ['enc', 'enc.fc']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError

__all__ = ["accuracy", "device_of", "eval_mode", "forward", "matches", "select_modules", "to_device"]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` is one of ``patterns`` or lies under one of them.

    A pattern is a qualified module (or tensor) name and covers everything below it: ``"enc"`` matches
    ``"enc"`` and ``"enc.fc.weight"``, not ``"encoder"``. The empty pattern matches only the empty name
    (the root module).
    """
    return any(name == p or name.startswith(p + ".") for p in patterns)


def select_modules(model: nn.Module, kinds: type[nn.Module] | tuple[type[nn.Module], ...],
                   ignore: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The modules of ``kinds`` (``isinstance``, so subclasses count) by qualified name, leaving out every
    module :func:`matches` an ``ignore`` entry.

    Args:
        model: the model to walk (the root, named ``""``, is included when it is of ``kinds``).
        kinds: module class or classes to pick.
        ignore: qualified module names; each must name a module of ``model``, and the modules under it
            are left out too.

    Raises:
        ConfigError: an ``ignore`` entry names no module (the message lists a few that exist).
    """
    names = dict(model.named_modules())
    for entry in ignore:
        if entry not in names:
            raise ConfigError(f"ignore: {entry!r} names no module; modules are e.g. "
                              f"{', '.join(n for n in list(names)[1:6])}")
    return {n: m for n, m in names.items() if isinstance(m, kinds) and not matches(n, ignore)}


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, requires_grad: bool | None = None) -> Iterator[nn.Module]:
    """Eval mode for the block; every module's ``training`` flag is restored afterwards, even on error.

    Args:
        model: the model (yielded back, so ``with eval_mode(m) as m:`` reads naturally).
        requires_grad: also set every parameter's ``requires_grad`` for the block and restore each flag
            afterwards. ``False`` freezes the model (attacks and detectors that differentiate with respect
            to the input); ``True`` makes the floating-point parameters trainable (gradient-based
            importance); ``None`` (default) leaves the flags alone.

    Modules whose mode differed from the root's (a frozen BatchNorm in a training model) get their own
    mode back; modules added inside the block take the root's former mode.
    """
    was = model.training
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if requires_grad is not None else []
    model.eval()
    for p, _ in flags:
        if not requires_grad or p.is_floating_point() or p.is_complex():
            p.requires_grad_(bool(requires_grad))
    try:
        yield model
    finally:
        model.train(was)
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch: a dict as keyword arguments (token ids, attention mask), a tuple as
    positional arguments, anything else (a tensor, a list of texts) as the one argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else of its first buffer, else the CPU."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: a tensor, or the tensors of a dict or tuple; anything else (a list of texts)
    is returned as it is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def accuracy(model: nn.Module, x: Any, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on inputs ``x`` (a tensor, or a list of texts) with labels ``y``.

    Runs in batches of ``batch_size`` on the model's device, in eval mode (every mode restored after).

    Returns:
        The fraction of examples whose largest logit is the label; NaN for no examples.
    """
    if len(x) == 0:
        return float("nan")
    device = device_of(model)
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            pred = forward(model, to_device(x[i : i + batch_size], device)).argmax(-1).cpu()
            correct += int((pred == y[i : i + batch_size].cpu()).sum())
    return correct / len(x)
