"""Low-rank factorisation (truncated SVD) of Linear and Conv2d layers: ``sg.factorize_(model, LowRankConfig())``."""

from slimguard.lowrank.svd import LowRankConfig, choose_rank, factorize_conv, factorize_linear

__all__ = ["LowRankConfig", "choose_rank", "factorize_conv", "factorize_linear"]
