"""The plugin index: imports every module that registers a plugin, so every registry is full.

Plugins (configs and their handlers, codecs, module classes, load hooks, data sets, data source
prefixes, zoo models, model sources, pruning rules, importances, OOD detectors, protections, attacks,
corruptions, fake-quant twins) register themselves in a :class:`~slimguard.core.registry.Registry` when
their module is imported. Only the entry points import this index: ``slimguard/__init__.py`` (so
``import slimguard`` fills every registry) and the CLI. Lower layers look plugins up by name and never
import them.

A module added here must not import transformers, onnxruntime, fastapi, optuna or matplotlib at module
level (``tests/test_lean_import.py`` checks it): those load inside the functions that need them.
"""

import importlib

MODULES = [
    "slimguard.codec.huffman",
    "slimguard.data.builtin",
    "slimguard.data.files",
    "slimguard.data.text",
    "slimguard.data.corpus",
    "slimguard.data.prose",
    "slimguard.data.images",
    "slimguard.data.ood",
    "slimguard.train.loop",
    "slimguard.train.regularize",
    "slimguard.models.zoo",
    "slimguard.models.sources",
    "slimguard.lm.docs_lm",
    "slimguard.lm.generate",
    "slimguard.artifact.slim",
    "slimguard.runtime.ort_transformer",
    "slimguard.prune.rules",
    "slimguard.prune.blocks",
    "slimguard.prune.attention",
    "slimguard.prune.mha",
    "slimguard.prune.importance",
    "slimguard.prune.magnitude",
    "slimguard.prune.structured",
    "slimguard.prune.nm",
    "slimguard.prune.sparsegpt",
    "slimguard.prune.gradual",
    "slimguard.prune.depth",
    "slimguard.quantize.kernels",
    "slimguard.quantize.fuse",
    "slimguard.quantize.qmodules",
    "slimguard.quantize.dynamic",
    "slimguard.quantize.static",
    "slimguard.quantize.weight_only",
    "slimguard.quantize.gptq",
    "slimguard.quantize.awq",
    "slimguard.quantize.qat",
    "slimguard.quantize.smooth",
    "slimguard.quantize.cast",
    "slimguard.quantize.mixed",
    "slimguard.quantize.kvcache",
    "slimguard.share.cluster",
    "slimguard.share.coding",
    "slimguard.share.hashing",
    "slimguard.lowrank.svd",
    "slimguard.distill.core",
    "slimguard.distill.causal_lm",
    "slimguard.distill.students",
    "slimguard.robust.corruptions",
    "slimguard.robust.twin",
    "slimguard.robust.scorecard",
    "slimguard.robust.training",
    "slimguard.guard.ood",
    "slimguard.guard.guard",
]

for _name in MODULES:
    importlib.import_module(_name)
