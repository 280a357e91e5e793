"""N:M semi-structured sparsity: in every block of M consecutive input weights, only N stay.

2:4 is what NVIDIA Ampere and later GPUs run with sparse tensor cores (PyTorch
``torch.sparse.to_sparse_semi_structured``). On a CPU the pattern only saves storage (the artifact's
sparse codec); :func:`to_semi_structured` swaps Linear weights for the GPU kernels when CUDA is present.

Paper: Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv 2104.08378 (2:4 on A100);
Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021.

Example:
    >>> sg.prune_(model, sg.NMSparsityConfig(n=2, m=4))
    >>> sg.finetune(model, data, sg.FinetuneConfig(epochs=3))   # masks stay applied
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ModelError
from slimguard.core.masks import get_mask, set_mask
from slimguard.core.registry import register_handler
from slimguard.prune.importance import check_weight_importance, get_importance, prepare_importance
from slimguard.prune.magnitude import prunable_layers


@register_config("nm")
@dataclasses.dataclass
class NMSparsityConfig(Config):
    """Keep the ``n`` most important of every ``m`` consecutive weights along the input dimension.

    Args:
        n: weights kept per block (default 2).
        m: block length (default 4); a layer's input size (``in_features``, or ``in_channels * kh * kw``)
            must be a multiple of ``m``, otherwise the layer is skipped and reported.
        importance: ``l1`` (default), ``l2``, ``taylor`` (needs data), ``random``.
        ignore: qualified names of modules to leave dense.
    """

    n: int = 2
    m: int = 4
    importance: str = "l1"
    ignore: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check_range("m", self.m, 2, 64)
        check_range("n", self.n, 1, self.m - 1)
        check_weight_importance(self.importance)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of ``scores.shape`` keeping the top ``n`` of each ``m`` consecutive entries along the
    flattened input dimension (all dims after the first).

    Shape:
        scores ``(out, *in_dims)`` with ``prod(in_dims) % m == 0``.
    """
    flat = scores.reshape(scores.shape[0], -1)
    if flat.shape[1] % m:
        raise ModelError(f"input size {flat.shape[1]} is not a multiple of m={m}")
    blocks = flat.reshape(flat.shape[0], -1, m)
    top = blocks.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(scores.shape)


def has_nm_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every block of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    if flat.shape[1] % m:
        return False
    return bool(((flat.reshape(flat.shape[0], -1, m) != 0).sum(-1) <= n).all())


@register_handler("prune", NMSparsityConfig)
def _nm(model: nn.Module, config: NMSparsityConfig, **context: Any) -> dict[str, Any]:
    imp = get_importance(config.importance)
    prepare_importance(imp, model, context)
    pruned, skipped = [], {}
    for name, mod in prunable_layers(model, config.ignore).items():
        w = mod.weight
        if w[0].numel() % config.m:
            skipped[name] = f"input size {w[0].numel()} is not a multiple of {config.m}"
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups > 1 and w.shape[1] == 1:
            skipped[name] = "depthwise convolution"
            continue
        scores = imp.score(mod, "weight")
        old = get_mask(mod, "weight")
        if old is not None:
            scores = scores.masked_fill(~old, -1.0)
        set_mask(mod, "weight", nm_mask(scores, config.n, config.m))
        pruned.append(name)
    if not pruned:
        raise ModelError(f"no layer fits {config.n}:{config.m} sparsity ({skipped}); choose another m")
    return {"pruned": pruned, "skipped": skipped, "pattern": f"{config.n}:{config.m}"}


def to_semi_structured(model: nn.Module, ignore: tuple[str, ...] = ()) -> list[str]:
    """Swap 2:4-sparse Linear weights for PyTorch's semi-structured sparse tensors (CUDA only).

    Only runs on CUDA with fp16/bf16 weights whose shapes the kernels accept (both dims multiples of
    64 for cuSPARSELt/CUTLASS); other layers stay dense. Returns the names converted. Inference only:
    masks of converted layers are dropped (the sparse format keeps the pattern itself).

    Raises:
        ModelError: when CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise ModelError("semi-structured sparse kernels need a CUDA GPU; none is available here")
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name in ignore:
            continue
        w = mod.weight
        ok = (w.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and w.shape[0] % 64 == 0
              and w.shape[1] % 64 == 0 and has_nm_pattern(w, 2, 4))
        if not ok:
            continue
        mod._buffers.pop("weight_mask", None)
        mod.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        done.append(name)
    return done
