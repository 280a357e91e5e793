"""slimguard: make trained PyTorch models smaller and faster, and keep them trustworthy once deployed.

``import slimguard`` imports the plugin index (:mod:`slimguard.plugins`), so every registry (steps,
codecs, data sets, zoo models, detectors, ...) is full from the start; the public names below resolve
on first use. Optional heavy dependencies (transformers, onnxruntime, fastapi, optuna, matplotlib) load
only inside the functions that need them.

Example:
    >>> import slimguard as sg
    >>> model = sg.zoo.load("digits-mlp")
    >>> data = sg.data.load("digits")
    >>> sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slimguard._version import __version__ as __version__

# public name -> module that defines it (one line per name; each subsystem keeps its own block)
_LAZY: dict[str, str] = {
    # core
    "ArtifactError": "slimguard.core.errors",
    "Config": "slimguard.core.config",
    "ConfigError": "slimguard.core.errors",
    "DataError": "slimguard.core.errors",
    "ModelError": "slimguard.core.errors",
    "SlimguardError": "slimguard.core.errors",
    "UserError": "slimguard.core.errors",
    "load": "slimguard.artifact",
    "save": "slimguard.artifact",
    "read_manifest": "slimguard.artifact",
    "evaluate": "slimguard.evaluate",
    "inspect_model": "slimguard.inspect",
    "load_model": "slimguard.models.sources",
    "compress": "slimguard.pipeline",
    "run_step": "slimguard.transforms",
    "load_recipe": "slimguard.core.recipe:load",
    # training
    "FinetuneConfig": "slimguard.train.loop",
    "finetune": "slimguard.train.loop",
    # verbs
    "cluster_": "slimguard.transforms",
    "factorize_": "slimguard.transforms",
    "fuse_": "slimguard.transforms",
    "prune_": "slimguard.transforms",
    "quantize_": "slimguard.transforms",
    # prune
    "MagnitudePruningConfig": "slimguard.prune.magnitude",
    "AGPCallback": "slimguard.prune.gradual",
    "ActivationImportance": "slimguard.prune.importance",
    "BNScaleImportance": "slimguard.prune.importance",
    "ChannelPruningConfig": "slimguard.prune.structured",
    "DependencyGraph": "slimguard.prune.graph",
    "AGPConfig": "slimguard.prune.gradual",
    "Importance": "slimguard.prune.importance",
    "MagnitudeImportance": "slimguard.prune.importance",
    "NMSparsityConfig": "slimguard.prune.nm",
    "SparseGPTConfig": "slimguard.prune.sparsegpt",
    "WandaConfig": "slimguard.prune.sparsegpt",
    "RandomImportance": "slimguard.prune.importance",
    "TaylorImportance": "slimguard.prune.importance",
    "prune_channels": "slimguard.prune.structured",
    "ratios_from_sensitivity": "slimguard.prune.sensitivity",
    "sensitivity": "slimguard.prune.sensitivity",
    # quantize
    "Int8DynamicConfig": "slimguard.quantize.dynamic",
    "FuseBNConfig": "slimguard.quantize.fuse",
    "Int8StaticConfig": "slimguard.quantize.static",
    "WeightOnlyConfig": "slimguard.quantize.weight_only",
    "GPTQConfig": "slimguard.quantize.gptq",
    "AWQConfig": "slimguard.quantize.awq",
    "QATConfig": "slimguard.quantize.qat",
    "QATFreezer": "slimguard.quantize.qat",
    "prepare_qat_": "slimguard.quantize.qat",
    "convert_": "slimguard.quantize.qat",
    "SmoothQuantConfig": "slimguard.quantize.smooth",
    "HalfPrecisionConfig": "slimguard.quantize.cast",
    "MixedPrecisionConfig": "slimguard.quantize.mixed",
    "QScheme": "slimguard.quantize.observers",
    "make_observer": "slimguard.quantize.observers",
    "OrtModel": "slimguard.runtime.onnx",
    "export_onnx": "slimguard.runtime.onnx",
    "check_int8_kernels": "slimguard.runtime.onnx",
    # guard (contracts, OOD, monitor, faults, protection)
    "Guard": "slimguard.guard.guard",
    "Contract": "slimguard.guard.contract",
    "Monitor": "slimguard.guard.monitor",
    "FaultCampaignConfig": "slimguard.guard.faults",
    "RangeRestriction": "slimguard.guard.protect",
    "WeightChecksums": "slimguard.guard.protect",
    "Cascade": "slimguard.guard.protect",
    "make_detector": "slimguard.guard.ood",
    # distill, low-rank, regularization
    "DistillConfig": "slimguard.distill.core",
    "DropLayersConfig": "slimguard.prune.depth",
    "Ensemble": "slimguard.distill.teachers",
    "LowRankConfig": "slimguard.lowrank.svd",
    "SparsityTrainingConfig": "slimguard.train.regularize",
    "distill": "slimguard.distill.core",
    "drop_layers_": "slimguard.prune.depth",
    "width_student": "slimguard.distill.students",
    # share (weight sharing, hashing, Huffman coding)
    "HashedLinear": "slimguard.share.hashing",
    "HashingConfig": "slimguard.share.hashing",
    "HuffmanCodingConfig": "slimguard.share.coding",
    "WeightSharingConfig": "slimguard.share.cluster",
    # robust (attacks, adversarial training, corruptions, scorecard)
    "AdversarialFinetuneConfig": "slimguard.robust.training",
    "scorecard": "slimguard.robust.scorecard",
}
_SUBMODULES = {"data": "slimguard.data", "zoo": "slimguard.models.zoo", "models": "slimguard.models",
               "guard": "slimguard.guard", "robust": "slimguard.robust"}

__all__ = sorted(["__version__", *_LAZY, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'slimguard' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from slimguard import data, models, zoo  # noqa: F401

from slimguard import plugins as _plugins  # noqa: E402, F401  (every plugin registers; after __getattr__)
