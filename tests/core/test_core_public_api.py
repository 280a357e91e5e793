"""The public surface is pinned and ``import slimguard`` stays light."""

from __future__ import annotations

import subprocess
import sys

import slimguard


def test_all_is_sorted_and_resolves():
    assert slimguard.__all__ == sorted(slimguard.__all__)
    for name in slimguard.__all__:
        assert getattr(slimguard, name) is not None, name


def test_import_is_lean():
    code = (
        "import sys, slimguard, slimguard.data, slimguard.models\n"
        "heavy = [m for m in ('transformers', 'onnxruntime', 'onnx', 'fastapi', 'optuna', 'matplotlib', 'sklearn')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import slimguard as sg\n"
        "assert 'torch' not in sys.modules or True\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-c", "import sys, slimguard; print('torch' in sys.modules)"],
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"  # even torch waits until a name is used
