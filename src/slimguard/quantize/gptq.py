"""GPTQ weight quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023), into the packed layers of :mod:`slimguard.quantize.weight_only`.

GPTQ quantizes the columns of each Linear weight one at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X`` of the layer's
calibration inputs.

* **Sequential, on quantized outputs** (``sequential=True``, the default): layers are quantized one stage
  at a time in the order the model runs them (a stage is a layer plus the later layers reading the very
  same input tensor, e.g. attention ``q/k/v``), and each stage's inputs are measured on the current model,
  whose earlier layers are already quantized; so every layer compensates the errors made before it. Each
  measuring pass stops at the stage (:class:`_StopForward`), costing about half a forward pass per stage.
* **Act-order** (``act_order=True``): columns are visited by decreasing ``diag(H)``; group scales are
  fixed beforehand from the weight in stored order ("static groups"), so the packed layout and the int4 /
  int8 kernels are unchanged.
* **Dampening** (``damp``): ``damp * mean(diag(H))`` is added to the diagonal before inverting.

Calibration data is a split of tensors or of texts (tokenized by the model's ``tokenize``), or batches of
token ids or dicts of tensors (see :mod:`slimguard.quantize.calibrate`). :func:`execution_order` and
:func:`input_hessians` are shared with one-shot pruning (:mod:`slimguard.prune.sparsegpt`).

Example:
    >>> sg.quantize_(model, sg.GPTQConfig(bits=4, group_size=64), calib=data.calib)
    >>> sg.quantize_(lm, sg.GPTQConfig(bits=4, group_size=32, act_order=True), calib=token_ids)  # (N, L) long
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import DataError
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import device_of, eval_mode, forward, to_device
from slimguard.quantize.calibrate import calibration_batches, calibration_split, check_input_shape
from slimguard.quantize.common import set_submodule
from slimguard.quantize.weight_only import WeightOnlyLinear, _targets, _validate_bits_group, quantize_groups
from slimguard.ui import progress as progress_bar


@register_config("gptq")
@dataclasses.dataclass
class GPTQConfig(Config):
    """GPTQ weight quantization of Linear layers with calibration data (see the module docstring).

    Args:
        bits: 8, 4, 3 or 2 (default 4).
        group_size: input weights per scale (default 64; 0 = one group per row).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean (default 0.01): larger
            values are more stable for few calibration tokens, smaller ones follow the data more closely.
        block_size: columns processed together (default 128).
        act_order: quantize the columns in order of decreasing Hessian diagonal (the inputs with the most
            energy first, while the most columns remain to absorb their error); group scales stay those of
            the stored column order ("static groups"), so packing and the kernels are unchanged
            (default False).
        sequential: quantize layer by layer, each on the inputs produced by the layers already quantized
            (default True); False collects every layer's inputs in one pass over the float model.
        symmetric: symmetric codes (default True), else a zero point per group.
        ignore: layer names to keep in float.
        batch_size, max_batches: calibration streaming (defaults 64 and 0 = whole split).
    """

    bits: int = 4
    group_size: int = 64
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    sequential: bool = True
    symmetric: bool = True
    ignore: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 64
    max_batches: int = 0

    def validate(self) -> None:
        _validate_bits_group(self.bits, self.group_size)
        check_range("damp", self.damp, 0.0, 1.0)
        check_range("block_size", self.block_size, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_batches", self.max_batches, 0)


# ---- GPTQ ---------------------------------------------------------------------------------------------
@torch.no_grad()
def without_dead_columns(w: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of ``w (rows, cols)`` and ``hessian (cols, cols)`` (double) where columns whose input never
    varied (zero Hessian diagonal) are zeroed in ``w`` and given a unit diagonal, so the Hessian inverts."""
    w = w.detach().float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag(H)) * I)^-1`` (float32), which GPTQ and SparseGPT
    use to spread each column's error over the columns after it. ``h`` is changed in place."""
    h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float = 0.01,
                  block_size: int = 128, *, act_order: bool = False, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one weight ``(rows, cols)`` (``cols % group == 0``) with Hessian ``(cols, cols)``.

    Args:
        w: the float weight.
        hessian: ``X^T X / n`` of the layer's inputs (any positive multiple works).
        bits, group: code width and input weights per scale.
        damp: ``damp * mean(diag(H))`` is added to the diagonal before inverting.
        block_size: columns updated together (lazy batch updates; the result does not depend on it).
        act_order: visit columns by decreasing ``diag(H)``; group scales are then fixed up front from the
            weight in stored order (static groups), so the stored layout is unchanged.
        symmetric: symmetric codes, else asymmetric with a zero point per group.

    Returns:
        Codes ``(rows, cols)``, scales and zeros ``(rows, cols // group)`` in stored column order.
    """
    w, h = without_dead_columns(w, hessian)
    rows, cols = w.shape
    ngroups = cols // group
    scales = torch.zeros(rows, ngroups)
    zeros = torch.zeros(rows, ngroups)
    perm = torch.arange(cols)
    if act_order:
        _, scales, zeros = quantize_groups(w, bits, group, symmetric)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = damped_inverse_cholesky(h, damp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    group_of = perm // group  # the stored group of each visited column
    block_size = max(group, block_size // group * group)  # without act_order, groups never straddle blocks
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        wb, err = w[:, b0:b1].clone(), torch.zeros(rows, b1 - b0)
        for j in range(b1 - b0):
            col = b0 + j
            g = int(group_of[col])
            if not act_order and col % group == 0:  # fix this group's scale from the (error-updated) weights
                _, s, z = quantize_groups(wb[:, j:j + group], bits, group, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(wb[:, j] / s) + z, 0, 2**bits - 1)
            codes[:, col] = q.to(torch.uint8)
            e = (wb[:, j] - (q - z) * s) / hinv[col, col]
            wb[:, j:] -= e[:, None] * hinv[col, col:b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


class _StopForward(Exception):
    """Raised by a hook once the layers it waits for have seen their input (the rest is not needed)."""


def execution_order(model: nn.Module, names: list[str], batch: Any) -> list[str]:
    """``names`` in the order the model first calls them on ``batch`` (layers it never calls left out)."""
    order: list[str] = []
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any) -> None:
            if name not in order:
                order.append(name)
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        _run_batches(model, [batch], "GPTQ")
    finally:
        for h in hooks:
            h.remove()
    return order


@torch.no_grad()
def _run_batches(model: nn.Module, batches: list[Any], what: str) -> None:
    device = device_of(model)
    with eval_mode(model):
        for x in batches:
            try:
                forward(model, to_device(x, device))
            except _StopForward:
                continue
            except RuntimeError as exc:
                raise DataError(f"{what}: the model cannot run on a calibration batch "
                                f"({str(exc).splitlines()[0]}); give data of the model's input shape") from None


def input_hessians(model: nn.Module, names: list[str], batches: list[Any], *, stop_early: bool = True
                   ) -> dict[str, tuple[torch.Tensor, int]]:
    """``name -> (X^T X summed over calibration rows, rows)`` of the inputs of the Linear layers ``names``.

    With ``stop_early`` only the first layer reached and the later ones reading the very same input tensor
    (``q/k/v`` projections, ``gate/up``) are measured, and each forward pass stops at the next layer: this is
    how :func:`gptq_sequential_` measures one stage at a time on the current (partly quantized) model.
    """
    acc: dict[str, tuple[torch.Tensor, int]] = {}
    group: list[str] = []
    source: list[int] = []
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if stop_early:
                if not source:
                    source.append(id(x))
                if id(x) != source[0]:
                    raise _StopForward
                if name not in group:
                    group.append(name)
            x2 = x.detach().float().reshape(-1, x.shape[-1])
            h, n = acc.get(name, (None, 0))
            xtx = x2.T @ x2
            acc[name] = (xtx if h is None else h + xtx, n + x2.shape[0])
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        for x in batches:
            source.clear()
            _run_batches(model, [x], "GPTQ")
    finally:
        for handle in hooks:
            handle.remove()
    return acc


def _gptq_layer(lin: nn.Linear, xtx: torch.Tensor, rows: int, config: GPTQConfig) -> WeightOnlyLinear:
    m = WeightOnlyLinear(lin.in_features, lin.out_features, lin.bias is not None, config.bits, config.group_size,
                         config.symmetric)
    cols = m.cols_padded
    w = torch.zeros(lin.out_features, cols)
    w[:, : lin.in_features] = lin.weight.detach().float().cpu()
    h = torch.zeros(cols, cols, dtype=torch.float64)
    h[: lin.in_features, : lin.in_features] = xtx.double().cpu() * (2.0 / max(1, rows))
    codes, scales, zeros = gptq_quantize(w, h, config.bits, m.group, config.damp, config.block_size,
                                         act_order=config.act_order, symmetric=config.symmetric)
    m.set_weight(w, codes, scales, zeros)
    if lin.bias is not None and m.bias is not None:
        m.bias.data.copy_(lin.bias.detach().cpu())
    return m.to(lin.weight.device)


def gptq_sequential_(model: nn.Module, targets: list[str], batches: list[Any], config: GPTQConfig,
                     progress: bool = True) -> list[str]:
    """Quantize the Linear layers ``targets`` with GPTQ, in the order the model runs them; returns the
    layers the calibration data never reached (left in float).

    With ``config.sequential`` each stage (the next layer and the layers reading the same input) is measured
    on the current model, whose earlier layers are already quantized, so every layer compensates the
    errors before it; the forward pass stops at the stage, so the cost is about half a forward pass per
    stage and batch. Otherwise one pass over the float model measures every layer.
    """
    order = execution_order(model, targets, batches[0])
    missed = [n for n in targets if n not in order]
    remaining = list(order)
    with progress_bar(len(order), "GPTQ", enabled=progress) as bar:
        if not config.sequential:
            hess = input_hessians(model, remaining, batches, stop_early=False)
            for name in remaining:
                lin = cast(nn.Linear, model.get_submodule(name))
                set_submodule(model, name, _gptq_layer(lin, hess[name][0], hess[name][1], config))
                bar.advance(1)
            return missed
        while remaining:
            hess = input_hessians(model, remaining, batches)
            stage = [n for n in remaining if n in hess]
            if not stage:  # cannot happen for a deterministic model; never loop forever
                raise DataError("GPTQ: the calibration batches stopped reaching the remaining layers; give batches "
                                "of one shape")
            for name in stage:
                lin = cast(nn.Linear, model.get_submodule(name))
                set_submodule(model, name, _gptq_layer(lin, hess[name][0], hess[name][1], config))
                bar.advance(1)
            remaining = [n for n in remaining if n not in stage]
    return missed


@register_handler("quantize", GPTQConfig)
def _gptq(model: nn.Module, config: GPTQConfig, *, calib: Any = None, data: Any = None, progress: bool = True,
          **_: Any) -> dict[str, Any]:
    split = calibration_split(calib, data, "GPTQ", text_ok=True)
    check_input_shape(model, split, "GPTQ")
    targets, kept = _targets(model, list(config.ignore), conv=False)
    batches = list(calibration_batches(model, split, config.batch_size, config.max_batches))
    if not batches:
        raise DataError("GPTQ: the calibration data holds no batches; give at least one")
    missed = gptq_sequential_(model, targets, batches, config, progress)
    kept += [{"layer": n, "reason": "not reached by the calibration data"} for n in missed]
    return {"quantized": [n for n in targets if n not in missed], "kept_float": kept, "bits": config.bits,
            "act_order": config.act_order, "sequential": config.sequential}
