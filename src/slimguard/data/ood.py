"""Built-in out-of-distribution (OOD) data sets for the digits models, made from what ships locally.

| name                | shape    | what                                                                  |
|---------------------|----------|-----------------------------------------------------------------------|
| ``digits-ood``      | 1x8x8    | far-OOD: grey patches of scikit-learn's sample photos + noise images  |
| ``digits-ood-near`` | 1x8x8    | near-OOD: heavily corrupted or occluded digits                        |
| ``digits32-ood``    | 1x32x32  | far-OOD as above, at the resolution of ``digits32`` models            |
| ``digits32-ood-near`` | 1x32x32 | near-OOD as above, from ``digits32`` images                          |

**Far-OOD** (per bundle 1200 images, 400 per split): 60% are patches cut at random positions and sizes
(24 to 200 pixels square) from ``sklearn.datasets.load_sample_images()`` (``china.jpg`` and
``flower.jpg``), turned grey (ITU-R 601 luma), resized with antialiasing to the digit shape and
stretched to span [0, 1]; 40% are noise images: uniform noise, Gaussian noise (mean 0.5, sd 0.25,
clipped) and smooth noise (a 4x4 uniform grid upsampled bilinearly), in equal parts.

**Near-OOD**: digits of the matching split (train/val/test of ``digits`` or ``digits32``, so the
in-distribution test images are never seen while fitting), each with one of four heavy corruptions in
equal parts: a random square occluder covering 40% to 60% of the side, filled with 1 (white); additive
Gaussian noise with sd 0.5 (clipped to [0, 1]); inversion ``1 - x``; and the average of two digits of
different classes.

Shape of the bundle: the same :class:`~slimguard.data.DataBundle` as every data set (train / val / test
/ calib), with ``y = None`` (OOD images have no class) and the digit data set's ``DataMeta`` renamed
(``input_shape``, ``low``/``high`` = [0, 1] and the normalisation statistics of the in-distribution data,
so the models accept them). Use ``test`` for evaluation, ``val`` to tune, ``train`` if a method needs
outliers for training. Everything is seeded (``seed=``, default 0) and deterministic.

Example:
    >>> far = sg.data.load("digits32-ood").test.x      # (400, 1, 32, 32)
    >>> near = sg.data.load("digits32-ood-near").test.x
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from slimguard.data.core import DataBundle, DataMeta, Split, register_dataset

FAR_PER_SPLIT = 400


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    return tuple((im[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0
                 for im in imgs)


def _stretch(x: torch.Tensor) -> torch.Tensor:
    """Per image min-max stretch to [0, 1] (flat images become 0)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-6)
    return ((x - lo.view(-1, 1, 1, 1)) / span.view(-1, 1, 1, 1)).clamp_(0, 1)


