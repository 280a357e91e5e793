"""``import slimguard`` fills every registry but loads no optional heavy dependency.

The plugin index runs at import time, so a plugin module that imported transformers, onnx(runtime),
fastapi, optuna, matplotlib or scikit-learn at module level would make every ``import slimguard`` pay for
it (and fail without the extra installed). Each check runs in a fresh interpreter, where nothing was
imported before.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("transformers", "onnxruntime", "onnx", "fastapi", "optuna", "matplotlib", "sklearn")

PROBE = """
import json, sys
{before}
import slimguard
from slimguard.core.config import CONFIGS
from slimguard.data.core import DATASETS
from slimguard.models.sources import SOURCES
print(json.dumps({{"heavy": sorted(m for m in {heavy!r} if m in sys.modules),
                  "steps": len(CONFIGS), "data": len(DATASETS), "sources": SOURCES.names()}}))
"""


def _probe(before: str = "") -> dict:
    code = PROBE.format(before=before, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_slimguard_loads_no_heavy_dependency_and_fills_the_registries():
    found = _probe()
    assert found["heavy"] == []
    assert found["steps"] >= 20 and found["data"] >= 5  # the plugin index ran
    assert found["sources"] == ["hf", "minilm", "python", "slim", "zoo"]


@pytest.mark.parametrize("module", ["matplotlib", "optuna"])
def test_the_probe_sees_a_heavy_import(module):
    """The check above would pass on a probe that saw nothing: importing one first is seen."""
    pytest.importorskip(module)
    assert _probe(f"import {module}")["heavy"] == [module]
