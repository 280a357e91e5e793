"""Which device a training run uses, and moving the model there for training and back afterwards.

slimguard's pipeline keeps models where they are (the CPU for recipes): quantization, calibration and export
work on the CPU. Only training moves: :func:`slimguard.train.finetune` picks the device with
:func:`training_device`, moves the model, the modules its loss uses (a distillation teacher) and any extra
trained tensors there with :func:`placed`, moves every batch there, and puts everything back where it was
when training ends (also on error).

``FinetuneConfig.device`` (``device:`` in a recipe's ``finetune`` block) chooses:

* ``auto`` (default): under ``torchrun`` with NCCL (a machine with CUDA), this rank's ``cuda:LOCAL_RANK``
  (:func:`slimguard.train.distributed.device`); otherwise the model's own device, so a model the caller
  put on a GPU trains there and a CPU model on the CPU.
* ``cpu``, ``cuda`` or ``cuda:N``: that device. Under ``torchrun`` with NCCL ``cuda`` is this rank's GPU.

Example:
    >>> device = training_device(model, "auto")
    >>> with placed(device, [model, teacher]):
    ...     train(model)                       # on device; back on the CPU afterwards
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.core.torch_utils import device_of

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
"""What ``FinetuneConfig.device`` accepts (``N`` a GPU index)."""


def check_device(name: str, value: str) -> None:
    """ConfigError naming ``name`` unless ``value`` is one of :data:`DEVICES` (spelled right, not necessarily
    present on this machine: that is checked when training starts, so stored recipes load anywhere)."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return
    raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {', '.join(DEVICES)}")


def training_device(model: nn.Module, requested: str = "auto") -> torch.device:
    """The device :func:`slimguard.train.finetune` trains ``model`` on (see the module's docs for the rules).

    Raises:
        ConfigError: ``cuda`` asked for where torch finds no CUDA device, a GPU index this machine lacks, or,
            under ``torchrun``, another GPU than this rank's.
    """
    from slimguard.train import distributed

    nccl = distributed.is_initialized() and "nccl" in (distributed.backend() or "")
    if requested == "auto":
        return distributed.device() if nccl else device_of(model)
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"finetune.device: {requested!r} but torch finds no CUDA device on this machine; "
                          "use device: cpu (or auto)")
    if nccl:
        own = distributed.device()
        if requested != "cuda" and torch.device(requested) != own:
            raise ConfigError(f"finetune.device: {requested!r} under torchrun, where this rank's GPU is {own}; "
                              "write device: cuda (or auto)")
        return own
    if requested == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(requested.split(":")[1]), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"finetune.device: {requested!r} but this machine has {count} GPU(s); "
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


@contextlib.contextmanager
def placed(device: torch.device, modules: Sequence[nn.Module],
           parameters: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Move ``modules`` and loose ``parameters`` (trained tensors outside them) to ``device`` for the block,
    then each back to the device it was on (also on error).

    Modules already on ``device`` (by their first parameter or buffer) are not touched, so a CPU model
    training on the CPU sees no ``.to`` call at all. Tensors keep their identity (``nn.Module.to`` swaps a
    parameter's data in place), so an optimizer built inside the block trains the caller's parameters.
    A module spread over several devices comes back whole on its first parameter's device.
    """
    moved_modules: list[tuple[nn.Module, torch.device]] = []
    moved_params: list[tuple[torch.Tensor, torch.device]] = []
    seen: set[int] = set()
    try:
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            home = device_of(m)
            if home != device:
                m.to(device)
                moved_modules.append((m, home))
        for p in parameters:
            if p.device != device:
                moved_params.append((p, p.device))
                _move_tensor(p, device)
        yield
    finally:
        for p, home in reversed(moved_params):
            _move_tensor(p, home)
        for m, home in reversed(moved_modules):
            m.to(home)


def _move_tensor(p: torch.Tensor, device: torch.device) -> None:
    with torch.no_grad():
        p.data = p.data.to(device)
        if p.grad is not None:
            p.grad = p.grad.to(device)
