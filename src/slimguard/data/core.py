"""Data bundles, the data set and source-prefix registries, and ``load``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from slimguard.core.errors import DataError
from slimguard.core.registry import Registry

DEFAULT_SEED = 0


@dataclasses.dataclass
class DataMeta:
    """What a data set is: enough to build, score and guard a model for it.

    Attributes:
        name: data set name (``digits``, ``npz:/path/file.npz``, ...).
        task: ``classification`` or ``embedding``.
        input_shape: shape of one example, without the batch dimension.
        num_classes: number of labels (0 for embedding data).
        mean, std: per-channel (images) or per-feature (tabular) statistics of the train split,
            used by zoo models' first layer.
        low, high: the valid input range (scalars for images, per-feature lists for tabular data).
        seed: the seed of the split.
        description: a sentence for reports.
    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: list[float]
    std: list[float]
    low: float | list[float]
    high: float | list[float]
    seed: int = DEFAULT_SEED
    description: str = ""
    class_names: list[str] = dataclasses.field(default_factory=list)
    kind: str = "image"  # image | tabular | text

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataMeta:
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid input range as tensors broadcastable to a batch ``(N, *input_shape)``."""
        return _as_bound(self.low, self.input_shape), _as_bound(self.high, self.input_shape)


def _as_bound(value: float | list[float], shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        return t
    return t.reshape(shape) if t.numel() == int(np.prod(shape)) else t


@dataclasses.dataclass
class Split:
    """One split: inputs ``x`` of shape ``(N, *input_shape)`` and labels ``y`` of shape ``(N,)``.

    For text data ``x`` is a list of strings and ``y`` is None.
    """

    name: str
    x: Any
    y: torch.Tensor | None
    meta: DataMeta

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int = 256) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """Yield ``(x, y)`` batches in order."""
        for i in range(0, len(self.x), batch_size):
            yb = None if self.y is None else self.y[i : i + batch_size]
            yield self.x[i : i + batch_size], yb

    def subset(self, n: int, seed: int = DEFAULT_SEED, name: str | None = None) -> Split:
        """A seeded random subset of ``n`` examples (all of them when ``n >= len``)."""
        n = min(n, len(self))
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        x = [self.x[i] for i in idx.tolist()] if isinstance(self.x, list) else self.x[idx]
        y = None if self.y is None else self.y[idx]
        return Split(name or f"{self.name}[{n}]", x, y, self.meta)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.y is None or not torch.is_tensor(self.x):
            raise DataError(f"split {self.name!r} holds no labelled tensors")
        return self.x, self.y


@dataclasses.dataclass
class DataBundle:
    """Train/val/test splits, a calibration subset drawn from train, and metadata."""

    meta: DataMeta
    train: Split
    val: Split
    test: Split
    calib: Split

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def example(self) -> Any:
        """One example batch (size 1), for tracing."""
        return self.train.x[:1]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test", "calib"):
            raise DataError(f"unknown split {name!r}; allowed: train, val, test, calib")
        return getattr(self, name)


Loader = Callable[..., DataBundle]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A built-in data set: its loader ``fn(seed=0, **options) -> DataBundle`` and a one-line description."""

    loader: Loader
    description: str


DATASETS: Registry[DatasetEntry] = Registry("data set", error=DataError)
"""Name (``digits``) -> :class:`DatasetEntry` of every built-in data set."""
PREFIXES: Registry[Loader] = Registry("data source prefix", error=DataError)
"""Prefix (``npz``) -> loader ``fn(arg, seed=0, **options) -> DataBundle`` of sources ``PREFIX:ARG``."""


def register_dataset(name: str, description: str = "") -> Callable[[Loader], Loader]:
    """Register a built-in data set loader ``fn(seed=0) -> DataBundle`` under ``name`` (a taken name is
    refused); ``description`` defaults to the first line of its docstring."""

    def deco(fn: Loader) -> Loader:
        if name in DATASETS and DATASETS.get(name).loader is fn:
            return fn
        DATASETS.register(name, DatasetEntry(fn, description or (fn.__doc__ or "").strip().splitlines()[0]))
        return fn

    return deco


def register_prefix(prefix: str) -> Callable[[Loader], Loader]:
    """Register a loader for sources written ``prefix:ARG`` (``npz:FILE``, ``csv:FILE``, ...)."""
    return PREFIXES.register(prefix)


def available() -> dict[str, str]:
    """Names of the built-in data sets with one-line descriptions."""
    return {str(name): entry.description for name, entry in sorted(DATASETS.items())}


def load(source: str, seed: int = DEFAULT_SEED, **options: Any) -> DataBundle:
    """Load a data set by name (``digits``) or by source (``npz:FILE``, ``csv:FILE``).

    Args:
        source: a built-in name (see :func:`available`) or ``PREFIX:ARG``.
        seed: seed of the train/val/test split (default 0).
        **options: passed to the loader (for example ``label="target"`` for csv).

    Example:
        >>> data = load("digits")
        >>> data.train.x.shape[1:]
        torch.Size([1, 8, 8])
    """
    if source in DATASETS:
        return DATASETS.get(source).loader(seed=seed, **options)
    prefix, sep, arg = source.partition(":")
    if sep and prefix in PREFIXES:
        return PREFIXES.get(prefix)(arg, seed=seed, **options)
    prefixes = ", ".join(f"{p}:FILE" for p in PREFIXES.names())
    raise DataError(f"unknown data set {source!r}; built-in: {DATASETS.allowed()}; or a file: {prefixes}")


# ---- helpers shared by loaders ---------------------------------------------------------------------
def stratified_split(
    y: np.ndarray, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a seeded, stratified train/val/test split."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n = len(idx)
        n_train = round(n * fractions[0])
        n_val = round(n * fractions[1])
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    train, val, test = (np.sort(np.array(p, dtype=np.int64)) for p in parts)
    return train, val, test


def make_bundle(
    x: np.ndarray,
    y: np.ndarray,
    meta_kwargs: dict[str, Any],
    seed: int,
    calib_size: int = 256,
) -> DataBundle:
    """Split arrays, compute train statistics and build the bundle.

    Raises:
        DataError: ``x`` holds values that are not finite once in float32 (the dtype models see).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{meta_kwargs.get('name', 'data')}: x holds values that are NaN, infinite or beyond "
                        f"float32's range (first in row {row}); clean or rescale them")
    y = np.asarray(y, dtype=np.int64)
    tr, va, te = stratified_split(y, seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    kind = meta_kwargs.get("kind", "image")
    train_x = xt[tr]
    if kind == "image":  # per channel
        dims = [0, *list(range(2, train_x.ndim))]
        mean = train_x.mean(dim=dims).tolist()
        std = train_x.std(dim=dims).clamp_min(1e-6).tolist()
    else:  # per feature
        mean = train_x.mean(dim=0).flatten().tolist()
        std = train_x.std(dim=0).clamp_min(1e-6).flatten().tolist()
    meta = DataMeta(
        input_shape=tuple(x.shape[1:]),
        num_classes=int(y.max()) + 1,
        mean=mean,
        std=std,
        seed=seed,
        **meta_kwargs,
    )
    train = Split("train", train_x, yt[tr], meta)
    bundle = DataBundle(
        meta=meta,
        train=train,
        val=Split("val", xt[va], yt[va], meta),
        test=Split("test", xt[te], yt[te], meta),
        calib=train.subset(calib_size, seed=seed, name="calib"),
    )
    return bundle
