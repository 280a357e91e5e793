"""Built-in data sets, all made from what scikit-learn ships (no download)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from slimguard.data.core import DataBundle, make_bundle, register_dataset


@functools.lru_cache(maxsize=4)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    return x, d.target.astype(np.int64)


def upsample_digits(x: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """Bilinear upsampling of 8x8 digits to ``size`` x ``size`` (values stay in [0, 1])."""
    t = torch.as_tensor(x, dtype=torch.float32)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


@register_dataset("digits", "scikit-learn handwritten digits, 1x8x8 in [0, 1], 10 classes (1797 images)")
def digits(seed: int = 0) -> DataBundle:
    x, y = _digits_arrays()
    return make_bundle(
        x, y,
        dict(name="digits", task="classification", low=0.0, high=1.0, kind="image",
             description="scikit-learn digits (8x8 grey images, 0..16 scaled to [0, 1])",
             class_names=[str(i) for i in range(10)]),
        seed,
    )


@register_dataset("digits32", "digits upsampled to 1x32x32 (bilinear) for CNNs, 10 classes")
def digits32(seed: int = 0) -> DataBundle:
    x, y = _digits_arrays()
    return make_bundle(
        upsample_digits(x).numpy(), y,
        dict(name="digits32", task="classification", low=0.0, high=1.0, kind="image",
             description="scikit-learn digits upsampled bilinearly to 32x32, in [0, 1]",
             class_names=[str(i) for i in range(10)]),
        seed,
    )


def _tabular(name: str, loader, seed: int, description: str) -> DataBundle:
    d = loader()
    x = d.data.astype(np.float32)
    return make_bundle(
        x, d.target,
        dict(name=name, task="classification", low=x.min(axis=0).tolist(), high=x.max(axis=0).tolist(),
             kind="tabular", description=description, class_names=[str(c) for c in d.target_names]),
        seed,
    )


@register_dataset("breast-cancer", "Wisconsin breast cancer, 30 features, 2 classes (569 rows)")
def breast_cancer(seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_breast_cancer

    return _tabular("breast-cancer", load_breast_cancer, seed, "Wisconsin diagnostic breast cancer (30 features)")


@register_dataset("wine", "wine recognition, 13 features, 3 classes (178 rows)")
def wine(seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_wine

    return _tabular("wine", load_wine, seed, "UCI wine recognition (13 chemical features)")
