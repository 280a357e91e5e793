"""Weight sharing: k-means clustering with centroid fine-tuning (Deep Compression) and hashing (HashedNets)."""

from slimguard.share.cluster import HuffmanCoding, WeightSharing, kmeans_1d
from slimguard.share.hashing import HashedLinear, Hashing

__all__ = ["HashedLinear", "Hashing", "HuffmanCoding", "WeightSharing", "kmeans_1d"]
