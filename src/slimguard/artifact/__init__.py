"""The ``.slim`` artifact format: one zip file, loaded without pickle, written atomically, verified on load.

:mod:`~slimguard.artifact.slim` saves and loads models; :mod:`~slimguard.artifact.manifest` is the
manifest's schema; :mod:`~slimguard.artifact.archive` reads the zip with its limits checked first;
:mod:`~slimguard.artifact.payload` encodes and decodes the tensor payload with every size checked first.

The format knows no technique: module classes, codecs and load hooks come from registries in
:mod:`slimguard.core.modules` and :mod:`slimguard.codec` that the techniques fill. This package also
makes ``.slim`` paths a model source (:data:`slimguard.models.sources.SOURCES`).

Example:
    >>> from slimguard.artifact import load, save
    >>> path = save(model, "out/model.slim")
    >>> model = load(path)
"""

from slimguard.artifact.slim import *  # noqa: F403  (the public names, listed once in slim.__all__)
from slimguard.artifact.slim import __all__ as __all__
