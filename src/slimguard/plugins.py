"""Imports every module that registers configs, handlers, data sets or zoo models.

Kept separate so ``import slimguard`` stays light: registries are filled only when first looked up.
Each subsystem adds its module here.
"""

import importlib

_MODULES = [
    "slimguard.data.builtin",
    "slimguard.data.files",
    "slimguard.data.text",
    "slimguard.models.zoo",
    "slimguard.train.loop",
    "slimguard.prune.magnitude",
    # prune (issue 3): structured, N:M, gradual (AGP)
    "slimguard.prune.structured",
    "slimguard.prune.nm",
    "slimguard.prune.gradual",
    "slimguard.quantize.dynamic",
    # quantize (issue 4): fusion, static int8, weight-only / GPTQ, QAT, SmoothQuant, half, mixed precision
    "slimguard.quantize.fuse",
    "slimguard.quantize.qmodules",
    "slimguard.quantize.static",
    "slimguard.quantize.weight_only",
    "slimguard.quantize.qat",
    "slimguard.quantize.smooth",
    "slimguard.quantize.cast",
    "slimguard.quantize.mixed",
    # guard (issue 8): OOD data sets
    "slimguard.data.ood",
    # distill + lowrank + regularize (issue 5)
    "slimguard.distill.core",
    "slimguard.distill.students",
    "slimguard.lowrank.svd",
    "slimguard.train.regularize",
    # share + codec (Deep Compression, HashedNets)
    "slimguard.codec.huffman",
    "slimguard.share.cluster",
    "slimguard.share.hashing",
    # robust (issue 7): adv-finetune step
    "slimguard.robust.training",
]

for _name in _MODULES:
    importlib.import_module(_name)
