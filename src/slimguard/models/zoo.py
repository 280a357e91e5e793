"""The model zoo: small real models trained on first use on built-in data, then cached.

| name              | data          | shape                                              |
|-------------------|---------------|----------------------------------------------------|
| ``digits-mlp``    | digits        | LeNet-300-100 shape: 64-300-100-10                 |
| ``digits-lenet5`` | digits32      | LeNet-5 (Caffe variant of Deep Compression): conv20-conv50-fc500-fc10 |
| ``digits32-resnet`` | digits32    | ResNet with BN and residual blocks, widths 32/64/128 |
| ``tabular-mlp``   | breast-cancer | 30-64-32-2                                         |
| ``docs-lm``       | docs-corpus   | Llama decoder, 12.6M parameters (registered by :mod:`slimguard.lm.docs_lm`) |

Zoo models are registered in :data:`ZOO` (name -> :class:`ZooEntry`); their architectures are built
by the factories in :data:`FACTORIES`, the only code a ``zoo`` model source can name.

Training is seeded. A zoo model is an unmodified build of its factory, so the cache keeps only its
weights: ``NAME-KEY.safetensors`` plus ``NAME-KEY.json`` holding the sha256 and size of the weights, under
``$SLIMGUARD_CACHE`` or the user cache directory (``KEY`` hashes everything training depends on). A
cached model is rebuilt from its factory and the weights are loaded into it (safetensors: no pickle);
an entry whose weights do not match their record, or do not fit the model, is deleted and trained
again, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ModelError
from slimguard.core.outputs import write_bytes_atomic, write_json_atomic
from slimguard.core.registry import Registry
from slimguard.models.layers import BasicBlock, Normalize
from slimguard.models.spec import ModelInfo, register_builder, set_info

ZOO_VERSION = 1
CACHE_FORMAT = "slimguard-zoo-weights"


def digits_mlp(mean: list[float], std: list[float], hidden: tuple[int, int] = (300, 100),
               num_classes: int = 10, in_features: int = 64) -> nn.Module:
    h1, h2 = hidden
    return nn.Sequential(
        Normalize(mean, std, image=True),
        nn.Flatten(),
        nn.Linear(in_features, h1), nn.ReLU(),
        nn.Linear(h1, h2), nn.ReLU(),
        nn.Linear(h2, num_classes),
    )


def lenet5(mean: list[float], std: list[float], width: float = 1.0, num_classes: int = 10) -> nn.Module:
    c1, c2, f1 = (max(1, round(c * width)) for c in (20, 50, 500))
    return nn.Sequential(
        Normalize(mean, std, image=True),
        nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),       # 32 -> 28 -> 14
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),      # 14 -> 10 -> 5
        nn.Flatten(),
        nn.Linear(c2 * 25, f1), nn.ReLU(),
        nn.Linear(f1, num_classes),
    )


class ResNet(nn.Module):
    """A small ResNet for 32x32 inputs: stem, three stages of basic blocks, global pool, linear head."""

    def __init__(self, mean: list[float], std: list[float], widths: tuple[int, ...] = (32, 64, 128),
                 blocks: int = 1, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.norm = Normalize(mean, std, image=True)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(self.norm(x))))))


def tabular_mlp(mean: list[float], std: list[float], hidden: tuple[int, int] = (64, 32),
                num_classes: int = 2) -> nn.Module:
    return nn.Sequential(
        Normalize(mean, std, image=False),
        nn.Linear(len(mean), hidden[0]), nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
        nn.Linear(hidden[1], num_classes),
    )


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    data: str
    factory: Callable[..., nn.Module]
    description: str
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # models that are not classifiers on a data set (docs-lm) bring their own steps:
    create_fn: Callable[..., nn.Module] | None = None  # (seed=...) -> untrained model with its info
    train_fn: Callable[..., Any] | None = None  # (model, seed=..., progress=...) trains it in place
    key_fn: Callable[[int], str] | None = None  # (seed) -> what else the trained weights depend on


ZOO: Registry[ZooEntry] = Registry("zoo model", error=ModelError)
"""Name -> :class:`ZooEntry` of every zoo model."""

FACTORIES: Registry[Callable[..., nn.Module]] = Registry("zoo factory", error=ModelError)
"""Factory name (as a manifest records it) -> the function or class that builds the architecture."""
FACTORIES.register("digits_mlp", digits_mlp)
FACTORIES.register("lenet5", lenet5)
FACTORIES.register("resnet", ResNet)
FACTORIES.register("tabular_mlp", tabular_mlp)


def _factory_name(fn: Callable[..., nn.Module]) -> str:
    for name, factory in FACTORIES.items():
        if factory is fn:
            return str(name)
    raise ModelError(f"zoo factory {fn!r} is not in FACTORIES; allowed: {FACTORIES.allowed()}")


def register_zoo(entry: ZooEntry) -> ZooEntry:
    """Add a zoo model (its factory must be in :data:`FACTORIES`); a taken name is refused."""
    _factory_name(entry.factory)
    return ZOO.register(entry.name, entry)


register_zoo(ZooEntry("digits-mlp", "digits", digits_mlp, "LeNet-300-100 shape MLP (64-300-100-10) on digits",
                      epochs=40, lr=1e-3))
register_zoo(ZooEntry("digits-lenet5", "digits32", lenet5,
                      "LeNet-5 (conv20-conv50-fc500-fc10, Caffe variant) on digits upsampled to 32x32",
                      epochs=15, lr=1e-3))
register_zoo(ZooEntry("digits32-resnet", "digits32", ResNet,
                      "small ResNet (BN, residual blocks, widths 32/64/128) on digits32", epochs=15, lr=2e-3,
                      weight_decay=5e-4))
register_zoo(ZooEntry("tabular-mlp", "breast-cancer", tabular_mlp, "MLP 30-64-32-2 on breast cancer",
                      epochs=60, lr=1e-3))


def names() -> list[str]:
    return ZOO.names()


@register_builder("zoo")
def _build_zoo(source: dict[str, Any]) -> nn.Module:
    factory = FACTORIES.get(source.get("factory", ""))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("kwargs", {}).items()}
    return factory(**kwargs)


def create(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """An untrained zoo model with its info attached (statistics taken from its data's train split)."""
    from slimguard import data as sgdata

    entry = ZOO.get(name)
    if entry.create_fn is not None:
        return entry.create_fn(seed=seed, **overrides)
    bundle = sgdata.load(entry.data, seed=seed)
    kwargs: dict[str, Any] = {"mean": bundle.meta.mean, "std": bundle.meta.std, **entry.kwargs, **overrides}
    if entry.factory is tabular_mlp:
        kwargs.setdefault("num_classes", bundle.meta.num_classes)
    torch.manual_seed(seed)
    model = entry.factory(**kwargs)
    source = {"kind": "zoo", "name": name, "factory": _factory_name(entry.factory),
              "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    set_info(model, ModelInfo(source=source, task="classification", data=bundle.meta.to_dict()))
    return model


def cache_dir() -> Path:
    env = os.environ.get("SLIMGUARD_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("slimguard"))


def _cache_key(entry: ZooEntry, seed: int) -> str:
    parts = [ZOO_VERSION, entry.name, entry.data, entry.epochs, entry.lr, entry.batch_size,
             entry.weight_decay, entry.kwargs, seed, torch.__version__.split("+")[0]]
    if entry.key_fn is not None:
        parts.append(entry.key_fn(seed))
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load(name: str, seed: int = 0, *, retrain: bool = False, progress: bool = True) -> nn.Module:
    """A trained zoo model (eval mode): from the cache, or trained now on its built-in data (seeded) and
    cached. A damaged cache entry is deleted and trained again.

    Example:
        >>> model = load("digits-mlp")
    """
    entry = ZOO.get(name)
    stem = cache_dir() / f"{name}-{_cache_key(entry, seed)}"
    weights, record = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.exists() and record.exists() and not retrain:
        try:
            return _read_cache(name, seed, weights, record)
        except Exception:  # any entry that does not check out is rebuilt, never trusted
            weights.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
    model = train_zoo(name, seed=seed, progress=progress)
    _write_cache(model, weights, record)
    return model.eval()  # as a cached load returns it


def _write_cache(model: nn.Module, weights: Path, record: Path) -> None:
    """The weights as safetensors, then the record of their sha256 and size (written last: an entry
    without its record is not used)."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    write_bytes_atomic(weights, blob)
    write_json_atomic(record, {"format": CACHE_FORMAT, "version": ZOO_VERSION,
                               "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})


def _read_cache(name: str, seed: int, weights: Path, record: Path) -> nn.Module:
    """The cached model: built by its factory (global RNG untouched), weights checked against their record
    and loaded strictly. Raises (OSError, ValueError, RuntimeError, ...) for an entry that does not check
    out."""
    from safetensors.torch import load as st_load

    meta = json.loads(record.read_text())
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != ZOO_VERSION:
        raise ValueError(f"{record}: not a zoo cache record of version {ZOO_VERSION}")
    with torch.random.fork_rng(devices=[]):
        model = create(name, seed=seed)
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = weights.stat().st_size
    if size != meta["bytes"] or size > expected + (1 << 20):  # the header is a small JSON table
        raise ValueError(f"{weights}: {size} bytes, the record says {meta['bytes']}")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError(f"{weights}: sha256 does not match its record")
    model.load_state_dict(st_load(blob), strict=True)
    return model.eval()


def train_zoo(name: str, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train a zoo model from scratch on its data (deterministic for a given seed and thread count)."""
    from slimguard import data as sgdata
    from slimguard.train.loop import FinetuneConfig, finetune

    entry = ZOO.get(name)
    model = create(name, seed=seed)
    if entry.train_fn is not None:
        entry.train_fn(model, seed=seed, progress=progress)
        return model
    bundle = sgdata.load(entry.data, seed=seed)
    cfg = FinetuneConfig(epochs=entry.epochs, lr=entry.lr, batch_size=entry.batch_size,
                         weight_decay=entry.weight_decay, seed=seed, patience=0)
    finetune(model, bundle, cfg, progress=progress, description=f"training {name}")
    return model
