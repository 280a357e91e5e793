"""Core: configs, ``Registry[T]``, errors, recipes, atomic outputs, the module allowlist, pruning masks and
the shared torch helpers (:mod:`~slimguard.core.torch_utils`: selection by name, eval mode, forward, device,
accuracy).

The bottom layer: it imports nothing else from slimguard (``tests/test_layers.py`` checks it).
"""
