"""Pruning masks kept as non-persistent buffers next to the weights they mask.

A mask for ``module.weight`` lives in ``module.weight_mask`` (a bool buffer, not in ``state_dict``), so
it follows ``.to(device)`` and ``deepcopy`` and never changes the checkpoint layout. The training loop
calls :func:`apply_masks` after every optimizer step; artifacts store masked tensors sparsely and rebuild
the masks from the stored zeros on load.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

SUFFIX = "_mask"


def set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Attach (or replace) the mask of ``module.<name>`` and zero the masked entries now."""
    param = getattr(module, name)
    if mask.shape != param.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(param.shape)}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    buf = name + SUFFIX
    if buf in module._buffers:
        module._buffers[buf] = mask
    else:
        module.register_buffer(buf, mask, persistent=False)
    with torch.no_grad():
        param.mul_(mask)


def get_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    return module._buffers.get(name + SUFFIX)


def remove_mask(module: nn.Module, name: str) -> None:
    module._buffers.pop(name + SUFFIX, None)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yield ``(qualified_param_name, module, param_name, mask)`` for every masked parameter."""
    for mname, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None or not bname.endswith(SUFFIX):
                continue
            pname = bname[: -len(SUFFIX)]
            if pname in module._parameters or pname in module._buffers:
                yield (f"{mname}.{pname}" if mname else pname), module, pname, buf


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked entry (call after each optimizer step)."""
    for _, module, pname, mask in iter_masks(model):
        t = getattr(module, pname)
        if t.shape == mask.shape:
            t.mul_(mask)


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among weights of Linear/Conv layers."""
    total = zeros = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and torch.is_tensor(w):
            total += w.numel()
            zeros += int((w == 0).sum())
    return zeros / max(1, total)