def photo_patches(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` grey patches of the sample photos, resized to ``size`` x ``size``, stretched to [0, 1]."""
    photos = _sample_photos()
    out = []
    for _ in range(n):
        img = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(24, 201))
        r = int(rng.integers(0, img.shape[0] - side + 1))
        c = int(rng.integers(0, img.shape[1] - side + 1))
        patch = torch.from_numpy(np.ascontiguousarray(img[r : r + side, c : c + side]))[None, None]
        out.append(F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return _stretch(torch.cat(out))


def noise_images(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` noise images: uniform, Gaussian (0.5, 0.25) and smooth (4x4 grid upsampled), in turn."""
    kinds = np.arange(n) % 3
    out = torch.empty(n, 1, size, size)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for k in range(3):
        idx = torch.from_numpy(np.flatnonzero(kinds == k))
        m = len(idx)
        if m == 0:
            continue
        if k == 0:
            out[idx] = torch.rand(m, 1, size, size, generator=g)
        elif k == 1:
            out[idx] = (0.5 + 0.25 * torch.randn(m, 1, size, size, generator=g)).clamp(0, 1)
        else:
            grid = torch.rand(m, 1, 4, 4, generator=g)
            out[idx] = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return out


def corrupt_digits(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Near-OOD: each digit gets one heavy corruption (occlusion, noise sd 0.5, inversion, blend of two
    digits of different classes), in turn.

    Shape:
        ``x`` ``(N, 1, H, W)`` in [0, 1], ``y`` ``(N,)``; returns ``(N, 1, H, W)`` in [0, 1].
    """
    n, _, h, w = x.shape
    out = x.clone()
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for i in range(n):
        kind = i % 4
        if kind == 0:
            side = max(1, round(h * rng.uniform(0.4, 0.6)))
            r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out[i, :, r : r + side, c : c + side] = 1.0
        elif kind == 1:
            out[i] = (x[i] + 0.5 * torch.randn(x[i].shape, generator=g)).clamp(0, 1)
        elif kind == 2:
            out[i] = 1.0 - x[i]
        else:
            others = np.flatnonzero(y.numpy() != int(y[i]))
            j = int(others[int(rng.integers(len(others)))]) if len(others) else i
            out[i] = 0.5 * (x[i] + x[j])
    return out


def _rename(meta: DataMeta, name: str, description: str) -> DataMeta:
    return dataclasses.replace(meta, name=name, description=description, class_names=list(meta.class_names))


#: ``make(in_distribution_split, size, rng) -> images`` of one OOD split
SplitMaker = Callable[[Split, int, np.random.Generator], torch.Tensor]


def _ood_bundle(base: str, seed: int, name: str, description: str, salt: int, make: SplitMaker) -> DataBundle:
    """The OOD bundle ``name`` for the digit set ``base``: each split made by ``make`` from one seeded
    generator, in the order train, val, test."""
    from slimguard.data.core import load

    ref = load(base, seed=seed)
    size = ref.meta.input_shape[-1]
    meta = _rename(ref.meta, name, f"{description}, 1x{size}x{size} in [0, 1] (no labels)")
    rng = np.random.default_rng(seed + salt)
    splits = {}
    for split in ("train", "val", "test"):
        splits[split] = make(ref.split(split), size, rng)
    return _unlabelled_bundle(meta, splits, seed)


def _far_split(_: Split, size: int, rng: np.random.Generator) -> torch.Tensor:
    n_photo = int(FAR_PER_SPLIT * 0.6)
    x = torch.cat([photo_patches(n_photo, size, rng), noise_images(FAR_PER_SPLIT - n_photo, size, rng)])
    return x[torch.from_numpy(rng.permutation(len(x)))].contiguous()


def _near_split(split: Split, size: int, rng: np.random.Generator) -> torch.Tensor:
    x, y = split.tensors
    return corrupt_digits(x, y, rng)


def _far(base: str, seed: int) -> DataBundle:
    return _ood_bundle(base, seed, f"{base}-ood", f"far-OOD for {base}: grey photo patches and noise", 1009,
                       _far_split)


def _near(base: str, seed: int) -> DataBundle:
    return _ood_bundle(base, seed, f"{base}-ood-near",
                       f"near-OOD for {base}: occluded, noisy, inverted and blended digits", 2029, _near_split)


def _unlabelled_bundle(meta: DataMeta, xs: dict[str, torch.Tensor], seed: int) -> DataBundle:
    """A bundle of label-free train/val/test inputs with a calibration subset drawn from train."""
    train, val, test = (Split(name, xs[name], None, meta) for name in ("train", "val", "test"))
    return DataBundle(meta, train, val, test, train.subset(256, seed=seed, name="calib"))


def _register_ood_sets(base: str, side: int) -> None:
    """Register ``{base}-ood`` (far) and ``{base}-ood-near`` (near), loaders ``fn(seed=0) -> DataBundle``."""
    register_dataset(f"{base}-ood", f"far-OOD for {base}: grey photo patches and noise, 1x{side}x{side}")(
        functools.partial(_far, base))
    register_dataset(f"{base}-ood-near", f"near-OOD for {base}: occluded, noisy, inverted, blended digits, "
                     f"1x{side}x{side}")(functools.partial(_near, base))


_register_ood_sets("digits", 8)
_register_ood_sets("digits32", 32)
