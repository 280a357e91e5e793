"""Pruning: masks, importance scores, unstructured / gradual / structured / N:M pruning."""
