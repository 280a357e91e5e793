"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024).

A few input channels of each Linear carry much larger activations than the rest; the weights that
multiply them matter most. AWQ scales those input columns *up* before rounding (so they round relatively
finer) and the activations *down* by the same factor, which keeps the float function unchanged:
``W x = (W diag(s)) (diag(s)^-1 x)``. The per-channel factor is ``s = mean|x|^alpha`` (normalised), and
``alpha`` in [0, 1] is searched on a grid per group of layers to minimise the output error of the rounded
weights on calibration inputs.

The ``1/s`` on the activations must be folded into the operation that produces them, so AWQ scales groups
it can fold exactly:

* a normalisation (``RMSNorm``, ``LayerNorm``) and every Linear reading its output directly (attention
  ``q/k/v``, MLP ``gate/up``, the LM head): the norm's weight (and bias) is divided by ``s``;
* a Llama-style MLP (``up_proj`` and ``down_proj``): ``up_proj``'s output rows are divided by ``s`` and
  ``down_proj``'s columns multiplied (``down(act(gate) * up)`` is linear in ``up``'s output).

Other Linears (``o_proj``, whose input mixes grouped heads) are only rounded. Then every Linear is
quantized to nearest with the packed weight-only layers of :mod:`slimguard.quantize.weight_only`, so the
result runs on the same int4/int8 kernels.

Example:
    >>> sg.quantize_(lm, sg.AWQConfig(bits=4, group_size=32), calib=token_batches)
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import DataError
from slimguard.core.registry import register_handler
from slimguard.quantize.calibrate import calibrate, calibration_batches, calibration_split
from slimguard.quantize.common import set_submodule
from slimguard.quantize.smooth import is_norm, same_data_key
from slimguard.quantize.weight_only import (
    WeightOnlyLinear,
    _padded,
    _targets,
    _validate_bits_group,
    quantize_groups,
)


