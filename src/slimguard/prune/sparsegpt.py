"""One-shot pruning of language models with calibration data: SparseGPT and Wanda, unstructured or N:M.

* **SparseGPT** (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023) prunes each Linear's columns in order and, like GPTQ, moves each removed weight's
  contribution onto the columns not yet visited through the inverse Hessian ``H = X^T X`` of the layer's
  inputs. The weights to remove are chosen per block of columns by ``w^2 / [H^-1]_jj^2`` (the
  reconstruction error of removing each), so the mask adapts as the weights are updated.
* **Wanda** (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024)
  scores ``|W_ij| * ||X_j||_2`` and removes the lowest scores of each output row; no weight changes.

``pattern="unstructured"`` removes ``sparsity`` of each layer's weights (SparseGPT: of each block of
columns, per row for Wanda); ``pattern="2:4"`` (any ``N:M``) keeps ``N`` of every ``M`` consecutive input
weights, the layout that sparse tensor cores run. Layers are visited stage by stage in the order the model
runs them, each measured on the outputs of the layers already pruned (``sequential``), as in both papers.
Masks are attached with :func:`slimguard.core.masks.set_mask`, so fine-tuning keeps them.

Example:
    >>> sg.prune_(lm, sg.SparseGPTConfig(sparsity=0.5), calib=token_batches)
    >>> sg.prune_(lm, sg.WandaConfig(pattern="2:4", ignore=["model.lm_head"]), calib=token_batches)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, cast

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.masks import set_mask
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import select_modules
from slimguard.quantize.calibrate import calibration_batches, calibration_split
from slimguard.quantize.gptq import damped_inverse_cholesky, execution_order, input_hessians, without_dead_columns
from slimguard.ui import progress as progress_bar

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` (keep N of every M, ``0 < N < M <= 64``) -> ``(N, M)``."""
    if pattern == "unstructured":
        return None
    m = _NM.match(pattern)
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)) <= 64:
        raise ConfigError(f"pattern: {pattern!r} is not supported; give 'unstructured' or 'N:M' with 0 < N < M <= 64 "
                          "(e.g. '2:4')")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass
class _OneShotConfig(Config):
    sparsity: float = 0.5
    pattern: str = "unstructured"
    sequential: bool = True
    ignore: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 8
    max_batches: int = 0

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 0.99)
        parse_pattern(self.pattern)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_batches", self.max_batches, 0)


@register_config("sparsegpt")
@dataclasses.dataclass
class SparseGPTConfig(_OneShotConfig):
    """SparseGPT one-shot pruning of Linear layers (see the module docstring).

    Args:
        sparsity: fraction of weights removed with ``pattern="unstructured"`` (default 0.5).
        pattern: ``"unstructured"`` (default) or ``"N:M"`` such as ``"2:4"`` (then ``sparsity`` is unused).
        damp: dampening of the Hessian diagonal, as a fraction of its mean (default 0.01).
        block_size: columns whose mask is chosen together (default 128).
        sequential: measure each stage on the already pruned model (default True).
        ignore: layer names to keep dense.
        batch_size, max_batches: calibration streaming (defaults 8 and 0 = the whole split).
    """

    damp: float = 0.01
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        check_range("damp", self.damp, 0.0, 1.0)
        check_range("block_size", self.block_size, 1)


@register_config("wanda")
@dataclasses.dataclass
class WandaConfig(_OneShotConfig):
    """Wanda pruning (weight magnitude times input norm) of Linear layers (see the module docstring).

    Args:
        sparsity: fraction of each output row's weights removed with ``pattern="unstructured"`` (default 0.5).
        pattern: ``"unstructured"`` (default) or ``"N:M"`` such as ``"2:4"``.
        sequential: measure each stage on the already pruned model (default True).
        ignore: layer names to keep dense.
        batch_size, max_batches: calibration streaming (defaults 8 and 0 = the whole split).
    """


