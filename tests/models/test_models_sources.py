"""Model sources: a user's ``python:FILE.py:factory`` model loads, with or without safetensors weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimguard.core.errors import ModelError
from slimguard.models.sources import load_model
from slimguard.models.spec import info

FACTORY = """
import torch.nn as nn

class Tiny(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)

def make():
    return Tiny()
"""


def test_python_source_with_weights(tmp_path: Path) -> None:
    file = tmp_path / "tiny.py"
    file.write_text(FACTORY)
    first = load_model(f"python:{file}:make")
    weights = tmp_path / "w.safetensors"
    save_file({k: torch.full_like(v, 0.5) for k, v in first.state_dict().items()}, str(weights))
    again = load_model(f"python:{file}:make", weights=str(weights))
    assert torch.equal(again.fc.weight, torch.full((6, 4), 0.5))
    assert type(again) is type(first)  # the file is imported once: classes keep their identity
    assert info(again).source["kind"] == "python"


@pytest.mark.parametrize("source", ["python:missing.py:make", "python:nofactory", "nope:thing"])
def test_bad_sources_are_one_line_errors(source: str) -> None:
    with pytest.raises(ModelError):
        load_model(source)
