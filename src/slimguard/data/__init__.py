"""Data: built-in real data sets (from scikit-learn, nothing downloaded) and file loaders.

``load("digits")`` returns a :class:`DataBundle` with fixed, seeded train/val/test splits, a calibration
subset drawn from train, and :class:`DataMeta` recording the task, input shape, normalization and the
valid input range. Images are kept in raw [0, 1] space; zoo models normalise inside their first layer,
so attacks and contracts work on what a user would actually send.
"""

from slimguard.data.core import (
    DataBundle,
    DataMeta,
    Split,
    available,
    bundle_from_batches,
    load,
    register_dataset,
)

__all__ = ["DataBundle", "DataMeta", "Split", "available", "bundle_from_batches", "load", "register_dataset"]
