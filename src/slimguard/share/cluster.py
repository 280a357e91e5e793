"""Weight sharing by per-layer k-means (trained quantization, the second stage of Deep Compression).

Paper: Han, Mao, Dally, "Deep Compression", ICLR 2016, section 3. Each Linear/Conv layer's nonzero
weights are grouped into ``2**bits`` clusters by 1-D k-means with *linear* initialisation (centroids
spaced evenly between the smallest and the largest weight, which the paper found best because it keeps
the rare large weights); every weight is replaced by its centroid. Pruned zeros are not clustered and
stay exactly zero.

Centroid fine-tuning runs through the one training loop (:func:`slimguard.finetune`) with no extra
code: a shared weight's gradient is replaced by the sum of the gradients of its cluster (the paper's
``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)``), so every weight of a cluster gets the same update from any
element-wise optimizer (SGD, AdamW) and the layer keeps exactly ``K`` distinct values. The cluster
index of every weight lives in a non-persistent buffer ``<param>_cluster`` (-1 for zeros), so the
checkpoint layout does not change; the artifact codes shared tensors with the ``huffman`` codec.

Example:
    >>> sg.cluster_(model, sg.WeightSharingConfig(bits=5, bits_by_type={"conv": 8}))
    >>> sg.finetune(model, data, sg.FinetuneConfig(epochs=3, lr=1e-4))   # fine-tunes the centroids
    >>> sg.cluster_(model, sg.HuffmanCodingConfig())                            # fp16 codebooks, coded artifact
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.modules import register_load_hook
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import select_modules

SUFFIX = "_cluster"
CODECS_ATTR = "_slimguard_codecs"
LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}


def _check_bits(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"{name}: {value!r} is out of range; allowed: an integer in 1..8 "
                          "(2**bits clusters per layer)")


@register_config("weight-sharing")
@dataclasses.dataclass
class WeightSharingConfig(Config):
    """Share weights: per-layer k-means, ``2**bits`` clusters, linear initialisation; zeros stay zero.

    Args:
        bits: bits per cluster index, 1..8 (default 5: 32 shared values per layer).
        bits_by_type: bits per layer type, ``{"linear": 5, "conv": 8}`` (the paper used 8 for conv and 5
            for fc layers); overrides ``bits``.
        overrides: bits per layer ``{module_name: bits}``; overrides everything else.
        bias_bits: share biases too with this many bits (1..8); 0 keeps biases as they are (default).
        ignore: names of modules to leave alone.
        iterations: k-means iterations at most (default 50).

    A layer with fewer distinct nonzero weights than clusters keeps its distinct values as centroids
    (exact, nothing is lost).
    """

    bits: int = 5
    bits_by_type: dict[str, int] = dataclasses.field(default_factory=dict)
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    bias_bits: int = 0
    ignore: list[str] = dataclasses.field(default_factory=list)
    iterations: int = 50

    def validate(self) -> None:
        _check_bits("bits", self.bits)
        for key, b in self.bits_by_type.items():
            if key not in LAYER_TYPES:
                raise ConfigError(f"bits_by_type: {key!r} is not a layer type; allowed: {', '.join(LAYER_TYPES)}")
            _check_bits(f"bits_by_type.{key}", b)
        for key, b in self.overrides.items():
            _check_bits(f"overrides.{key}", b)
        if self.bias_bits != 0:
            _check_bits("bias_bits", self.bias_bits)
        check_range("iterations", self.iterations, 1, 10_000)

    def bits_for(self, name: str, module: nn.Module) -> int:
        if name in self.overrides:
            return self.overrides[name]
        for key, types in LAYER_TYPES.items():
            if isinstance(module, types) and key in self.bits_by_type:
                return self.bits_by_type[key]
        return self.bits


# ---- k-means -------------------------------------------------------------------------------------------
def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means with linear initialisation. Returns (sorted centroids (K',), index per value).

    ``K' <= k``: empty clusters are dropped; with at most ``k`` distinct values the centroids are exactly
    those values.

    Shape:
        values: (N,) float. Returns centroids (K',) and indices (N,) int64 in ``[0, K')``.
    """
    v = values.detach().reshape(-1).to(torch.float64)
    distinct = torch.unique(v)
    if distinct.numel() <= k:
        return distinct.to(values.dtype), torch.bucketize(v, distinct)
    c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    idx = torch.zeros_like(v, dtype=torch.long)
    for it in range(iterations):
        new = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        if it and torch.equal(new, idx):
            break
        idx = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v)
        counts = torch.bincount(idx, minlength=k)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        c, _ = torch.sort(c)
    idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    used = torch.unique(idx)
    remap = torch.full((k,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v)
    counts = torch.bincount(idx, minlength=k)
    c = sums[used] / counts[used]
    return c.to(values.dtype), remap[idx]


# ---- shared parameters ---------------------------------------------------------------------------------
_HOOKED: dict[int, weakref.ref[torch.Tensor]] = {}


def _gather_grad(module_ref: weakref.ref[nn.Module], pname: str, grad: torch.Tensor) -> torch.Tensor:
    """Per-cluster gradient: every weight of cluster k gets the sum of the cluster's gradients."""
    module = module_ref()
    idx = None if module is None else module._buffers.get(pname + SUFFIX)
    if idx is None:
        return grad
    flat = idx.reshape(-1).long() + 1  # slot 0 collects the zeros
    k = int(flat.max()) + 1 if flat.numel() else 1
    sums = torch.zeros(k, dtype=grad.dtype, device=grad.device).index_add_(0, flat, grad.reshape(-1))
    sums[0] = 0
    return sums[flat].reshape(grad.shape)


def _hook_params(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: make sure every shared parameter of ``module`` gathers its gradient per cluster.

    Hooks live on parameter objects, which ``deepcopy`` and loading replace; checking on every forward
    keeps them attached to whatever parameter the module holds now. Nothing happens without autograd or
    while exporting/tracing.
    """
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling():
        return
    for bname in list(module._buffers):
        if not bname.endswith(SUFFIX):
            continue
        pname = bname[: -len(SUFFIX)]
        p = module._parameters.get(pname)
        if p is None or not p.requires_grad:
            continue
        ref = _HOOKED.get(id(p))
        if ref is None or ref() is not p:
            p.register_hook(lambda g, m=weakref.ref(module), n=pname: _gather_grad(m, n, g))
            if len(_HOOKED) > 4096:  # forget parameters that no longer exist
                for key in [k for k, r in _HOOKED.items() if r() is None]:
                    del _HOOKED[key]
            _HOOKED[id(p)] = weakref.ref(p)


def share_(module: nn.Module, pname: str, centroids: torch.Tensor, index: torch.Tensor) -> None:
    """Set ``module.<pname>`` to ``centroids[index]`` (index -1 = zero) and keep it shared when trained.

    Shape:
        centroids: (K,); index: same shape as the parameter, int, -1 where the weight is zero.
    """
    param = getattr(module, pname)
    index = index.reshape(param.shape).to(device=param.device, dtype=torch.int16 if centroids.numel() < 32768
                                          else torch.int32)
    with torch.no_grad():
        table = torch.cat([torch.zeros(1, dtype=param.dtype), centroids.to(param.dtype).cpu()]).to(param.device)
        param.copy_(table[index.long() + 1])
    bname = pname + SUFFIX
    if bname in module._buffers:
        module._buffers[bname] = index
    else:
        module.register_buffer(bname, index, persistent=False)
    if not getattr(module, "_slimguard_share_hook", False):
        module.register_forward_pre_hook(_hook_params)
        module._slimguard_share_hook = True  # type: ignore[assignment]  # stub: Module.__setattr__ takes tensors/modules


def centroids_of(module: nn.Module, pname: str) -> torch.Tensor:
    """The current shared values of ``module.<pname>`` (per-cluster means; exact while shared)."""
    param = getattr(module, pname).detach()
    idx = module.get_buffer(pname + SUFFIX).reshape(-1).long()
    k = int(idx.max()) + 1 if idx.numel() else 0
    keep = idx >= 0
    sums = torch.zeros(k, dtype=torch.float64, device=param.device).index_add_(
        0, idx[keep], param.reshape(-1)[keep].double())
    counts = torch.bincount(idx[keep], minlength=k).clamp(min=1)
    return (sums / counts).to(param.dtype)


def iter_shared(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified_param_name, module, param_name)`` for every shared parameter."""
    out = []
    for mname, module in model.named_modules():
        for bname in module._buffers:
            if bname.endswith(SUFFIX) and bname[: -len(SUFFIX)] in module._parameters:
                pname = bname[: -len(SUFFIX)]
                out.append((f"{mname}.{pname}" if mname else pname, module, pname))
    return out


def attach_sharing(model: nn.Module, qualified: str, max_clusters: int = 256) -> bool:
    """Re-attach sharing to a parameter that already holds few distinct values (after loading)."""
    mpath, _, pname = qualified.rpartition(".")
    module = model.get_submodule(mpath) if mpath else model
    param = module._parameters.get(pname)
    if param is None:
        return False
    flat = param.detach().reshape(-1)
    nz = flat != 0
    values = torch.unique(flat[nz])
    if values.numel() > max_clusters:
        return False
    index = torch.full(flat.shape, -1, dtype=torch.long)
    index[nz] = torch.bucketize(flat[nz], values)
    share_(module, pname, values, index)
    return True


def _set_hint(model: nn.Module, qualified: str, options: dict[str, Any]) -> None:
    hints = dict(getattr(model, CODECS_ATTR, {}) or {})
    hints[qualified] = ("huffman", options)
    object.__setattr__(model, CODECS_ATTR, hints)


def _eligible(model: nn.Module, ignore: list[str]) -> dict[str, nn.Module]:
    return select_modules(model, tuple(t for ts in LAYER_TYPES.values() for t in ts), ignore)


@register_handler("cluster", WeightSharingConfig)
def _weight_sharing(model: nn.Module, config: WeightSharingConfig, *, progress: bool = True,
                    **_: Any) -> dict[str, Any]:
    from slimguard.ui import progress as bar

    layers = _eligible(model, config.ignore)
    for name in config.overrides:
        if name not in layers:
            raise ConfigError(f"overrides: {name!r} is not a Linear/Conv layer; layers: {', '.join(layers)}")
    report: dict[str, Any] = {}
    with bar(len(layers), "k-means weight sharing", enabled=progress) as task:
        for name, module in layers.items():
            _share_layer(model, name, module, config, report)
            task.advance(1, info=name)
    return {"layers": report}


def _share_layer(model: nn.Module, name: str, module: nn.Module, config: WeightSharingConfig,
                 report: dict[str, Any]) -> None:
    """Cluster one layer's weight (and bias, with ``bias_bits``) into shared centroids; record it in ``report``."""
    targets = [("weight", config.bits_for(name, module))]
    if config.bias_bits and getattr(module, "bias", None) is not None:
        targets.append(("bias", config.bias_bits))
    for pname, bits in targets:
        param = getattr(module, pname)
        flat = param.detach().reshape(-1).cpu()
        nz = flat != 0
        index = torch.full(flat.shape, -1, dtype=torch.long)
        distinct = int(torch.unique(flat[nz]).numel())
        if distinct:
            centroids, idx = kmeans_1d(flat[nz], 1 << bits, config.iterations)
            index[nz] = idx
        else:
            centroids = torch.zeros(0, dtype=flat.dtype)
        share_(module, pname, centroids, index)
        qualified = f"{name}.{pname}" if name else pname
        _set_hint(model, qualified, {})
        report[qualified] = {"bits": bits, "clusters": int(centroids.numel()), "kept": int(nz.sum()),
                             "numel": flat.numel(), "distinct_before": distinct}


def _reattach_on_load(model: nn.Module, manifest: dict[str, Any]) -> None:
    """After loading an artifact, tensors stored with ``huffman`` become shared again (and stay coded)."""
    for key, meta in manifest.get("tensors", {}).items():
        if meta.get("codec") == "huffman" and attach_sharing(model, key):
            _set_hint(model, key, {})


register_load_hook(_reattach_on_load)
