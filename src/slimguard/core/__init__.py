"""Core: configs, ``Registry[T]``, errors, recipes, atomic outputs, the module allowlist and pruning masks.

The bottom layer: it imports nothing else from slimguard (``tests/test_layers.py`` checks it).
"""
