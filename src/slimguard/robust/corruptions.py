"""Common corruptions at five severities (in the spirit of ImageNet-C, Hendrycks & Dietterich, ICLR 2019).

Each corruption is a function ``fn(x, severity, gen, meta) -> x'`` registered for the data kinds it
applies to. Images: ``gaussian_noise``, ``salt_pepper``, ``blur``, ``contrast``, ``brightness``,
``occlusion``. Tabular: ``feature_noise``, ``missing_values`` (set to the training mean, the usual
imputation). Text: ``typos`` (character-level swaps, deletions, insertions, substitutions). Outputs stay
in the data's valid range; everything is seeded, with the same random draw at every severity, so a
stronger level extends the milder one (same noise scaled up, nested masks, a larger patch).

Example:
    >>> x_c = corrupt(data.test.x, "gaussian_noise", severity=3, meta=data.meta)
    >>> names_for("image")
    ['blur', 'brightness', 'contrast', 'gaussian_noise', 'occlusion', 'salt_pepper']
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import Registry
from slimguard.data.core import DataMeta

SEVERITIES = (1, 2, 3, 4, 5)
CorruptionFn = Callable[[Any, int, torch.Generator, DataMeta], Any]


@dataclasses.dataclass(frozen=True)
class Corruption:
    """A registered corruption: its name, the data kinds it applies to, the function and its levels."""

    name: str
    kinds: tuple[str, ...]
    fn: CorruptionFn
    levels: tuple[float, ...]
    description: str


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def register_corruption(name: str, kinds: tuple[str, ...], levels: tuple[float, ...],
                        description: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Register ``fn(x, severity, gen, meta)`` under ``name``; ``levels[s - 1]`` is severity ``s``'s strength."""

    def deco(fn: CorruptionFn) -> CorruptionFn:
        if len(levels) != len(SEVERITIES):
            raise ValueError(f"corruption {name!r} needs {len(SEVERITIES)} levels")
        CORRUPTIONS.register(name, Corruption(name, kinds, fn, levels, description))
        return fn

    return deco


def names_for(kind: str) -> list[str]:
    """The corruptions that apply to a data kind (``image``, ``tabular``, ``text``)."""
    return sorted(str(n) for n, c in CORRUPTIONS.items() if kind in c.kinds)


def get(name: str) -> Corruption:
    """The registered corruption ``name`` (ConfigError naming the allowed ones otherwise)."""
    return CORRUPTIONS.get(name)


def corrupt(x: Any, name: str, severity: int, meta: DataMeta, seed: int = 0) -> Any:
    """Apply corruption ``name`` at ``severity`` (1-5) to a batch (a tensor, or a list of texts).

    Args:
        x: inputs ``(N, *input_shape)`` in raw units, or a list of strings for text data.
        name: a registered corruption (see :func:`names_for`).
        severity: 1 (mild) to 5 (strong).
        meta: the data's metadata (kind, valid range, statistics).
        seed: seed of the random parts (default 0).

    Returns:
        The corrupted batch (a new tensor or list; ``x`` is not changed).
    """
    c = get(name)
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r} is out of range; allowed: 1, 2, 3, 4, 5")
    if meta.kind not in c.kinds:
        raise DataError(f"corruption {name!r} is for {', '.join(c.kinds)} data, not {meta.kind}; "
                        f"use one of: {', '.join(names_for(meta.kind))}")
    # the same draw at every severity: a stronger level extends the milder one (nested masks, scaled noise)
    gen = torch.Generator().manual_seed(seed)
    if meta.kind == "text":
        return c.fn(list(x), severity, gen, meta)
    out = c.fn(x.detach().float().cpu().clone(), severity, gen, meta)
    low, high = (b for b in meta.bounds())
    return torch.maximum(torch.minimum(out, high), low).to(x.dtype)


def _level(name: str, severity: int) -> float:
    return CORRUPTIONS.get(name).levels[severity - 1]


def _width(meta: DataMeta) -> torch.Tensor:
    low, high = meta.bounds()
    return high - low


# ---- images -------------------------------------------------------------------------------------------
@register_corruption("gaussian_noise", ("image",), (0.08, 0.12, 0.18, 0.26, 0.38),
                     "additive Gaussian noise, sigma as a fraction of the range")
