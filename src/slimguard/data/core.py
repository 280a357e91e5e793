"""Data bundles, the data set and source-prefix registries, and ``load``."""

from __future__ import annotations

import dataclasses
import warnings
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
        splits: how the splits were made: ``as given`` (the user's files or split column), or
            ``seeded stratified 60/20/20`` when slimguard split one set of rows.
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
    splits: str = ""  # how train/val/test were made: "as given" by the user, or a seeded split

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


def announce_split(source: str, seed: int, how: str) -> None:
    """Say, loudly, that slimguard split a user's file itself (it had no split of its own): a
    ``UserWarning`` the command line prints as one line, naming how to give the user's own split."""
    warnings.warn(f"{source} has no split of its own, so slimguard split it seeded, stratified 60/20/20 "
                  f"(seed {seed}); to keep your own, {how}", UserWarning, stacklevel=3)


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
        **{"splits": f"seeded stratified 60/20/20 (seed {seed})", **meta_kwargs},
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


SPLIT_NAMES = ("train", "val", "test")


def user_split_indices(labels: list[str], source: str) -> dict[str, np.ndarray]:
    """Row indices of each split named by a user's split column (values ``train``, ``val``/``validation``,
    ``test``); ``train`` and ``test`` are required, ``val`` is optional (see :func:`bundle_from_splits`)."""
    names = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, label in enumerate(labels):
        key = names.get(str(label).strip().lower())
        if key is None:
            raise DataError(f"{source}: row {i} has split {label!r}; allowed: train, val, test")
        out[key].append(i)
    for key in ("train", "test"):
        if not out[key]:
            raise DataError(f"{source}: the split column names no {key} rows; give train and test rows")
    return {k: np.array(v, dtype=np.int64) for k, v in out.items() if v}


def bundle_from_splits(parts: dict[str, tuple[Any, np.ndarray]], meta_kwargs: dict[str, Any], seed: int,
                       calib_size: int = 256) -> DataBundle:
    """A bundle from splits the user made (separate files or a split column), kept as given.

    ``parts`` maps ``train``, ``test`` and optionally ``val`` to ``(x, y)``: ``x`` an array (images, tables)
    or a list of texts. Without ``val``, a seeded stratified 20% of the user's train rows becomes val, and
    ``meta.splits`` says so; the user's test rows are never moved. Statistics come from train.
    """
    missing = [k for k in ("train", "test") if k not in parts]
    if missing:
        raise DataError(f"{meta_kwargs.get('name', 'data')}: no {missing[0]} split given; give train and test")
    note = "as given"
    if "val" not in parts:
        x, y = parts["train"]
        y = np.asarray(y, dtype=np.int64)
        tr, va, _ = stratified_split(y, seed, (0.8, 0.2, 0.0))
        take = (lambda idx: [x[i] for i in idx]) if isinstance(x, list) else (lambda idx: np.asarray(x)[idx])
        parts = {**parts, "train": (take(tr), y[tr]), "val": (take(va), y[va])}
        note = f"train and test as given; val is a seeded stratified 20% of the given train (seed {seed})"
    text = isinstance(parts["train"][0], list)
    ys = {k: torch.as_tensor(np.asarray(v[1], dtype=np.int64)) for k, v in parts.items()}
    if text:
        xs: dict[str, Any] = {k: list(v[0]) for k, v in parts.items()}
        mean: list[float] = []
        std: list[float] = []
        shape: tuple[int, ...] = ()
    else:
        xs = {}
        for k, v in parts.items():
            arr = np.asarray(v[0], dtype=np.float32)
            if not np.isfinite(arr).all():
                raise DataError(f"{meta_kwargs.get('name', 'data')}: {k} holds NaN or infinite values; clean them")
            xs[k] = torch.from_numpy(arr)
        shape = tuple(xs["train"].shape[1:])
        for k, x in xs.items():
            if tuple(x.shape[1:]) != shape:
                raise DataError(f"{meta_kwargs.get('name', 'data')}: {k} examples have shape {tuple(x.shape[1:])}, "
                                f"train's have {shape}; give splits of one shape")
        tx = xs["train"]
        dims = [0, *list(range(2, tx.ndim))] if meta_kwargs.get("kind", "image") == "image" else [0]
        mean = tx.mean(dim=dims).flatten().tolist()
        std = tx.std(dim=dims).clamp_min(1e-6).flatten().tolist()
    num_classes = int(max(int(y.max()) for y in ys.values() if len(y)) + 1)
    meta = DataMeta(input_shape=shape, num_classes=num_classes, mean=mean, std=std, seed=seed,
                    splits=note, **meta_kwargs)
    splits = {k: Split(k, xs[k], ys[k], meta) for k in parts}
    train = splits["train"]
    return DataBundle(meta=meta, train=train, val=splits["val"], test=splits["test"],
                      calib=train.subset(calib_size, seed=seed, name="calib"))


def _collect(batches: Any, what: str, max_examples: int) -> tuple[Any, np.ndarray]:
    """Inputs and labels of an iterable of ``(inputs, labels)`` batches (a DataLoader), concatenated."""
    xs: list[Any] = []
    ys: list[np.ndarray] = []
    n = 0
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{what}: batches must be (inputs, labels) pairs, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        x = list(x) if isinstance(x, (list, tuple)) and x and isinstance(x[0], str) else torch.as_tensor(x)
        y = torch.as_tensor(y).reshape(-1).numpy().astype(np.int64)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if max_examples and n >= max_examples:
            break
    if not xs:
        raise DataError(f"{what}: the batches are empty; give at least one (inputs, labels) batch")
    x_all = [t for part in xs for t in part] if isinstance(xs[0], list) else torch.cat(xs).numpy()
    y_all = np.concatenate(ys)
    if max_examples:
        x_all, y_all = x_all[:max_examples], y_all[:max_examples]
    return x_all, y_all


def bundle_from_batches(train: Any, val: Any = None, test: Any = None, *, kind: str = "image",
                        name: str = "batches", seed: int = DEFAULT_SEED, max_examples: int = 0) -> DataBundle:
    """A bundle from a user's batches, for the API's fine-tuning (``sg.finetune``) and calibration.

    Args:
        train, val, test: torch ``DataLoader``s, or any iterables of ``(inputs, labels)`` batches (inputs a
            tensor, or a list of texts). ``val`` missing: a seeded stratified 20% of train, as
            ``meta.splits`` records; ``test`` missing: val is scored as test too (recorded as well).
        kind: ``image``, ``tabular`` or ``text`` (what statistics mean, see :class:`DataMeta`).
        max_examples: read at most this many examples of each (0: all).

    Example:
        >>> bundle = bundle_from_batches(train_loader, val_loader)
        >>> sg.finetune(model, bundle, sg.FinetuneConfig(epochs=2))
    """
    parts = {"train": _collect(train, "train", max_examples)}
    if val is not None:
        parts["val"] = _collect(val, "val", max_examples)
    if test is not None:
        parts["test"] = _collect(test, "test", max_examples)
    x0 = parts["train"][0]
    text = isinstance(x0, list)
    meta: dict[str, Any] = {"name": name, "task": "classification", "kind": "text" if text else kind,
                            "description": "batches given in the API"}
    if text:
        meta.update(low=0.0, high=0.0)
    else:
        every = [p[0] for p in parts.values()]
        if kind == "image":
            meta.update(low=float(min(a.min() for a in every)), high=float(max(a.max() for a in every)))
        else:
            meta.update(low=np.min([a.min(axis=0) for a in every], axis=0).tolist(),
                        high=np.max([a.max(axis=0) for a in every], axis=0).tolist())
    if "test" not in parts:
        if "val" not in parts:
            x, y = parts["train"]
            tr, va, _ = stratified_split(y, seed, (0.8, 0.2, 0.0))
            take = (lambda idx: [x[i] for i in idx]) if text else (lambda idx: x[idx])
            parts = {"train": (take(tr), y[tr]), "val": (take(va), y[va])}
        parts["test"] = parts["val"]
        bundle = bundle_from_splits(parts, meta, seed)
        bundle.meta.splits = ("train and val as given; test is val (none given)" if val is not None else
                              f"val (also test) is a seeded stratified 20% of the given train (seed {seed})")
        return bundle
    return bundle_from_splits(parts, meta, seed)
