"""Models: the zoo, model sources (``zoo:``, ``python:``, ``hf:``), and the spec that rebuilds them."""

from slimguard.models.sources import load_model
from slimguard.models.spec import ModelInfo, build, info, set_info

__all__ = ["ModelInfo", "build", "info", "load_model", "set_info"]