def gaussian_noise(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=gen) * _level("gaussian_noise", severity) * _width(meta)


@register_corruption("salt_pepper", ("image",), (0.01, 0.02, 0.03, 0.05, 0.07),
                     "a fraction of pixels set to the lowest or highest value")
def salt_pepper(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    low, high = meta.bounds()
    u = torch.rand(x.shape, generator=gen)
    amount = _level("salt_pepper", severity)
    x = torch.where(u < amount / 2, low.expand_as(x), x)
    return torch.where(u > 1 - amount / 2, high.expand_as(x), x)


@register_corruption("blur", ("image",), (1.0, 2.0, 3.0, 4.0, 6.0),
                     "Gaussian blur, sigma in pixels of a 32-pixel image (scaled to the image size)")
def blur(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    sigma = _level("blur", severity) * x.shape[-1] / 32.0
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    flat = x.reshape(-1, c, *x.shape[2:])
    out = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                   groups=c)
    return out.reshape(x.shape)


@register_corruption("contrast", ("image",), (0.4, 0.3, 0.2, 0.1, 0.05),
                     "contrast scaled towards each image's mean by the given factor")
def contrast(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * _level("contrast", severity) + mean


@register_corruption("brightness", ("image",), (0.1, 0.2, 0.3, 0.4, 0.5),
                     "every pixel raised by a fraction of the range")
def brightness(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    return x + _level("brightness", severity) * _width(meta)


@register_corruption("occlusion", ("image",), (0.1, 0.2, 0.3, 0.4, 0.5),
                     "a square patch (side: fraction of the image) at a random place set to the lowest value")
def occlusion(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    low, _ = meta.bounds()
    h, w = x.shape[-2:]
    side = max(1, round(_level("occlusion", severity) * min(h, w)))
    top = torch.randint(0, h - side + 1, (len(x),), generator=gen)
    left = torch.randint(0, w - side + 1, (len(x),), generator=gen)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + side)
              & (cols >= left[:, None, None]) & (cols < left[:, None, None] + side))
    inside = inside.view(len(x), *[1] * (x.ndim - 3), h, w).expand_as(x)
    return torch.where(inside, low.expand_as(x), x)


# ---- tabular ------------------------------------------------------------------------------------------
@register_corruption("feature_noise", ("tabular",), (0.1, 0.2, 0.4, 0.7, 1.0),
                     "Gaussian noise per feature, sigma as a multiple of the feature's training std")
def feature_noise(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    std = torch.as_tensor(meta.std, dtype=torch.float32).reshape(x.shape[1:])
    return x + torch.randn(x.shape, generator=gen) * std * _level("feature_noise", severity)


@register_corruption("missing_values", ("tabular",), (0.05, 0.1, 0.2, 0.3, 0.5),
                     "a fraction of values missing, imputed with the feature's training mean")
def missing_values(x: torch.Tensor, severity: int, gen: torch.Generator, meta: DataMeta) -> torch.Tensor:
    mean = torch.as_tensor(meta.mean, dtype=torch.float32).reshape(x.shape[1:]).expand_as(x)
    missing = torch.rand(x.shape, generator=gen) < _level("missing_values", severity)
    return torch.where(missing, mean, x)


# ---- text ---------------------------------------------------------------------------------------------
_LETTERS = string.ascii_lowercase


def _typo_word(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word + rng.choice(_LETTERS)
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # delete
        return word[:i] + word[i + 1 :]
    if kind == 2:  # insert
        return word[:i] + rng.choice(_LETTERS) + word[i:]
    return word[:i] + rng.choice(_LETTERS) + word[i + 1 :]  # substitute


@register_corruption("typos", ("text",), (0.05, 0.1, 0.2, 0.3, 0.5),
                     "a fraction of words with one character-level typo (swap, delete, insert, substitute)")
def typos(texts: list[str], severity: int, gen: torch.Generator, meta: DataMeta) -> list[str]:
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    rate = _level("typos", severity)
    out = []
    for text in texts:
        words = text.split(" ")
        out.append(" ".join(_typo_word(w, rng) if w and rng.random() < rate else w for w in words))
    return out