def _nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is removed: the ``m - n`` lowest ``scores`` of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows, cols // m, m)
    low = torch.topk(blocks, m - n, dim=-1, largest=False).indices
    return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, low, True).reshape(rows, cols)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight ``(rows, cols)`` with Hessian ``(cols, cols)``.

    Returns:
        The updated weight (zeros where removed) and the keep mask (bool), both ``(rows, cols)``.
    """
    w, h = without_dead_columns(w, hessian)
    rows, cols = w.shape
    hinv = damped_inverse_cholesky(h, damp)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # N:M blocks never straddle column blocks
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        wb, err = w[:, b0:b1].clone(), torch.zeros(rows, b1 - b0)
        d = torch.diag(hinv[b0:b1, b0:b1])
        if nm is None:
            score = wb.pow(2) / d.pow(2)[None, :]
            k = int(score.numel() * sparsity)
            mask = torch.zeros_like(score, dtype=torch.bool)
            if k > 0:
                mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        else:
            mask = torch.zeros(rows, b1 - b0, dtype=torch.bool)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                sl = slice(j, j + nm[1])
                mask[:, sl] = _nm_prune_mask(wb[:, sl].pow(2) / d[sl].pow(2)[None, :], *nm)
            q = wb[:, j].masked_fill(mask[:, j], 0.0)
            e = (wb[:, j] - q) / hinv[b0 + j, b0 + j]
            wb[:, j:] -= e[:, None] * hinv[b0 + j, b0 + j : b1][None, :]
            wb[:, j] = q
            err[:, j] = e
        w[:, b0:b1] = wb
        pruned[:, b0:b1] = mask
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    w[pruned] = 0
    return w, ~pruned


def wanda_mask(w: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep mask of Wanda: scores ``|W| * ||X_j||`` (``input_sq_norms`` is ``sum_rows X_j^2``), the lowest
    ``sparsity`` of each row (or ``M - N`` of every ``M`` columns) removed."""
    score = w.detach().abs().float() * input_sq_norms.float().clamp_min(0).sqrt()[None, :]
    if nm is not None:
        return ~_nm_prune_mask(score, *nm)
    k = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def _prune_layer(lin: nn.Linear, xtx: torch.Tensor, config: _OneShotConfig) -> None:
    nm = parse_pattern(config.pattern)
    if isinstance(config, SparseGPTConfig):
        w, keep = sparsegpt_prune(lin.weight.detach().cpu(), xtx.cpu(), config.sparsity, nm, config.damp,
                                  config.block_size)
        with torch.no_grad():
            lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))
    else:
        keep = wanda_mask(lin.weight.detach().cpu(), torch.diag(xtx).cpu(), config.sparsity, nm)
    set_mask(lin, "weight", keep.to(lin.weight.device))


def one_shot_prune_(model: nn.Module, config: _OneShotConfig, batches: list[Any], progress: bool = True
                    ) -> dict[str, Any]:
    """Prune every Linear (bar ``config.ignore``) with SparseGPT or Wanda, stage by stage; returns the
    sparsity of each pruned layer and the layers kept dense with the reason."""
    nm = parse_pattern(config.pattern)
    layers = {n: cast(nn.Linear, m) for n, m in select_modules(model, nn.Linear, config.ignore).items()}
    kept: list[dict[str, str]] = []
    names = []
    for name, lin in layers.items():
        if nm is not None and lin.in_features % nm[1]:
            kept.append({"layer": name, "reason": f"in_features {lin.in_features} is not a multiple of {nm[1]}"})
        else:
            names.append(name)
    order = execution_order(model, names, batches[0])
    kept += [{"layer": n, "reason": "not reached by the calibration data"} for n in names if n not in order]
    remaining = list(order)
    what = type(config).__name__.removesuffix("Config")
    with progress_bar(len(order), what, enabled=progress) as bar:
        while remaining:
            hess = input_hessians(model, remaining, batches, stop_early=config.sequential)
            stage = [n for n in remaining if n in hess]
            if not stage:
                raise DataError(f"{what}: the calibration batches stopped reaching the remaining layers; give "
                                "batches of one shape")
            for name in stage:
                _prune_layer(layers[name], hess[name][0], config)
                bar.advance(1)
            remaining = [n for n in remaining if n not in stage]
    sparsity = {n: float(layers[n].weight.eq(0).float().mean()) for n in order}
    return {"sparsity_by_layer": sparsity, "kept_dense": kept, "pattern": config.pattern}


def _handler(model: nn.Module, config: _OneShotConfig, *, calib: Any = None, data: Any = None,
             progress: bool = True, **_: Any) -> dict[str, Any]:
    what = type(config).__name__.removesuffix("Config")
    split = calibration_split(calib, data, what, text_ok=True)
    batches = list(calibration_batches(model, split, config.batch_size, config.max_batches))
    if not batches:
        raise DataError(f"{what}: the calibration data holds no batches; give at least one")
    return one_shot_prune_(model, config, batches, progress)


register_handler("prune", SparseGPTConfig)(_handler)
register_handler("prune", WandaConfig)(_handler)
