"""The public surface is pinned (``tests/test_lean_import.py`` keeps ``import slimguard`` light)."""

from __future__ import annotations

import slimguard


def test_all_is_sorted_and_resolves():
    assert slimguard.__all__ == sorted(slimguard.__all__)
    for name in slimguard.__all__:
        assert getattr(slimguard, name) is not None, name
