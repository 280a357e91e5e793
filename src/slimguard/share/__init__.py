"""Weight sharing: k-means clustering with centroid fine-tuning (Deep Compression) and hashing (HashedNets)."""

from slimguard.share.cluster import WeightSharingConfig, kmeans_1d
from slimguard.share.coding import HuffmanCodingConfig
from slimguard.share.hashing import HashedLinear, HashingConfig

__all__ = ["HashedLinear", "HashingConfig", "HuffmanCodingConfig", "WeightSharingConfig", "kmeans_1d"]
