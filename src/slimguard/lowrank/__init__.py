"""Low-rank factorisation (truncated SVD) of Linear and Conv2d layers: ``sg.factorize_(model, LowRank())``."""

from slimguard.lowrank.svd import LowRank, choose_rank, factorize_conv, factorize_linear

__all__ = ["LowRank", "choose_rank", "factorize_conv", "factorize_linear"]