@register_config("awq")
@dataclasses.dataclass
class AWQConfig(Config):
    """Activation-aware scaling, then weight-only rounding of every Linear (see the module docstring).

    Args:
        bits: 8, 4, 3 or 2 (default 4).
        group_size: input weights per scale (default 64; 0 = one group per row).
        symmetric: symmetric codes (default True), else a zero point per group.
        grid: values of ``alpha`` tried in [0, 1] (default 20).
        max_rows: calibration rows (tokens) kept per group for the search (default 2048).
        ignore: layer names to keep in float (they are neither scaled nor rounded).
        batch_size, max_batches: calibration streaming (defaults 8 and 0 = the whole split).
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    grid: int = 20
    max_rows: int = 2048
    ignore: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 8
    max_batches: int = 0

    def validate(self) -> None:
        _validate_bits_group(self.bits, self.group_size)
        check_range("grid", self.grid, 2, 200)
        check_range("max_rows", self.max_rows, 16)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_batches", self.max_batches, 0)


@dataclasses.dataclass
class ScaleGroup:
    """Linears reading one tensor, and where ``1/s`` folds: a norm's weight or a Linear's output rows."""

    prev: str
    linears: list[str]
    kind: str  # "norm" | "linear"


def find_groups(model: nn.Module, batch: Any, names: list[str]) -> list[ScaleGroup]:
    """The foldable groups among the Linear layers ``names``, found by running one batch."""
    norms = {n: m for n, m in model.named_modules() if is_norm(m)}
    last_out: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}
    readers: dict[str, list[str]] = {}
    hooks = []

    def norm_hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            last_out[same_data_key(out)] = (name, out)  # the reference keeps its memory from being reused
        return fn

    def lin_hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            src = last_out.get(same_data_key(inputs[0]))
            if src is not None and name not in readers.setdefault(src[0], []):
                readers[src[0]].append(name)
        return fn

    hooks += [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    hooks += [model.get_submodule(n).register_forward_pre_hook(lin_hook(n)) for n in names]
    try:
        calibrate(model, [batch], "AWQ", progress=False)
    finally:
        for h in hooks:
            h.remove()
    groups = [ScaleGroup(src, lins, "norm") for src, lins in readers.items()]
    wanted = set(names)
    for name, mod in model.named_modules():
        up, down = getattr(mod, "up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
            prefix = f"{name}." if name else ""
            if f"{prefix}up_proj" in wanted and f"{prefix}down_proj" in wanted:
                groups.append(ScaleGroup(f"{prefix}up_proj", [f"{prefix}down_proj"], "linear"))
    return groups


def _fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    rows, cols = w.shape
    cols_padded, group = _padded(cols, group_size, bits)
    pad = F.pad(w, (0, cols_padded - cols))
    codes, scales, zeros = quantize_groups(pad, bits, group, symmetric)
    g = codes.float().reshape(rows, -1, group)
    return ((g - zeros[..., None]) * scales[..., None]).reshape(rows, -1)[:, :cols]


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], config: AWQConfig) -> tuple[torch.Tensor, float, float]:
    """The best per-channel scale for inputs ``x (rows, cols)`` of the Linears ``weights``: ``(s, alpha,
    relative error)``; ``alpha = 0`` (``s = 1``, plain rounding) is always on the grid."""
    w = torch.cat([t.detach().float() for t in weights])
    ref = x @ w.T
    norm = ref.pow(2).mean().clamp_min(1e-20)
    xmean = x.abs().mean(0).clamp_min(1e-8)
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(config.grid):
        alpha = i / (config.grid - 1)
        s = xmean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = _fake_quant(w * s, config.bits, config.group_size, config.symmetric) / s
        err = float((x @ wq.T - ref).pow(2).mean() / norm)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1], best[0]


def _collect_inputs(model: nn.Module, groups: list[ScaleGroup], batches: list[Any], max_rows: int
                    ) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows of each group's first Linear (rows spread over all batches)."""
    per_batch = max(1, max_rows // len(batches))
    rows: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            step = max(1, x.shape[0] // per_batch)
            rows[name].append(x[::step][:per_batch].cpu())
        return fn

    for name in rows:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        calibrate(model, batches, "AWQ", progress=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v)[:max_rows] for k, v in rows.items() if v}


@torch.no_grad()
def awq_scale_(model: nn.Module, names: list[str], batches: list[Any], config: AWQConfig) -> list[dict[str, Any]]:
    """Search and fold the AWQ scales of every foldable group of the Linears ``names`` (the float model
    computes the same function afterwards); returns one record per group."""
    groups = find_groups(model, batches[0], names)
    inputs = _collect_inputs(model, groups, batches, config.max_rows)
    records = []
    for g in groups:
        x = inputs.get(g.linears[0])
        if x is None:
            continue
        lins = [cast(nn.Linear, model.get_submodule(n)) for n in g.linears]
        s, alpha, err = search_scale(x, [lin.weight for lin in lins], config)
        prev = model.get_submodule(g.prev)
        weight = cast(torch.Tensor, prev.weight)
        bias = getattr(prev, "bias", None)
        s_dev = s.to(weight.device, weight.dtype)
        inv = s_dev if g.kind == "norm" else s_dev[:, None]  # a norm's channels, or a Linear's output rows
        weight.div_(inv)
        if isinstance(bias, torch.Tensor):
            bias.div_(s_dev.to(bias.dtype))
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])
        records.append({"prev": g.prev, "linears": g.linears, "alpha": alpha, "error": err})
    return records


@register_handler("quantize", AWQConfig)
def _awq(model: nn.Module, config: AWQConfig, *, calib: Any = None, data: Any = None, **_: Any) -> dict[str, Any]:
    split = calibration_split(calib, data, "AWQ", text_ok=True)
    targets, kept = _targets(model, list(config.ignore), conv=False)
    batches = list(calibration_batches(model, split, config.batch_size, config.max_batches))
    if not batches:
        raise DataError("AWQ: the calibration data holds no batches; give at least one")
    groups = awq_scale_(model, targets, batches, config)
    for name in targets:
        lin = cast(nn.Linear, model.get_submodule(name))  # _targets(conv=False) selects Linear layers only
        set_submodule(model, name, WeightOnlyLinear.from_float(lin, config.bits, config.group_size, config.symmetric))
    return {"quantized": targets, "kept_float": kept, "bits": config.bits, "scaled": groups}
