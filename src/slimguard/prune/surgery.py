"""Physical surgery helpers: keep a subset of indices of a parameter (and its mask) along one dim."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.core.masks import SUFFIX


@torch.no_grad()
def keep_slices(module: nn.Module, names: tuple[str, ...], dim: int, keep: torch.Tensor) -> int:
    """Replace ``module.<name>`` (parameter or buffer) by its ``index_select(dim, keep)``; masks follow.

    Missing names (``bias=False``, no running statistics) are skipped. Returns the new size, ``len(keep)``,
    for the module's size attribute: ``m.out_features = keep_slices(m, ("weight", "bias"), 0, keep)``.
    """
    for name in names:
        if (param := module._parameters.get(name)) is not None:
            module._parameters[name] = nn.Parameter(param.detach().index_select(dim, keep.to(param.device)).clone(),
                                                    requires_grad=param.requires_grad)
        elif (buf := module._buffers.get(name)) is not None:
            if buf.dim() > dim:
                module._buffers[name] = buf.index_select(dim, keep.to(buf.device)).clone()
        mask = module._buffers.get(name + SUFFIX)
        if mask is not None and mask.dim() > dim:
            module._buffers[name + SUFFIX] = mask.index_select(dim, keep.to(mask.device)).clone()
    return len(keep)


def keep_count(n: int, ratio: float, round_to: int = 1, what: str = "layer") -> int:
    """How many of ``n`` channels stay when ``ratio`` of them go, rounded to a multiple of ``round_to``.

    Raises ConfigError when nothing would stay.
    """
    keep = int(n * (1.0 - ratio) + 0.5)
    if round_to > 1 and n > round_to:
        keep = int(keep / round_to + 0.5) * round_to  # half up: 10 channels at round_to 4 keep 12
        keep = max(keep, round_to)
    keep = min(keep, n)
    if keep < 1:
        raise ConfigError(f"ratio {ratio} would remove every channel of {what} ({n} channels); lower it")
    return keep


def lowest(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices of the ``remove`` lowest scores (ties broken by position), sorted."""
    if remove <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(scores.detach().cpu(), stable=True)[:remove]
    return torch.sort(order).values


def complement(n: int, removed: torch.Tensor) -> torch.Tensor:
    drop = set(removed.tolist())
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)
